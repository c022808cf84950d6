"""``dldr`` — the trajectory basis of a sampled run (DLDR): the leading principal directions of the SGD
trajectory, built by `raysub basis` and read from the run directory (``train.basis_run``).

Registered ``needs_basis_run``; its ``check`` (`basis_run_problems`) reads only the run's small JSON files, so a
missing basis, a basis of another model, or too few stored components is reported before Ray starts.

Option ``scale``: ``none`` (default; z_i is the offset along the unit vector u_i, the paper's coordinates) or
``std`` (z_i is measured in units of the trajectory's standard deviation along u_i, s_i = σ_i/√T from
``basis/spectrum.json``: P = [s_1 u_1 … s_D u_D]). The trajectory's directions differ in extent by the ratio of
their singular values (45× over 40 components on Fashion-MNIST LeNet-5); with ``std`` every coordinate spans
about one unit over the sampled window, which is what an optimizer that starts from an isotropic guess — P-BFGS's
B0 = I, P-SGD's single learning rate — assumes. It is the diagonal preconditioner diag(s²), the trajectory's
covariance in the basis, applied as a change of coordinates, so every optimizer sees it and P stays an exact
adjoint pair (``project`` = ``lift``ᵀ).
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional

import numpy as np
import torch

from raysub.runs import basis as run_basis  # the stored basis and its spectrum, through the run-directory service
from raysub.errors import ConfigError
from raysub.projections.base import PROJECTIONS, MatrixProjection
from raysub.projections._common import check_dim
from raysub.storage import RunDir

NO_RUN = ("projection 'dldr' needs a sampled run with a basis: set train.basis_run=RUN_DIR (made by 'raysub run' "
          "or 'raysub sample' + 'raysub basis')")


def other_model(run: str, stored: Any, num_params: int) -> str:
    """The one-line error for a basis run of a different model."""
    return (f"train.basis_run={run} is a {stored}-parameter model, this model has {num_params}: use the same "
            f"data and model as that run, or sample a new run for this model")


SCALES = ("none", "std")


def scale_problems(options: Mapping[str, Any]) -> List[str]:
    scale = options.get("scale", "none")
    if scale not in SCALES:
        return [f"scale={scale!r}: choose one of {', '.join(SCALES)} (std: coordinates in units of the "
                f"trajectory's standard deviation along each basis vector)"]
    return []


def coordinate_scales(spectrum: Mapping[str, Any], dim: int, scale: str) -> np.ndarray:
    """s_1..s_D of ``scale`` (see the module docstring): ones for ``none``, σ_i/√T for ``std``."""
    if scale == "none":
        return np.ones(dim)
    sv = np.asarray(spectrum["singular_values"][:dim], dtype=np.float64)
    return sv / np.sqrt(float(spectrum["num_snapshots"]))


def basis_run_problems(num_params: int, dim: int, options: Mapping[str, Any], basis_run: Optional[str]) -> List[str]:
    """The family's ``check``: ``scale`` is known, ``basis_run`` is given, has a basis (basis/spectrum.json), is a
    run of a ``num_params``-parameter model, and stores at least ``dim`` components."""
    bad_scale = scale_problems(options)
    if bad_scale:
        return bad_scale
    if not basis_run:
        return [NO_RUN]
    run = RunDir(basis_run)
    spec = run_basis.read_spectrum(run)
    if spec is None:
        return [f"train.basis_run={basis_run} has no basis (no basis/spectrum.json): run 'raysub basis "
                f"{basis_run}' first"]
    problems = []
    stored_n = run_basis.read_num_params(run)
    if stored_n is not None and stored_n != num_params:
        problems.append(other_model(basis_run, stored_n, num_params))
    stored = spec["dim"]
    if dim > stored:
        problems.append(f"train.dim={dim} exceeds the {stored} components of the stored basis in {basis_run}: "
                        f"rebuild it with 'raysub basis {basis_run} basis.dim={dim} --overwrite'")
    return problems


def stored_bytes(num_params: int, dim: int, options: Mapping[str, Any], itemsize: int) -> int:
    """A worker holds the whole basis (N·D·itemsize) unless it is sharded."""
    return num_params * dim * itemsize


@PROJECTIONS.register("dldr", random=False, needs_basis_run=True, full=False, low_memory=False,
                      check=basis_run_problems, stored_bytes=stored_bytes)
def dldr_projection(num_params: int, dim: int, seed: int = 0, *, run_dir=None, device="cpu",
                    dtype=torch.float32, rows=None, scale: str = "none") -> MatrixProjection:
    """The DLDR basis of a run directory (its leading ``dim`` principal directions), each scaled by ``scale``
    (see the module docstring); with ``rows`` = (start, stop) only those parameter rows, read from the stored
    blocks that hold them (a sharded worker's; ``scale`` multiplies each component, so it applies per block).

    Raises:
        ConfigError: D outside (0, N], no run directory, an unknown ``scale``, or its basis is of a model with
            another number of parameters (a basis run of another model).
    """
    check_dim("dldr", num_params, dim)
    if run_dir is None:
        raise ConfigError(NO_RUN)
    if scale_problems({"scale": scale}):
        raise ConfigError([f"train.projection_options.{p}" for p in scale_problems({"scale": scale})])
    if rows is not None:
        stored_n = run_basis.read_num_params(RunDir(run_dir) if isinstance(run_dir, str) else run_dir)
        if stored_n is not None and stored_n != num_params:
            raise ConfigError(other_model(getattr(run_dir, "uri", run_dir), stored_n, num_params))
    basis_DN = run_basis.load_basis(run_dir, dim) if rows is None else run_basis.load_basis(run_dir, dim, rows)
    if basis_DN.shape[1] != (num_params if rows is None else rows[1] - rows[0]):
        raise ConfigError(other_model(getattr(run_dir, "uri", run_dir), basis_DN.shape[1], num_params))
    if scale != "none":
        run = RunDir(run_dir) if isinstance(run_dir, str) else run_dir
        s_D = coordinate_scales(run_basis.read_spectrum(run), dim, scale)
        basis_DN = basis_DN * s_D[:, None].astype(basis_DN.dtype)
    return MatrixProjection(torch.from_numpy(basis_DN).to(device), dtype=dtype)
