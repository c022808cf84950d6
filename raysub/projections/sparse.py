"""``sparse`` — a very sparse random projection (Li, Hastie & Church, 2006), as used by Li et al. (2018).

Every column has s = round(√N) nonzeros (density ≈ 1/√N) at rows drawn from the seed, with random signs;
duplicate rows are merged and each column is scaled to unit norm. Stored as three flat arrays (rows, cols,
values; D·√N entries), never as an N×D matrix; lift and project are one gather and one ``index_add_`` each
(torch.sparse's backward is unreliable, and the adjoint here is exact by construction: both use the same
triplets).
"""
from __future__ import annotations

import math

import torch

from raysub.projections.base import PROJECTIONS, Projection, no_checks
from raysub.projections._common import check_dim, generator

STREAM = 0x5BA55E


class SparseProjection(Projection):
    def __init__(self, num_params: int, dim: int, seed: int, device="cpu", dtype=torch.float32):
        self.num_params, self.dim, self.seed = num_params, dim, seed
        per_col = max(1, min(num_params, round(math.sqrt(num_params))))
        gen = generator(seed, STREAM)
        rows = torch.randint(0, num_params, (dim, per_col), generator=gen)
        signs = torch.randint(0, 2, (dim, per_col), generator=gen).to(torch.float64).mul_(2).sub_(1)
        cols = torch.arange(dim).unsqueeze(1).expand(dim, per_col)
        key = (cols * num_params + rows).reshape(-1)
        key, inverse = torch.unique(key, sorted=True, return_inverse=True)
        vals = torch.zeros(len(key), dtype=torch.float64).index_add_(0, inverse, signs.reshape(-1))
        keep = vals != 0
        key, vals = key[keep], vals[keep]
        cols, rows = key // num_params, key % num_params
        norms = torch.zeros(dim, dtype=torch.float64).index_add_(0, cols, vals.square()).sqrt()
        vals = vals / norms[cols]
        # row-sorted for lift's scatter locality; int32 indices halve the memory where N allows it
        order = torch.argsort(rows)
        index_dtype = torch.int32 if num_params < 2**31 else torch.int64
        self.rows = rows[order].to(index_dtype).to(device)
        self.cols = cols[order].to(index_dtype).to(device)
        self.vals = vals[order].to(dtype).to(device)

    @property
    def nnz(self) -> int:
        return self.vals.numel()

    def lift_add_(self, z_D: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        contrib = self.vals.to(out_N.dtype) * z_D.to(out_N.dtype).index_select(0, self.cols)
        return out_N.index_add_(0, self.rows, contrib)

    def lift(self, z_D: torch.Tensor) -> torch.Tensor:
        return self.lift_add_(z_D, torch.zeros(self.num_params, dtype=z_D.dtype, device=z_D.device))

    def project(self, g_N: torch.Tensor) -> torch.Tensor:
        contrib = self.vals.to(g_N.dtype) * g_N.index_select(0, self.rows)
        return torch.zeros(self.dim, dtype=g_N.dtype, device=g_N.device).index_add_(0, self.cols, contrib)


@PROJECTIONS.register("sparse", random=True, needs_basis_run=False, full=False, low_memory=True, check=no_checks)
def sparse_projection(num_params: int, dim: int, seed: int = 0, *, run_dir=None, device="cpu",
                      dtype=torch.float32) -> SparseProjection:
    """≈√N signed nonzeros per column, unit-norm columns, D·√N memory."""
    check_dim("sparse", num_params, dim)
    return SparseProjection(num_params, dim, seed, device, dtype)
