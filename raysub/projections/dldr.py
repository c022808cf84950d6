"""``dldr`` — the trajectory basis of a sampled run (DLDR): the leading principal directions of the SGD
trajectory, built by `raysub basis` and read from the run directory."""
from __future__ import annotations

import torch

from raysub.projection import PROJECTIONS, MatrixProjection


@PROJECTIONS.register("dldr")
def dldr_projection(num_params: int, dim: int, seed: int = 0, *, run_dir=None, device="cpu",
                    dtype=torch.float32) -> MatrixProjection:
    """The DLDR basis of a run directory (its leading ``dim`` principal directions)."""
    from raysub.basis import load_basis

    if run_dir is None:
        from raysub.errors import ConfigError

        raise ConfigError("projection 'dldr' needs a run directory with a basis: run 'raysub basis RUN_DIR' first")
    basis_DN = load_basis(run_dir, dim)
    assert basis_DN.shape == (dim, num_params), (basis_DN.shape, dim, num_params)
    return MatrixProjection(torch.from_numpy(basis_DN).to(device), dtype=dtype)
