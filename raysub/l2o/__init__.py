"""The learned optimizer of the subspace coefficients (SL2O): φ, its weights on disk, the registered ``l2o``
optimizer and the meta-gradient of an unroll.

- `lstm`      — `LearnedOptimizerConfig`, φ's tensors (`init_params`, `adam_like_params`), the state, the
                features and the ONE pure step ``update(φ, config, g, state) -> (Δz, state)``;
- `weights`   — ``weights.pt`` = {"config", "params"} through the run-directory storage (path or URI), with
                one-line errors for missing weights or a config other than the caller expects;
- `optimizer` — ``l2o`` in `raysub.optim.OPTIMIZERS` (the optimizer protocol over `update`; lr / train.lr
                scales the learned step);
- `meta`      — `unroll_meta_grad`: T steps, the meta-loss and dMeta/dφ through the D-dimensional chain only.
"""
from raysub.l2o.lstm import (  # noqa: F401
    FEATURES, LearnedOptimizerConfig, adam_like_params, features, init_params, init_state, lstm_cell, moments,
    param_shapes, update,
)
from raysub.l2o.weights import load_learned_optimizer, save_learned_optimizer, weights_problems  # noqa: F401
from raysub.l2o.meta import Unroll, start, unroll_meta_grad  # noqa: F401
from raysub.l2o.optimizer import LearnedOptimizer  # noqa: F401,E402
