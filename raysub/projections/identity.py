"""``identity`` — P = I with D = N: training z is ordinary full-parameter training from θ0.

The sweep's full-training baseline runs through the same loop as every subspace trial with this family, so
the baseline and the subspace runs differ only in P. Registered ``full`` (callers set D = N) and ``low_memory``
(it holds nothing).

Shape suffixes (`raysub.engine.flat`'s legend): ``_N`` the flat parameters (``g_N``, ``out_N``, ``base_N`` =
θ0), ``_D`` the coordinates (``z_D``), here D = N.
"""
from __future__ import annotations

import torch

from raysub.projections.base import PROJECTIONS, Projection, no_checks
from raysub.projections._common import check_dim


class IdentityProjection(Projection):
    def __init__(self, num_params: int):
        self.num_params = self.dim = num_params

    def lift(self, z_D: torch.Tensor) -> torch.Tensor:
        return z_D.clone()

    def project(self, g_N: torch.Tensor) -> torch.Tensor:
        return g_N.clone()

    def lift_add_(self, z_D, out_N):
        return out_N.add_(z_D.to(out_N.dtype))

    def affine_(self, z_D, base_N, out_N):
        return torch.add(base_N, z_D.to(out_N.dtype), out=out_N)


@PROJECTIONS.register("identity", random=False, needs_basis_run=False, full=True, low_memory=True, check=no_checks)
def identity_projection(num_params: int, dim: int, seed: int = 0, *, run_dir=None, device="cpu",
                        dtype=torch.float32) -> IdentityProjection:
    """Full-parameter training; ``dim`` must equal the number of parameters."""
    check_dim("identity", num_params, dim, full=True)
    return IdentityProjection(num_params)
