"""Optimizers of the subspace coefficients z, all behind one protocol (`base.py`) and one registry.

- `base`        — the protocol (``step(z, g, loss, closure) -> stats``, ``set_lr``, ``state_dict``), the closure
                  of extra same-batch evaluations, `OPTIMIZERS`, option checks, `build_optimizer`;
- `first_order` — SGD†, Momentum† (P-SGD, the DLDR default), Adam†, RMSprop†: torch's optimizers over z;
- `pbfgs`       — P-BFGS (DLDR Algorithm 2) with its same-batch Armijo line search;
- `cgqn`        — class-gradient quasi-Newton (Tuddenham et al.), its class gradients from the step's closure;
                  over the full parameters with the ``identity`` projection, the paper's setting;
- `raysub.l2o.optimizer` — ``l2o``, the learned optimizer (SL2O), in its own package with meta-training.
Importing this package registers its own optimizers; ``l2o`` is registered by `raysub.plugins` (which imports every
plug-in: look names up after importing it), since ``raysub.l2o`` builds on `base` and importing it here would
make the two packages import each other.
"""
from raysub.optim.base import (
    COMMON_ARGS,
    OPTIMIZERS,
    BatchClosure,
    SubspaceOptimizer,
    build_optimizer,
    check_optimizer,
)
from raysub.optim import cgqn, first_order, pbfgs  # noqa: F401  each registers its optimizers
from raysub.optim.pbfgs import PBFGS

__all__ = [  # the package's API, re-exported from the modules that define it
    "COMMON_ARGS", "OPTIMIZERS", "BatchClosure", "SubspaceOptimizer", "build_optimizer", "check_optimizer", "PBFGS",
]
