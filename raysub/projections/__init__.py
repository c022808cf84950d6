"""Projection families, one file each; importing this package registers them all in `PROJECTIONS`.

| family   | P (N×D)                                   | memory            | lift / project cost      |
|----------|-------------------------------------------|-------------------|--------------------------|
| dense    | Gaussian, unit-norm columns (Li et al.)   | N·D, or streamed  | N·D                      |
| sparse   | ±1 on ≈√N rows per column, unit norm      | D·√N              | D·√N                     |
| fastfood | H G Π H B, zero-padded to 2^⌈log₂N⌉       | O(N)              | O(N log N)               |
| fastjl   | P H D of the FastJL report                | O(N)              | O(N + D log D)           |
| dldr     | trajectory PCA basis (DLDR)               | N·D (stored run)  | N·D                      |
| identity | I (D = N): full-parameter training        | none              | N                        |
"""
from raysub.projections import dense, dldr, fastfood, fastjl, identity, sparse  # noqa: F401
