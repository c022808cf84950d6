"""The one protocol every optimizer of z follows, and the registry it is chosen from.

A loop drives every optimizer the same way, once per step::

    stats = opt.step(z, g, loss, closure)

``z`` (D floats) is updated in place; ``g`` = Pᵀ∇L(z) and ``loss`` = L(z) are *global* (averaged over the DDP
ranks, so every rank passes the same values and takes the same step); ``closure`` evaluates the same batch at
other points (`BatchClosure`: the loss, the projected gradient, the class-gradient sums) — P-BFGS uses it for its
line search, class-gradient QN for its class gradients, the first-order optimizers ignore it. The return value
is this step's statistics (a possibly empty dict of numbers). ``set_lr`` applies the loop's schedule,
``state_dict``/``load_state_dict`` round-trip everything the optimizer holds through a checkpoint, and
``counters`` are cumulative statistics the loop reports once per epoch (``{}`` when there are none).

A factory is registered with ``@OPTIMIZERS.register(name)`` and has the signature
``(z, *, lr, momentum, weight_decay, **options)``: ``lr``, ``momentum`` and ``weight_decay`` come from the
``train`` section (every optimizer receives them, and documents which it uses); the rest are the optimizer's own
options, given as ``train.optimizer_options`` and checked against the signature (names and types) before
anything starts. An optional ``check`` hook registered with the factory (``check=fn``, ``fn(options) -> [problem]``)
checks option values. Shape suffixes follow `raysub.engine.flat`'s legend (``z_D``: D floats).
``ignores=("momentum",)`` names the ``train`` options the factory does not use: one set in
the config gets a one-line warning when the optimizer is built (`ignored_options`).
"""
from __future__ import annotations

import abc
import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from raysub.errors import ConfigError
from raysub.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
COMMON_ARGS = ("lr", "momentum", "weight_decay")  # from the train section; the rest are optimizer_options


class BatchClosure(abc.ABC):
    """Extra evaluations of the current step's batch at other points z (global values, same on every rank).

    Evaluations leave no trace: BatchNorm running statistics are restored, and the loop sets z again before
    anything else uses the model. They are not free under DDP: each is one all-reduce (1 float for `loss`,
    D+1 for `grad`), counted in the run's ``allreduce_floats_per_step``.
    """

    @abc.abstractmethod
    def loss(self, z_D: torch.Tensor) -> float:
        """L(z) on this batch, no gradient."""

    @abc.abstractmethod
    def grad(self, z_D: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """(L(z), Pᵀ∇L(z)) on this batch."""

    def class_sums(self, z_D: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Projected class-gradient sums on this batch (class-gradient QN); see `raysub.engine.task`."""
        raise NotImplementedError(f"{type(self).__name__} has no class-gradient sums")


class SubspaceOptimizer(abc.ABC):
    """Base class of the protocol (see the module docstring)."""

    lr: float = 0.0

    def set_lr(self, lr: float) -> None:
        self.lr = float(lr)

    def set_horizon(self, steps: int) -> None:
        """The run's length in steps, given once before the first step (a learned optimizer reads the fraction of
        it done; the others ignore it)."""

    @abc.abstractmethod
    def step(self, z_D: torch.Tensor, g_D: torch.Tensor, loss: float,
             closure: Optional[BatchClosure] = None) -> Dict[str, float]:
        """Update ``z_D`` in place; return this step's statistics."""

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        ...

    @abc.abstractmethod
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        ...

    def counters(self) -> Dict[str, float]:
        """Cumulative statistics reported once per epoch (``{}``: none)."""
        return {}


def check_optimizer(name: str, options: Dict[str, Any]) -> List[str]:
    """Problems with ``train.optimizer`` = ``name`` and its ``train.optimizer_options`` (empty list: fine)."""
    if name not in OPTIMIZERS:
        return [f"train.optimizer: unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS.names())}"]
    try:
        OPTIMIZERS.check_options(name, options, skip=1, internal=COMMON_ARGS)
    except ConfigError as exc:
        return [f"train.optimizer_options: {p}" for p in exc.problems]
    hook = OPTIMIZERS.meta(name).get("check")
    return [f"train.optimizer_options.{p}" for p in hook(options)] if hook else []


def ignored_options(name: str, train) -> List[str]:
    """One-line warnings for the ``train`` options that optimizer ``name`` does not use (its registered
    ``ignores``) but ``train`` sets: a value other than the option's default and other than 0 (0 is "off", what
    the optimizer does anyway). The config does not record which keys the YAML or an override gave, so the default
    given explicitly (``train.momentum=0.9``) is not told apart from no value and gets no warning."""
    defaults = {f.name: f.default for f in dataclasses.fields(train)} if dataclasses.is_dataclass(train) else {}
    lines = []
    for key in OPTIMIZERS.meta(name).get("ignores", ()):
        value = getattr(train, key)
        if value != 0 and value != defaults.get(key):
            lines.append(f"train.{key}={value} is ignored by the {name} optimizer (it has no {key}): leave it "
                         f"unset or choose an optimizer that uses it")
    return lines


def build_optimizer(name: str, z_D: torch.Tensor, train) -> SubspaceOptimizer:
    """The optimizer ``name`` over ``z_D`` with the ``train`` section's lr, momentum, weight decay and options.

    Raises:
        ConfigError: an unknown name or bad options.
    """
    problems = check_optimizer(name, train.optimizer_options)
    if problems:
        raise ConfigError(problems)
    for line in ignored_options(name, train):
        warnings.warn(line, stacklevel=2)
    return OPTIMIZERS.get(name)(z_D, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
                                **train.optimizer_options)
