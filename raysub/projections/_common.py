"""Pieces shared by the projection families: seeded generators, the fast Walsh–Hadamard transform and the
check of the subspace dimension D.

Shape suffixes (`raysub.engine.flat`'s legend): N the flat parameters, D the subspace dimension; ``_L`` a
transform's length L, a power of two (``H_L``: the L×L Hadamard matrix).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Tuple

import numpy as np
import torch
from raysub.errors import ConfigError


def generator(seed: int, *stream: int, device="cpu") -> torch.Generator:
    """A torch generator for (seed, *stream): independent streams per family, chunk or component, so a
    projection is a pure function of its seed (regenerated, never stored)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(s) for s in stream]]).generate_state(2, np.uint64)
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(state[0] >> np.uint64(1)))
    return gen


def rademacher(n: int, gen: torch.Generator, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """n independent ±1 signs."""
    return torch.randint(0, 2, (n,), generator=gen, device=device).to(dtype).mul_(2).sub_(1)


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@lru_cache(maxsize=32)
def _hadamard(k: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(device)


def _factors(m: int, bits: int = 6) -> Tuple[int, ...]:
    """Split 2^m into Kronecker factors of at most 2^bits (H_{2^m} = H_{k1} ⊗ H_{k2} ⊗ …)."""
    out, left = [], m
    while left > 0:
        b = min(bits, left)
        out.append(1 << b)
        left -= b
    return tuple(out)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform along the last axis (length a power of two): H x with H_ij = ±1.

    H_L is the Kronecker product of small Hadamard matrices, so the transform is a few dense GEMMs with
    k×k factors (k ≤ 64) instead of log₂L radix-2 passes over memory — 4 passes for L = 2^24.
    """
    L = x.shape[-1]
    m = int(round(math.log2(L))) if L > 0 else 0
    assert 1 << m == L, f"fwht needs a power-of-two length, got {L}"
    lead = x.shape[:-1]
    y = x.reshape(-1, L)
    rows = y.shape[0]
    right = L
    for k in _factors(m):
        right //= k
        h = _hadamard(k, str(y.device), y.dtype)
        if right == 1:
            y = (y.reshape(-1, k) @ h).reshape(rows, L)
        else:
            y = torch.matmul(h, y.reshape(-1, k, right)).reshape(rows, L)
    return y.reshape(*lead, L)


def dim_problems(family: str, num_params: int, dim: int, *, full: bool = False, bounded: bool = True) -> List[str]:
    """What is wrong with D = ``dim`` for ``family`` (one line each; empty: fine).

    Args:
        full: the full-training family (identity): D must equal N.
        bounded: D must also be ≤ N (every random family: a subspace is smaller than the space).
    """
    if full:
        return [] if dim == num_params else [
            f"projection {family!r} needs train.dim = the model's {num_params} parameters, got {dim}"]
    if dim <= 0:
        return [f"projection {family!r}: train.dim={dim} must be > 0"]
    if bounded and dim > num_params:
        return [f"projection {family!r}: train.dim={dim} exceeds the model's {num_params} parameters: "
                f"a subspace must be smaller than the space"]
    return []


def check_dim(family: str, num_params: int, dim: int, *, full: bool = False) -> None:
    """`dim_problems` as an exception: a random family needs 0 < D ≤ N, the full-training family D = N.

    Raises:
        ConfigError: D out of range.
    """

    problems = dim_problems(family, num_params, dim, full=full)
    if problems:
        raise ConfigError(problems)
