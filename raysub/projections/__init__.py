"""Projection families: the linear map θ = θ0 + P z between the d subspace coefficients and the N parameters.

`base.py` holds the `Projection` interface (``lift`` = P z, ``project`` = Pᵀ g, exact adjoints), the explicit
`MatrixProjection`, the `PROJECTIONS` registry and `check_projection`; every family is one file here with one
``register`` call that also declares what the family is — ``random``, ``needs_basis_run``, ``full``,
``low_memory`` (see base.py) — and its own ``check``, so callers validate any family with
``check_projection(name, num_params, dim, options, basis_run)`` before Ray starts. Importing this package
registers them all. Shape suffixes follow `raysub.engine.flat`'s legend: N parameters, D subspace coordinates.

| family   | P (N×D)                                   | memory            | lift / project cost      |
|----------|-------------------------------------------|-------------------|--------------------------|
| dense    | Gaussian, unit-norm columns (Li et al.)   | N·D, or streamed  | N·D                      |
| sparse   | ±1 on ≈√N rows per column, unit norm      | D·√N              | D·√N                     |
| fastfood | H G Π H B, zero-padded to 2^⌈log₂N⌉       | O(N)              | O(N log N)               |
| fastjl   | P H D of the FastJL report                | O(N)              | O(N + D log D)           |
| dldr     | trajectory PCA basis (DLDR)               | N·D (stored run)  | N·D                      |
| identity | I (D = N): full-parameter training        | none              | N                        |
"""
from raysub.projections.base import (
    FACTORY_ARGS, PROJECTIONS, MatrixProjection, Projection, check_projection, no_checks, stored_bytes,
)
from raysub.projections import dense, dldr, fastfood, fastjl, identity, sparse  # noqa: F401 — each registers itself

__all__ = [  # the package's API, re-exported from the modules that define it
    "FACTORY_ARGS", "PROJECTIONS", "MatrixProjection", "Projection", "check_projection", "no_checks",
    "stored_bytes",
]
