"""``fastfood`` — one global Fastfood transform over the whole flat parameter vector (Le et al., 2013, as
used for subspaces by Li et al., 2018).

With L = 2^⌈log₂N⌉, z ∈ R^D zero-padded to R^L, and H the unnormalized L×L Walsh–Hadamard matrix:

    P z = s · (H G Π H B z)[:N]

B: ±1 diagonal, Π: a random permutation, G: Gaussian diagonal, s = 1/√(N·‖G‖²). Every column of
H G Π H B has squared norm exactly L·‖G‖² and its N kept rows hold N/L of it in expectation, so the columns of
P have unit norm up to O(1/√N) — the same scale as `dense`. The adjoint runs the same factors backwards,
Pᵀ g = s · (B H Πᵀ G H [g; 0])[:D], exactly. Memory O(L) (B, G, Π and Π⁻¹); lift and project cost two FWHTs of
length L (O(N log N)), whatever D.
"""
from __future__ import annotations

import torch

from raysub.projections.base import PROJECTIONS, Projection, no_checks
from raysub.projections._common import check_dim, fwht, generator, next_pow2, rademacher

STREAM = 0xFA57F00D


class FastfoodProjection(Projection):
    def __init__(self, num_params: int, dim: int, seed: int, device="cpu", dtype=torch.float32):
        self.num_params, self.dim, self.seed = num_params, dim, seed
        self.L = L = next_pow2(num_params)
        gen = generator(seed, STREAM)
        self.B = rademacher(dim, gen, dtype=dtype).to(device)
        perm = torch.randperm(L, generator=gen)
        index_dtype = torch.int32 if L < 2**31 else torch.int64
        # Π for lift and Πᵀ = Π⁻¹ for project, both as gathers (index_select takes int32; index_copy_ would need
        # an int64 copy of the permutation on every call)
        self.perm = perm.to(index_dtype).to(device)
        self.inv_perm = torch.argsort(perm).to(index_dtype).to(device)
        G = torch.randn(L, generator=gen, dtype=torch.float64)
        self.scale = float(1.0 / torch.sqrt(num_params * G.square().sum()))
        self.G = G.to(dtype).to(device)

    def _forward(self, z_D: torch.Tensor) -> torch.Tensor:
        """(H G Π H B z)[:N] · s, in z's dtype."""
        dt = z_D.dtype
        u = torch.zeros(self.L, dtype=dt, device=z_D.device)
        u[: self.dim] = z_D * self.B.to(dt)
        u = fwht(u).index_select(0, self.perm)
        u.mul_(self.G.to(dt))
        u = fwht(u)
        return u[: self.num_params].mul_(self.scale)

    def lift(self, z_D: torch.Tensor) -> torch.Tensor:
        return self._forward(z_D).clone()

    def lift_add_(self, z_D: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        return out_N.add_(self._forward(z_D.to(out_N.dtype)))

    def affine_(self, z_D: torch.Tensor, base_N: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        return torch.add(base_N, self._forward(z_D.to(out_N.dtype)), out=out_N)

    def project(self, g_N: torch.Tensor) -> torch.Tensor:
        dt = g_N.dtype
        v = torch.zeros(self.L, dtype=dt, device=g_N.device)
        v[: self.num_params] = g_N
        v = fwht(v).mul_(self.G.to(dt))
        w = fwht(v.index_select(0, self.inv_perm))
        return w[: self.dim].mul_(self.B.to(dt)).mul_(self.scale)


@PROJECTIONS.register("fastfood", random=True, needs_basis_run=False, full=False, low_memory=True,
                      check=no_checks)
def fastfood_projection(num_params: int, dim: int, seed: int = 0, *, run_dir=None, device="cpu",
                        dtype=torch.float32) -> FastfoodProjection:
    """Global Fastfood transform, O(N) memory, unit-norm columns (≈)."""
    check_dim("fastfood", num_params, dim)
    return FastfoodProjection(num_params, dim, seed, device, dtype)
