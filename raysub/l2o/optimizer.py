"""The learned optimizer behind the one protocol: ``train.optimizer: l2o`` with ``train.optimizer_options.weights``.

Meta-testing is then an ordinary ``raysub train``. Each step calls the same pure `raysub.l2o.lstm.update` that
meta-training differentiates, on the global (all-reduced) gradient, so every DDP rank computes the same Δz.

The learning rate and its schedule: ``train.lr`` is the reference lr0, and the step at learning rate lr is

    Δz = (lr / lr0) · step_scale · tanh(w_outᵀ h)

so at the start of a run (lr = lr0, whatever its value) the step is exactly the meta-trained one, and the
schedule (``train.lr_milestones``, ``train.lr_gamma``) multiplies it: after a decay by 0.1 the learned step is
0.1× as long. The LSTM's inputs and state do not see the lr. ``train.momentum`` and ``train.weight_decay`` are
not used (the learned rule has its own moments; a non-zero weight decay is ignored with a warning).
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Dict, List, Optional

import torch

from raysub.errors import ConfigError
from raysub.l2o.lstm import State, update
from raysub.l2o.weights import load_learned_optimizer, weights_problems
from raysub.optim.base import OPTIMIZERS, BatchClosure, SubspaceOptimizer
from raysub.l2o.lstm import init_state

SATURATED = 0.99  # |tanh| above this: the coordinate's step is at the step-scale cap


class LearnedOptimizer(SubspaceOptimizer):
    """Steps z with φ (see the module docstring).

    Args:
        z_D: The coefficients (their size, dtype and device).
        config, params: φ (`raysub.l2o.lstm`); cast to z's dtype and device.
        lr: The reference lr0 (``train.lr``): `set_lr` scales the step by lr / lr0.

    State: the moments m, v, the step count t, the LSTM's h and c (all D-sized), and the count of saturated
    coordinate-steps; `counters` reports {"steps", "saturated"}.
    """

    def __init__(self, z_D: torch.Tensor, config, params: Dict[str, torch.Tensor], lr: float = 1.0):

        if not lr > 0:
            raise ConfigError(f"train.lr={lr}: the l2o optimizer scales its step by lr / train.lr, so train.lr "
                              f"must be > 0")
        self.config = config
        self.params = {k: v.detach().to(dtype=z_D.dtype, device=z_D.device) for k, v in params.items()}
        self.lr0 = self.lr = float(lr)
        self.state: State = init_state(config, len(z_D), z_D.dtype, z_D.device)
        self.saturated = 0

    def set_horizon(self, steps: int) -> None:
        """The run's length in steps: φ's ``progress`` input is the fraction of it done (the loop calls this
        once, before the first step: ``train.epochs`` × steps per epoch)."""
        self.state["horizon"] = int(steps)

    @torch.no_grad()
    def step(self, z_D: torch.Tensor, g_D: torch.Tensor, loss: float,
             closure: Optional[BatchClosure] = None) -> Dict[str, float]:
        """z += (lr/lr0) · Δz(φ, g).

        Returns:
            {"dz_norm": ‖applied Δz‖, "saturated": fraction of coordinates at the step cap}.
        """
        if self.config.needs_horizon and not self.state.get("horizon"):
            raise ConfigError("the l2o weights read the fraction of the run done (feature 'progress'): the loop "
                              "must give the run's length (set_horizon), or set train.optimizer_options.horizon")
        delta_D, self.state = update(self.params, self.config, g_D, self.state)
        delta_D = delta_D * (self.lr / self.lr0)
        z_D.add_(delta_D.to(z_D.dtype))
        cap = self.config.step_scale if self.config.rule == "lstm" else float("inf")  # adam_schedule: no cap
        sat = int((delta_D.abs() > SATURATED * cap * self.lr / self.lr0).sum())
        self.saturated += sat
        return {"dz_norm": float(delta_D.norm()), "saturated": sat / max(len(z_D), 1)}

    def state_dict(self) -> Dict[str, Any]:
        s = self.state
        return {"m": s["m"].clone(), "v": s["v"].clone(), "t": int(s["t"]), "h": s["h"].clone(),
                "c": s["c"].clone(), "horizon": s.get("horizon"), "saturated": self.saturated}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore `state_dict`'s output.

        Raises:
            ConfigError: the checkpoint's state does not fit these weights and z (another hidden size or d).
        """
        mine = self.state
        for k in ("m", "v", "h", "c"):
            if tuple(state[k].shape) != tuple(mine[k].shape):
                raise ConfigError(f"the checkpoint's l2o state {k} has shape {tuple(state[k].shape)}, these weights "
                                  f"and z need {tuple(mine[k].shape)}: resume with the weights it was trained with")
        ref = mine["m"]
        self.state = {**{k: state[k].to(dtype=ref.dtype, device=ref.device).clone() for k in ("m", "v", "h", "c")},
                      "t": int(state["t"]), "horizon": state.get("horizon", mine.get("horizon"))}
        self.saturated = int(state.get("saturated", 0))

    def counters(self) -> Dict[str, float]:
        return {"steps": int(self.state["t"]), "saturated": self.saturated}


def _check(options: Dict[str, Any]) -> List[str]:
    if "weights" not in options:
        return ["weights: required: the learned optimizer's weights.pt (a path or URI; a run directory holding "
                "l2o/weights.pt also works)"]
    if not isinstance(options["weights"], str):
        return []  # the signature check reports the type
    return [f"weights: {p}" for p in
            weights_problems(options["weights"], hidden_size=options.get("hidden_size"),
                             features=options.get("features"))]


@OPTIMIZERS.register("l2o", check=_check)
def l2o(z, *, lr: float, momentum: float, weight_decay: float, weights: str, hidden_size: Optional[int] = None,
        features: Optional[List[str]] = None, horizon: Optional[int] = None, adam_lr: Optional[float] = None):
    """The learned optimizer (SL2O) with φ from ``weights`` (path or URI of weights.pt, or a run directory).

    ``hidden_size`` and ``features`` are optional expectations: weights meta-trained otherwise are refused.
    ``horizon``: the run's length in steps, for weights that read the fraction done (a training loop sets it
    itself from ``train.epochs``). ``adam_lr``: for ``adam_schedule`` weights on another task, the Adam lr φ's
    multiplier applies to (that task's tuned Adam† lr; default: the one φ was meta-trained with). The
    step is (lr / train.lr) · step_scale · tanh(...) (see `raysub.l2o.optimizer`); momentum is not used, a
    non-zero weight decay is ignored with a warning.
    """
    if weight_decay:
        warnings.warn(f"train.weight_decay={weight_decay} is ignored by the l2o optimizer (its rule is learned)",
                      stacklevel=2)
    config, params = load_learned_optimizer(weights, hidden_size=hidden_size, features=features)
    if adam_lr is not None:
        if config.rule != "adam_schedule":
            raise ConfigError(f"train.optimizer_options.adam_lr={adam_lr}: these weights use the {config.rule} rule; "
                              f"adam_lr applies to adam_schedule weights only")
        config = replace(config, adam_lr=float(adam_lr))
    opt = LearnedOptimizer(z, config, params, lr=lr)
    if horizon:
        opt.set_horizon(horizon)
    return opt
