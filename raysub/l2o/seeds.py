"""The optimizees' seeds: which serial numbers are trained on, which meta-validate, and the seed of each.

Shared by meta-training (`raysub.l2o.optimizee`) and meta-testing (`raysub.l2o.metatest`), which must agree on them
(meta-test seeds are never trained or validated on), so they live below both.
"""
from __future__ import annotations

SEED_STRIDE = 1_000_003  # optimizee seed = l2o.seed · stride + serial
VALIDATION_SERIAL = 500_000  # validation optimizees: serials from here on, never trained on


def optimizee_seed(cfg, serial: int) -> int:
    """The data-order and z0 seed of optimizee number ``serial`` under ``cfg.l2o.seed``."""
    return cfg.l2o.seed * SEED_STRIDE + serial
