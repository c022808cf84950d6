"""The ``l2o`` section of a config: its checks (`l2o_problems`), φ's config (`opt_config`) and φ's start
(`initial_phi`) — shared by meta-training (`raysub.l2o.meta_train`), its optimizee actors
(`raysub.l2o.optimizee`), tuning (`raysub.l2o.tune`) and meta-testing."""
from __future__ import annotations

from typing import Dict, List

import torch

from raysub.config import positive
from raysub.errors import ConfigError
from raysub.l2o.lstm import LearnedOptimizerConfig, adam_like_params, init_params


def l2o_problems(cfg) -> List[str]:
    """Problems of the ``l2o`` section (one line each); empty: fine."""
    lc = cfg.l2o
    problems: List[str] = []
    for key in ("hidden_size", "step_scale", "meta_lr", "unroll", "steps", "optimizees", "actors",
                "cpus_per_actor", "meta_steps", "validate_every", "validation_optimizees", "grad_clip"):
        positive(problems, f"l2o.{key}", getattr(lc, key))
    positive(problems, "l2o.z0_std", lc.z0_std, allow_zero=True)
    positive(problems, "l2o.init_gain", lc.init_gain)
    if not 0 <= lc.select_tolerance <= 1:
        problems.append(f"l2o.select_tolerance={lc.select_tolerance}: must be in [0, 1] (an accuracy difference, "
                        f"e.g. 0.005 for half a point)")
    if lc.unroll > 0 and lc.steps > 0 and lc.unroll > lc.steps:
        problems.append(f"l2o.unroll={lc.unroll} exceeds l2o.steps={lc.steps}: an unroll (T) is part of one "
                        f"optimizee's N steps; lower l2o.unroll or raise l2o.steps")
    if lc.actors > 0 and lc.optimizees > 0 and lc.actors > lc.optimizees:
        problems.append(f"l2o.actors={lc.actors} exceeds l2o.optimizees={lc.optimizees}: an actor would own no "
                        f"optimizee; lower l2o.actors or raise l2o.optimizees")
    if lc.meta_loss not in ("sum", "log"):
        problems.append(f"l2o.meta_loss={lc.meta_loss!r}: choose sum (Σ L_t, SL2O) or log (Σ log L_t)")
    positive(problems, "l2o.late_weight", lc.late_weight, allow_zero=True)
    positive(problems, "l2o.validation_steps", lc.validation_steps)
    positive(problems, "l2o.pes_sigma", lc.pes_sigma)
    if lc.select_by not in ("speed", "final_loss"):
        problems.append(f"l2o.select_by={lc.select_by!r}: choose speed or final_loss")
    if lc.estimator not in ("tbptt", "pes"):
        problems.append(f"l2o.estimator={lc.estimator!r}: choose tbptt or pes")
    elif lc.estimator == "pes" and lc.optimizees % 2:
        problems.append(f"l2o.optimizees={lc.optimizees} with l2o.estimator=pes: pes runs antithetic pairs of "
                        f"optimizees: give an even number")
    hs = list(lc.horizons)
    if hs and not (len(hs) == 2 and all(isinstance(h, int) and not isinstance(h, bool) for h in hs)
                   and lc.unroll <= hs[0] <= hs[1]):
        problems.append(f"l2o.horizons={hs}: give [lo, hi], whole steps with l2o.unroll ({lc.unroll}) ≤ lo ≤ hi, "
                        f"e.g. [50, 1000]; or [] for l2o.steps")
    if lc.init not in ("adam_like", "random"):
        problems.append(f"l2o.init={lc.init!r}: choose adam_like or random")
    elif lc.init == "adam_like" and lc.rule == "lstm" and "m" not in lc.features:
        problems.append(f"l2o.init=adam_like needs the 'm' feature (l2o.features={list(lc.features)}): add it or "
                        f"set l2o.init=random")
    if cfg.data.val_fraction <= 0:
        problems.append("data.val_fraction=0: meta-validation selects φ on a held-out validation split, never on "
                        "test; set data.val_fraction (e.g. 0.1)")
    try:
        opt_config(cfg)
    except ConfigError as exc:
        problems += [f"l2o.{p}" for p in exc.problems]
    except TypeError as exc:
        problems.append(f"l2o: {exc}")
    return problems


def opt_config(cfg) -> LearnedOptimizerConfig:
    """φ's config from the ``l2o`` section."""
    lc = cfg.l2o
    if lc.rule == "adam_schedule":  # Adam†'s moments and ε (raysub.optim.first_order.adam at momentum 0.9)
        return LearnedOptimizerConfig(hidden_size=lc.hidden_size, features=tuple(lc.features), rule=lc.rule,
                                      adam_lr=lc.adam_lr, per_coordinate=lc.per_coordinate, beta1=0.9, beta2=0.999,
                                      eps=1e-8)
    return LearnedOptimizerConfig(hidden_size=lc.hidden_size, features=tuple(lc.features), step_scale=lc.step_scale,
                                  rule=lc.rule)


INIT_NOISE = 0.1  # adam_like: the input and output weights of hidden units 1.. start at 0.1 × torch's random init


def initial_phi(cfg) -> Dict[str, torch.Tensor]:
    """φ's start. ``l2o.rule=adam_schedule``: torch's LSTMCell init with a zero output row, so the multiplier is
    1 and the first steps are exactly Adam's (``l2o.init`` does not apply). ``random``: torch's LSTMCell init from ``l2o.seed``. ``adam_like``: the hand-built tanh-clipped
    Adam (`adam_like_params`: Δz ≈ −step_scale·tanh(init_gain·m̂/√v̂), on hidden unit 0 alone) with the input
    weights (``lstm.weight_ih``) and output weights of units 1.. set to ``INIT_NOISE`` × the random init.

    Without that the other units would stay at 0 for good (their h is 0, so their output weights get no
    gradient, and nothing reaches their input weights through a zero output weight). Biases and recurrent
    weights stay 0, so those units' h is an odd function of the features — a step of ~1e-3 × m̂/√v̂, with no
    constant drift (noise on the biases would push every coordinate the same way every step: it wrecks the
    start, measured val accuracy 0.36 instead of 0.90 on Fashion-MNIST LeNet-5 d = 40)."""
    config = opt_config(cfg)
    rand = init_params(config, seed=cfg.l2o.seed)
    if config.rule == "adam_schedule":  # multiplier e^0 = 1: exactly Adam at l2o.adam_lr, whatever the LSTM says
        rand["out.weight"].zero_()
        rand["sched.weight"].zero_()
        return rand
    if cfg.l2o.init == "random":
        return rand
    phi = adam_like_params(config, gain=cfg.l2o.init_gain)
    h = config.hidden_size
    others = torch.ones(h, dtype=torch.bool)
    others[0] = False
    rows = others.repeat(4)  # gate rows i, f, g, o of units 1..
    phi["lstm.weight_ih"][rows] = INIT_NOISE * rand["lstm.weight_ih"][rows]
    phi["out.weight"][others] = INIT_NOISE * rand["out.weight"][others]
    return phi
