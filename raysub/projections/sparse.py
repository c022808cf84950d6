"""``sparse`` — a very sparse random projection (Li, Hastie & Church, 2006), as used by Li et al. (2018).

Every column has s = round(√N) nonzeros ±1/√s (density ≈ 1/√N) at s distinct rows drawn from the seed, with
random signs, so every column has norm 1 exactly (`distinct_entries`: drawing with replacement would let a
repeated row's ±1 entries cancel, and at N ≤ 20 leave whole columns at zero). Stored as three flat arrays (rows,
cols, values; D·√N entries), never as an N×D matrix; lift and project are one gather and one ``index_add_``
each (torch.sparse's backward is unreliable, and the adjoint here is exact by construction: both use the same
triplets).

Shape suffixes (`raysub.engine.flat`'s legend): ``_N`` the flat parameters (``g_N``, ``out_N``), ``_D`` the
subspace coordinates (``z_D``); the triplets hold D·s entries.
"""
from __future__ import annotations

import math

import torch

from raysub.projections.base import PROJECTIONS, Projection, no_checks
from raysub.projections._common import check_dim, generator

STREAM = 0x5BA55E


def distinct_entries(num_params: int, dim: int, per_col: int, gen: torch.Generator) -> torch.Tensor:
    """The nonzeros' positions as keys row·D + column, ascending (by row, then column): ``per_col`` distinct
    rows in [0, ``num_params``) in each of the ``dim`` columns.

    Drawn with replacement, then every repeat within a column is redrawn (against the column's other rows and
    the other redraws) until none is left: a pure function of the generator's state, so the same on every
    worker. One sort of the D·s keys, which also gives lift its row order; the redraws (≈ s²/2N per column)
    are merged into the sorted keys by binary search.
    """
    cols = torch.arange(dim).repeat_interleave(per_col)
    keys = (torch.randint(0, num_params, (dim * per_col,), generator=gen) * dim + cols).sort().values
    repeat = keys[1:] == keys[:-1]
    missing = keys[1:][repeat] % dim  # the columns that lost an entry
    keys = keys[torch.cat([torch.tensor([True]), ~repeat])]
    while missing.numel():
        new = (torch.randint(0, num_params, (missing.numel(),), generator=gen) * dim + missing).sort().values
        at = torch.searchsorted(keys, new)
        taken = keys[at.clamp(max=keys.numel() - 1)] == new
        taken[1:] |= new[1:] == new[:-1]
        missing, new, at = new[taken] % dim, new[~taken], at[~taken]
        merged = torch.empty(keys.numel() + new.numel(), dtype=keys.dtype)
        at += torch.arange(new.numel())  # where each new key lands among the old ones
        merged[at] = new
        old = torch.ones(merged.numel(), dtype=torch.bool)
        old[at] = False
        merged[old] = keys
        keys = merged
    return keys


class SparseProjection(Projection):
    def __init__(self, num_params: int, dim: int, seed: int, device="cpu", dtype=torch.float32):
        self.num_params, self.dim, self.seed = num_params, dim, seed
        per_col = max(1, min(num_params, round(math.sqrt(num_params))))
        gen = generator(seed, STREAM)
        keys = distinct_entries(num_params, dim, per_col, gen)  # row-sorted: lift's scatter locality
        signs = torch.randint(0, 2, (keys.numel(),), generator=gen).to(torch.float64).mul_(2).sub_(1)
        index_dtype = torch.int32 if num_params < 2**31 else torch.int64  # int32 halves the memory where it can
        self.rows = (keys // dim).to(index_dtype).to(device)
        self.cols = (keys % dim).to(index_dtype).to(device)
        self.vals = signs.div_(math.sqrt(per_col)).to(dtype).to(device)

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
