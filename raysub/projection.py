"""Projections: a map between subspace coefficients z ∈ R^D and parameter offsets Δθ ∈ R^N.

``lift(z) = P z`` and ``project(g) = Pᵀ g`` are exact adjoints: ⟨lift(z), g⟩ = ⟨z, project(g)⟩. Training
evaluates the model at θ = θ0 + lift(z) and trains z with the projected gradient, which is the gradient of the
loss with respect to z (chain rule through a linear map).

Families register with `PROJECTIONS.register(name)`; a factory takes
``(num_params, dim, seed, *, run_dir=None, device="cpu", dtype=torch.float32)``.
"""
from __future__ import annotations

import abc
from typing import Optional

import torch

from raysub.registry import Registry

PROJECTIONS: Registry = Registry("projection family")
FACTORY_ARGS = ("run_dir", "device", "dtype")  # what the training loop passes; the rest are user options


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


# the families register themselves on import (one file each under raysub/projections/)
from raysub import projections as _families  # noqa: E402,F401
