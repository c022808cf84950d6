"""``dldr`` — the trajectory basis of a sampled run (DLDR): the leading principal directions of the SGD
trajectory, built by `raysub basis` and read from the run directory (``train.basis_run``).

Registered ``needs_basis_run``; its ``check`` (`basis_run_problems`) reads only the run's small JSON files, so a
missing basis, a basis of another model, or too few stored components is reported before Ray starts.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional

import torch

from raysub.errors import ConfigError
from raysub.projections.base import PROJECTIONS, MatrixProjection
from raysub.projections._common import check_dim

NO_RUN = ("projection 'dldr' needs a sampled run with a basis: set train.basis_run=RUN_DIR (made by 'raysub run' "
          "or 'raysub sample' + 'raysub basis')")


def other_model(run: str, stored: Any, num_params: int) -> str:
    """The one-line error for a basis run of a different model."""
    return (f"train.basis_run={run} is a {stored}-parameter model, this model has {num_params}: use the same "
            f"data and model as that run, or sample a new run for this model")


def basis_run_problems(num_params: int, dim: int, options: Mapping[str, Any], basis_run: Optional[str]) -> List[str]:
    """The family's ``check``: ``basis_run`` is given, has a basis (basis/spectrum.json), is a run of a
    ``num_params``-parameter model, and stores at least ``dim`` components."""
    from raysub.storage import RunDir

    if not basis_run:
        return [NO_RUN]
    from raysub.pipeline.basis import read_spectrum

    run = RunDir(basis_run)
    spec = read_spectrum(run)
    if spec is None:
        return [f"train.basis_run={basis_run} has no basis (no basis/spectrum.json): run 'raysub basis "
                f"{basis_run}' first"]
    problems = []
    stored_n = run.read_json("manifest.json").get("num_params") if run.exists("manifest.json") else None
    if stored_n is not None and stored_n != num_params:
        problems.append(other_model(basis_run, stored_n, num_params))
    stored = spec["dim"]
    if dim > stored:
        problems.append(f"train.dim={dim} exceeds the {stored} components of the stored basis in {basis_run}: "
                        f"rebuild it with 'raysub basis {basis_run} basis.dim={dim} --overwrite'")
    return problems


@PROJECTIONS.register("dldr", random=False, needs_basis_run=True, full=False, low_memory=False,
                      check=basis_run_problems)
def dldr_projection(num_params: int, dim: int, seed: int = 0, *, run_dir=None, device="cpu",
                    dtype=torch.float32) -> MatrixProjection:
    """The DLDR basis of a run directory (its leading ``dim`` principal directions).

    Raises:
        ConfigError: D outside (0, N], no run directory, or its basis is of a model with another number of
            parameters (a basis run of another model).
    """
    from raysub.pipeline.basis import load_basis

    check_dim("dldr", num_params, dim)
    if run_dir is None:
        raise ConfigError(NO_RUN)
    basis_DN = load_basis(run_dir, dim)
    if basis_DN.shape[1] != num_params:
        raise ConfigError(other_model(getattr(run_dir, "uri", run_dir), basis_DN.shape[1], num_params))
    return MatrixProjection(torch.from_numpy(basis_DN).to(device), dtype=dtype)
