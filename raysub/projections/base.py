"""Projections: a map between subspace coefficients z ∈ R^D and parameter offsets Δθ ∈ R^N.

``lift(z) = P z`` and ``project(g) = Pᵀ g`` are exact adjoints: ⟨lift(z), g⟩ = ⟨z, project(g)⟩. Training
evaluates the model at θ = θ0 + lift(z) and trains z with the projected gradient, which is the gradient of the
loss with respect to z (chain rule through a linear map).

A family is one file with one ``@PROJECTIONS.register(name, **meta)`` call on a factory taking
``(num_params, dim, seed, *, run_dir=None, device="cpu", dtype=torch.float32, **options)``; everything after
`FACTORY_ARGS` is a user option (``train.projection_options``), checked by name and type against the
annotations. Every family declares this metadata (read with ``PROJECTIONS.meta(name)``):

- ``random`` (bool): P is drawn from the seed — a pure function of (seed, N, D); 0 < D ≤ N is required, and
  the shared tests check seed determinism and unit-norm columns.
- ``needs_basis_run`` (bool): P is read from a sampled run's basis (``train.basis_run``; ``raysub basis``).
- ``full`` (bool): P = I and D = N — full-parameter training, the sweep's baseline (callers set D = N).
- ``low_memory`` (bool): with its default options the family holds no N×D tensor (O(N) or D·√N memory).
- ``low_memory_options`` (dict, optional): options under which a family that is not ``low_memory`` by
  default holds no N×D tensor (``dense``: ``{"max_bytes": 0}``, streamed).
- ``check``: ``check(num_params, dim, options, basis_run) -> List[str]``, the family's own one-line problems
  beyond the shared ones (`no_checks`: none).
- ``stored_bytes`` (optional): ``stored_bytes(num_params, dim, options, itemsize) -> int``, the bytes of the
  N×D matrix a worker holds replicated (0: none, e.g. streamed). A family that declares it takes the factory
  argument ``rows`` = (start, stop) and then returns a `MatrixProjection` of only those parameter rows of P
  (``train.projection_sharding``, `raysub.engine.sharded`); the other families are O(N) already.

`check_projection` runs all of it before Ray starts, so config, pipeline and sweep need no per-family code.

Shape suffixes (`raysub.engine.flat`'s legend): ``_N`` the flat parameters (``g_N``, ``out_N``, ``base_N`` = θ0),
``_D`` the subspace coordinates (``z_D``), ``_DN`` a basis stored D×N (row j is column j of P).
"""
from __future__ import annotations

import abc
from typing import Any, Dict, List, Mapping, Optional

import torch

from raysub.registry import Registry
from raysub.errors import ConfigError, StorageError
from raysub.projections._common import dim_problems

PROJECTIONS: Registry = Registry("projection family")
FACTORY_ARGS = ("run_dir", "device", "dtype", "rows")  # what the training loop passes; the rest are user options
META_FLAGS = ("random", "needs_basis_run", "full", "low_memory")  # the bools every family declares


def no_checks(num_params: int, dim: int, options: Mapping[str, Any], basis_run: Optional[str]) -> List[str]:
    """The ``check`` of a family with nothing to check beyond the shared checks of `check_projection`."""
    return []


def check_projection(name: str, num_params: int, dim: int, options: Optional[Dict[str, Any]],
                     basis_run: Optional[str]) -> List[str]:
    """Problems with training in the ``dim``-dimensional ``name`` subspace of a ``num_params``-parameter model
    (empty: fine), one line each, unprefixed (callers add ``train.projection_options:`` or the trial's key).

    Checks, without starting Ray or building P: that the family exists; its ``options`` (names and types
    against the factory's signature); D (0 < D ≤ N for a random family, D > 0 for any other, D = N for the
    full-training family); and the family's own ``check`` hook (``dldr``: ``basis_run`` has a basis of this
    model with at least D components).
    """

    try:
        meta = PROJECTIONS.meta(name)
    except ConfigError as exc:  # unknown family: the message lists the known ones
        return list(exc.problems)
    options = dict(options or {})
    problems: List[str] = []
    try:
        PROJECTIONS.check_options(name, options, skip=3, internal=FACTORY_ARGS)
    except ConfigError as exc:
        problems += exc.problems
    problems += dim_problems(name, num_params, dim, full=bool(meta.get("full")), bounded=bool(meta.get("random")))
    hook = meta.get("check") or no_checks
    try:
        problems += hook(num_params, dim, options, basis_run)
    except (ConfigError, StorageError) as exc:  # e.g. an unreadable run directory
        problems += exc.problems
    return problems


def stored_bytes(name: str, num_params: int, dim: int, options: Optional[Dict[str, Any]], itemsize: int) -> int:
    """Bytes of P one worker holds replicated in the ``dim``-dimensional ``name`` subspace (0: the family holds no
    N×D matrix, or not with these options)."""
    hook = PROJECTIONS.meta(name).get("stored_bytes")
    return int(hook(num_params, dim, dict(options or {}), itemsize)) if hook else 0


class Projection(abc.ABC):
    """R^D → R^N linear map and its adjoint."""

    dim: int
    num_params: int
    seed: Optional[int] = None

    @abc.abstractmethod
    def lift(self, z_D: torch.Tensor) -> torch.Tensor:
        """Δθ = P z, shape (N,)."""

    @abc.abstractmethod
    def project(self, g_N: torch.Tensor) -> torch.Tensor:
        """g̃ = Pᵀ g, shape (D,)."""

    def lift_add_(self, z_D: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        """``out += P z`` in place; families override it to avoid an N-sized temporary."""
        return out_N.add_(self.lift(z_D).to(out_N.dtype))

    def affine_(self, z_D: torch.Tensor, base_N: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        """``out = base + P z`` in place (θ = θ0 + P z); families may fuse it into one pass."""
        out_N.copy_(base_N)
        return self.lift_add_(z_D, out_N)


class MatrixProjection(Projection):
    """An explicit basis held as a D×N matrix (rows are basis vectors), e.g. the DLDR trajectory basis.

    Args:
        basis_DN: Rows are the basis vectors u_1..u_D.
        dtype: Storage dtype on the device (float32, or bfloat16 to halve memory traffic).
    """

    def __init__(self, basis_DN: torch.Tensor, dtype: torch.dtype = torch.float32, seed: Optional[int] = None):
        self.basis_DN = basis_DN.to(dtype).contiguous()
        self.dim, self.num_params = self.basis_DN.shape
        self.seed = seed

    def lift(self, z_D: torch.Tensor) -> torch.Tensor:
        return (self.basis_DN.t() @ z_D.to(self.basis_DN.dtype)).to(z_D.dtype)

    def project(self, g_N: torch.Tensor) -> torch.Tensor:
        return (self.basis_DN @ g_N.to(self.basis_DN.dtype)).to(g_N.dtype)

    def lift_add_(self, z_D: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        if self.basis_DN.dtype == out_N.dtype:
            # addmv writes straight into out: no N-sized temporary
            return torch.addmv(out_N, self.basis_DN.t(), z_D.to(out_N.dtype), out=out_N)
        return out_N.add_(self.lift(z_D.to(self.basis_DN.dtype)).to(out_N.dtype))

    def affine_(self, z_D: torch.Tensor, base_N: torch.Tensor, out_N: torch.Tensor) -> torch.Tensor:
        if self.basis_DN.dtype == out_N.dtype:
            # one pass over θ0, P and θ: no copy, no temporary
            return torch.addmv(base_N, self.basis_DN.t(), z_D.to(out_N.dtype), out=out_N)
        return super().affine_(z_D, base_N, out_N)

