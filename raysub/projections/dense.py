"""``dense`` — a Gaussian random basis with unit-norm columns (Li et al., 2018, §2).

P_ij ~ N(0, 1), then every column scaled to unit length in R^N. P is a pure function of the seed: it is drawn
in blocks of `CHUNK_ROWS` rows, each block from its own generator stream (seed, block), so any block can be
regenerated alone. When N·D floats fit in ``max_bytes`` the matrix is kept on the device (one GEMV per lift
and per project); otherwise it is *streamed*: every lift and project regenerates it block by block and holds
one block (CHUNK_ROWS × D) at a time — O(N + D) memory, at the price of redrawing N·D normals per call.
Both modes give the same matrix for the same seed and device (in float64 bit for bit: both scale by float64
inverse column norms; in float32 to float32 rounding). Registered ``random``; ``low_memory`` only when
streamed (``low_memory_options``).

Shape suffixes (`raysub.engine.flat`'s legend): ``_N`` the flat parameters, ``_D`` the subspace coordinates,
``_DN`` P stored D×N (row j is column j of P); a block is CHUNK_ROWS × D.
"""
from __future__ import annotations

import torch

from raysub.projections.base import PROJECTIONS, MatrixProjection, Projection, no_checks
from raysub.projections._common import check_dim, generator

CHUNK_ROWS = 1 << 14
STREAM = 0xDE45E


def _block(seed: int, index: int, rows: int, dim: int, device) -> torch.Tensor:
    gen = generator(seed, STREAM, index, device=device)
    return torch.randn(rows, dim, generator=gen, device=device)


def _blocks(num_params: int):
    for index, start in enumerate(range(0, num_params, CHUNK_ROWS)):
        yield index, start, min(start + CHUNK_ROWS, num_params)


def column_norms(num_params: int, dim: int, seed: int, device) -> torch.Tensor:
    """‖P_:,j‖ of the unnormalized Gaussian matrix (one generation pass, D floats kept)."""
    sumsq = torch.zeros(dim, dtype=torch.float64, device=device)
    for index, start, stop in _blocks(num_params):
        sumsq += _block(seed, index, stop - start, dim, device).double().square().sum(0)
    return sumsq.sqrt()


class StreamedDenseProjection(Projection):
    """The dense family without storing P: regenerated block by block on every call."""

    def __init__(self, num_params: int, dim: int, seed: int, device="cpu"):
        self.num_params, self.dim, self.seed, self.device = num_params, dim, seed, torch.device(device)
        # float64, like `materialize`'s: cast to the call's dtype, so float64 calls give the stored matrix to ~1e-16
        self.inv_norm_D = column_norms(num_params, dim, seed, self.device).reciprocal()

    def lift(self, z_D: torch.Tensor) -> torch.Tensor:
        return self.lift_add_(z_D, torch.zeros(self.num_params, dtype=z_D.dtype, device=z_D.device))

    def lift_add_(self, z_D: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        w = (z_D.to(out_N.dtype) * self.inv_norm_D.to(out_N.dtype))
        for index, start, stop in _blocks(self.num_params):
            block = _block(self.seed, index, stop - start, self.dim, self.device).to(out_N.dtype)
            out_N[start:stop].addmv_(block, w)
        return out_N

    def project(self, g_N: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(self.dim, dtype=g_N.dtype, device=g_N.device)
        for index, start, stop in _blocks(self.num_params):
            block = _block(self.seed, index, stop - start, self.dim, self.device).to(g_N.dtype)
            acc.addmv_(block.t(), g_N[start:stop])
        return acc * self.inv_norm_D.to(g_N.dtype)


def materialize(num_params: int, dim: int, seed: int, device="cpu", dtype=torch.float32, rows=None) -> torch.Tensor:
    """The D×N matrix (rows = unit basis vectors), built block by block from the same streams; with ``rows`` =
    (start, stop) only those parameter rows of P (a D×(stop−start) slice: a sharded worker's), bit for bit the
    same columns of the whole matrix (the column norms still take one generation pass over all of P, D floats
    kept)."""
    lo, hi = rows if rows is not None else (0, num_params)
    inv = column_norms(num_params, dim, seed, device).reciprocal()
    basis_DN = torch.empty(dim, hi - lo, dtype=dtype, device=device)
    for index, start, stop in _blocks(num_params):
        if stop <= lo or start >= hi:
            continue
        block = _block(seed, index, stop - start, dim, device)[max(lo, start) - start : min(hi, stop) - start]
        basis_DN[:, max(lo, start) - lo : min(hi, stop) - lo] = (block.double() * inv).t().to(dtype)
    return basis_DN


def stored_bytes(num_params: int, dim: int, options, itemsize: int) -> int:
    """Bytes of P a worker holds replicated: N·D·itemsize when it is kept (≤ ``max_bytes``), 0 when streamed."""
    size = num_params * dim * itemsize
    return size if size <= int(options.get("max_bytes", DEFAULT_MAX_BYTES)) else 0


DEFAULT_MAX_BYTES = 1 << 30


@PROJECTIONS.register("dense", random=True, needs_basis_run=False, full=False, low_memory=False,
                      low_memory_options={"max_bytes": 0}, check=no_checks, stored_bytes=stored_bytes)
def dense_projection(num_params: int, dim: int, seed: int = 0, *, run_dir=None, device="cpu",
                     dtype=torch.float32, rows=None, max_bytes: int = DEFAULT_MAX_BYTES) -> Projection:
    """Gaussian basis, unit-norm columns; kept on the device when N·D·itemsize ≤ ``max_bytes`` (default
    1 GiB), streamed from the seed otherwise (``max_bytes=0`` always streams). ``rows`` = (start, stop): a kept
    P's rows of that slice only (`materialize`), for a sharded worker."""
    check_dim("dense", num_params, dim)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if stored_bytes(num_params, dim, {"max_bytes": max_bytes}, itemsize):
        return MatrixProjection(materialize(num_params, dim, seed, device, dtype, rows), dtype=dtype, seed=seed)
    return StreamedDenseProjection(num_params, dim, seed, device)
