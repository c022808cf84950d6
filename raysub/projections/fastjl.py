"""``fastjl`` — the FastJL projection of the seed report (Gargiulo, 2023; Ailon & Chazelle, 2006): P H D.

    P z = s · p ⊙ (H D [z; 0])[c]

- D: ±1 diagonal on R^D (z zero-padded to L = 2^⌈log₂D⌉); H: the *normalized* L×L Walsh–Hadamard matrix,
  so H D is orthogonal.
- P (the report's sparse Gaussian, here one entry per parameter): p_i = b_i r_i with b_i ~ Bernoulli(q) and
  r_i ~ N(0, 1/q), q = min(1, c·ln²(n)/D). Constants as the report states them: c = 2 and n = the number of
  points the embedding must preserve, which the report takes to be the training-set size (60,000 for
  (Fashion-)MNIST; option ``points``). A fraction 1 − q of the parameters has p_i = 0 and never moves: the
  report's "highly sparse, high values" regime when D grows (q = 0.24 at D = 1000, 0.024 at D = 10,000).
- c: which of the L coordinates of H D z parameter i reads. The report's code reads coordinate i mod L, which
  *tiles* θ with period L: parameters L apart always move by the same coordinate, so a layer whose width is a
  multiple of L gets identical update patterns in every block of L weights. The default here
  (``index="shuffled"``) gives each coordinate the same number of parameters (⌊N/L⌋ or ⌈N/L⌉) but draws
  which ones from the seed (concatenated random permutations of [0, L)), removing the period;
  ``index="mod"`` reproduces the report.
- s = √(L / Σp_i²): every column of P has norm exactly 1 (each has squared norm Σp_i²/L, since every entry
  of the normalized H is ±1/√L), the same scale as `dense`.

Memory O(N) (p and c); lift is one FWHT of length L plus a gather over N; project is a scatter-add over N
plus one FWHT of length L. Exact adjoint: project runs the same factors transposed.

Shape suffixes (`raysub.engine.flat`'s legend): ``_N`` the flat parameters (``g_N``, ``out_N``, ``base_N`` =
θ0), ``_D`` the subspace coordinates (``z_D``), ``_L`` the padded length L = 2^⌈log₂D⌉ (``w_L``).
"""
from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional

import torch

from raysub.errors import ConfigError
from raysub.projections.base import PROJECTIONS, Projection
from raysub.projections._common import check_dim, fwht, generator, next_pow2, rademacher

STREAM = 0xFA57B1
REPORT_C = 2.0
REPORT_POINTS = 60_000


def density(dim: int, points: int = REPORT_POINTS, c: float = REPORT_C) -> float:
    """q = min(1, c·ln²(points)/D): the chance a parameter takes part in the subspace."""
    return min(1.0, c * math.log(points) ** 2 / dim)


class FastJLProjection(Projection):
    def __init__(self, num_params: int, dim: int, seed: int, device="cpu", dtype=torch.float32,
                 points: int = REPORT_POINTS, index: str = "shuffled"):
        self.num_params, self.dim, self.seed, self.index_mode = num_params, dim, seed, index
        self.L = L = next_pow2(dim)
        self.q = q = density(dim, points)
        gen = generator(seed, STREAM)
        self.D = rademacher(dim, gen, dtype=dtype).to(device)
        keep = torch.rand(num_params, generator=gen) < q
        p = torch.randn(num_params, generator=gen, dtype=torch.float64).mul_(1.0 / math.sqrt(q)) * keep
        total = float(p.square().sum())
        self.scale = math.sqrt(L / total) if total > 0 else 0.0
        self.p = p.to(dtype).to(device)
        if index == "mod":
            self.c = None
        else:
            reps = -(-num_params // L)
            c = torch.cat([torch.randperm(L, generator=gen) for _ in range(reps)])[:num_params] if L > 1 \
                else torch.zeros(num_params, dtype=torch.int64)
            self.c = c.to(torch.int32 if L < 2**31 else torch.int64).to(device)

    def _coords(self, z_D: torch.Tensor) -> torch.Tensor:
        """(H D [z; 0]) ∈ R^L, normalized H."""
        u = torch.zeros(self.L, dtype=z_D.dtype, device=z_D.device)
        u[: self.dim] = z_D * self.D.to(z_D.dtype)
        return fwht(u).mul_(1.0 / math.sqrt(self.L))

    def _gather(self, w_L: torch.Tensor) -> torch.Tensor:
        if self.c is None:
            reps = -(-self.num_params // self.L)
            return w_L.repeat(reps)[: self.num_params]
        return w_L.index_select(0, self.c)

    def lift(self, z_D: torch.Tensor) -> torch.Tensor:
        return self._gather(self._coords(z_D)).mul_(self.p.to(z_D.dtype)).mul_(self.scale)

    def lift_add_(self, z_D: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        w = self._gather(self._coords(z_D.to(out_N.dtype)))
        return out_N.addcmul_(self.p.to(out_N.dtype), w, value=self.scale)

    def affine_(self, z_D: torch.Tensor, base_N: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        w = self._gather(self._coords(z_D.to(out_N.dtype)))
        return torch.addcmul(base_N, self.p.to(out_N.dtype), w, value=self.scale, out=out_N)

    def project(self, g_N: torch.Tensor) -> torch.Tensor:
        pg = g_N * self.p.to(g_N.dtype)
        if self.c is None:
            reps = -(-self.num_params // self.L)
            v = torch.zeros(reps * self.L, dtype=g_N.dtype, device=g_N.device)
            v[: self.num_params] = pg
            v = v.view(reps, self.L).sum(0)
        else:
            v = torch.zeros(self.L, dtype=g_N.dtype, device=g_N.device).index_add_(0, self.c, pg)
        v = fwht(v).mul_(1.0 / math.sqrt(self.L))
        return v[: self.dim].mul_(self.D.to(g_N.dtype)).mul_(self.scale)


def fastjl_problems(num_params: int, dim: int, options: Mapping[str, Any], basis_run: Optional[str]) -> List[str]:
    """The family's ``check``: ``index`` is "shuffled" or "mod", ``points`` ≥ 2 (values of the right type only:
    a wrong type is reported by the shared option check)."""
    problems = []
    index, points = options.get("index", "shuffled"), options.get("points", REPORT_POINTS)
    if isinstance(index, str) and index not in ("shuffled", "mod"):
        problems.append(f"projection 'fastjl': index={index!r}: choose 'shuffled' or 'mod'")
    if isinstance(points, int) and not isinstance(points, bool) and points < 2:
        problems.append(f"projection 'fastjl': points={points} must be ≥ 2 (the training-set size)")
    return problems


@PROJECTIONS.register("fastjl", random=True, needs_basis_run=False, full=False, low_memory=True,
                      check=fastjl_problems)
def fastjl_projection(num_params: int, dim: int, seed: int = 0, *, run_dir=None, device="cpu",
                      dtype=torch.float32, points: int = REPORT_POINTS, index: str = "shuffled") -> FastJLProjection:
    """The report's P H D; ``points``: n in q = 2 ln²(n)/D; ``index``: "shuffled" (default) or "mod" (the
    report's tiling)."""
    check_dim("fastjl", num_params, dim)
    problems = fastjl_problems(num_params, dim, {"index": index, "points": points}, None)
    if problems:
        raise ConfigError(problems)
    return FastJLProjection(num_params, dim, seed, device, dtype, points, index)
