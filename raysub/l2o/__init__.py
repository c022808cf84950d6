"""The learned optimizer of the subspace coefficients (SL2O): φ, its weights on disk, the registered ``l2o``
optimizer and the meta-gradient of an unroll.

- `lstm`      — `LearnedOptimizerConfig`, φ's tensors (`init_params`, `adam_like_params`), the state, the
                features and the ONE pure step ``update(φ, config, g, state) -> (Δz, state)``;
- `weights`   — ``weights.pt`` = {"config", "params"} through the run-directory storage (path or URI), with
                one-line errors for missing weights or a config other than the caller expects;
- `optimizer` — ``l2o`` in `raysub.optim.OPTIMIZERS` (the optimizer protocol over `update`; lr / train.lr
                scales the learned step);
- `meta`      — `unroll_meta_grad`: T steps, the meta-loss and dMeta/dφ through the D-dimensional chain only.

The workflows, imported by name (not here): `setup` (the ``l2o`` section's checks, φ's config and start),
`optimizee` (the optimizees and their Ray actor), `learner` (combine, the meta-optimizer step, select),
`meta_train` (the meta-training loop), `tune`, `metatest`.
"""
from raysub.l2o.lstm import (
    FEATURES, LearnedOptimizerConfig, adam_like_params, features, init_params, init_state, lstm_cell, moments,
    param_shapes, update,
)
from raysub.l2o.weights import load_learned_optimizer, save_learned_optimizer, weights_problems
from raysub.l2o.meta import Unroll, start, unroll_meta_grad
from raysub.l2o.optimizer import LearnedOptimizer

__all__ = [  # the package's API, re-exported from the modules that define it
    "FEATURES", "LearnedOptimizerConfig", "adam_like_params", "features", "init_params", "init_state", "lstm_cell",
    "moments", "param_shapes", "update", "load_learned_optimizer", "save_learned_optimizer", "weights_problems",
    "Unroll", "start", "unroll_meta_grad", "LearnedOptimizer",
]
