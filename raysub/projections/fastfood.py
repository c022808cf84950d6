"""``fastfood`` — one global Fastfood transform over the whole flat parameter vector (Le et al., 2013, as
used for subspaces by Li et al., 2018).

With L = 2^⌈log₂N⌉, z ∈ R^D zero-padded to R^L, and H the unnormalized L×L Walsh–Hadamard matrix:

    P z = s · (H G Π H B c z)[:N]

B: ±1 diagonal, Π: a random permutation, G: Gaussian diagonal, s = 1/√(N·‖G‖²). Every column of H G Π H B has
squared norm exactly L·‖G‖², but its N kept rows hold only N/L of it in expectation: with c = 1 the columns of P
have unit norm only up to O(1/√N) — measured max |‖P_j‖ − 1| over 3 seeds × 100–1000 columns: 12% at
N = 100, 8% at 300, 1.5–2.5% at 1000–10,000, 1.2% at 20,000, 0.9% at 40,000, 0.4% at 100,000. So c is the
diagonal of the exact inverse column norms of s·(H G Π H B)[:N] whenever D·L ≤ `EXACT_NORM_WORK` = 2^24, which
covers every N ≤ 4096, and D ≤ 2^24/L above (`column_norms`, once at build, in float64: the work of about D
lifts and ~80 MB for the moment); beyond it c = 1. c is folded into B, so lift and project cost the same.
The adjoint runs the same factors backwards, Pᵀ g = s · (c B H Πᵀ G H [g; 0])[:D], exactly. Memory O(L) (B, G,
Π and Π⁻¹); lift and project cost two FWHTs of length L (O(N log N)), whatever D.

Shape suffixes (`raysub.engine.flat`'s legend): ``_N`` the flat parameters (``g_N``, ``out_N``, ``base_N`` =
θ0), ``_D`` the subspace coordinates (``z_D``); L = 2^⌈log₂N⌉ is the padded length of the transforms.
"""
from __future__ import annotations

import torch
from torch.nn.functional import one_hot

from raysub.projections.base import PROJECTIONS, Projection, no_checks
from raysub.projections._common import check_dim, fwht, generator, next_pow2, rademacher

STREAM = 0xFA57F00D
EXACT_NORM_WORK = 1 << 24  # D·L up to which the column norms are computed exactly (the work of ~D lifts)


class FastfoodProjection(Projection):
    def __init__(self, num_params: int, dim: int, seed: int, device="cpu", dtype=torch.float32):
        self.num_params, self.dim, self.seed = num_params, dim, seed
        self.L = L = next_pow2(num_params)
        gen = generator(seed, STREAM)
        self.B = rademacher(dim, gen, dtype=torch.float64)
        perm = torch.randperm(L, generator=gen)
        index_dtype = torch.int32 if L < 2**31 else torch.int64
        # Π for lift and Πᵀ = Π⁻¹ for project, both as gathers (index_select takes int32; index_copy_ would need
        # an int64 copy of the permutation on every call)
        self.perm = perm.to(index_dtype)
        self.inv_perm = torch.argsort(perm).to(index_dtype)
        self.G = torch.randn(L, generator=gen, dtype=torch.float64)
        self.scale = float(1.0 / torch.sqrt(num_params * self.G.square().sum()))
        if dim * L <= EXACT_NORM_WORK:
            self.B /= self.column_norms()  # B c: every column of P has norm 1
        # computed on the CPU in float64 before the move: the same P on every worker and device
        self.B, self.G = self.B.to(dtype).to(device), self.G.to(dtype).to(device)
        self.perm, self.inv_perm = self.perm.to(device), self.inv_perm.to(device)

    def column_norms(self) -> torch.Tensor:
        """‖P e_j‖ for every column j, by lifting the unit vectors in batches of at most 2^20 floats (8 MB; the
        FWHT of fewer rows is slower per row, the build's peak is ~10 such buffers)."""
        batch = max(1, (1 << 20) // self.L)
        cols = torch.arange(self.dim, device=self.G.device)
        return torch.cat([self._forward(one_hot(cols[start : start + batch], self.dim).to(self.G.dtype)).norm(dim=-1)
                          for start in range(0, self.dim, batch)])

    def _forward(self, z_D: torch.Tensor) -> torch.Tensor:
        """(H G Π H B z)[:N] · s, in z's dtype; z may carry leading batch dimensions."""
        dt = z_D.dtype
        u = torch.zeros(*z_D.shape[:-1], self.L, dtype=dt, device=z_D.device)
        u[..., : self.dim] = z_D * self.B.to(dt)
        u = fwht(u).index_select(-1, self.perm)
        u.mul_(self.G.to(dt))
        u = fwht(u)
        return u[..., : self.num_params].mul_(self.scale)

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
    """Global Fastfood transform, O(N) memory; unit-norm columns, exactly when D·2^⌈log₂N⌉ ≤ 2^24."""
    check_dim("fastfood", num_params, dim)
    return FastfoodProjection(num_params, dim, seed, device, dtype)
