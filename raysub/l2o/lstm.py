"""The learned optimizer φ: a coordinate-wise LSTM over the d coefficients, and its one pure update.

Each coefficient z_i is one row of the LSTM's batch and every row shares the weights, so one φ serves any d
(SL2O §4.1, after Andrychowicz et al.). Per coordinate the LSTM reads the features of SL2O Algorithm 1 — the
bias-corrected moments m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ) of the gradient g = Pᵀ∇L, as ``m`` = m̂/√(v̂+ε) and
``g`` = g/√(v̂+ε) — and writes one step::

    Δz = step_scale · tanh(w_outᵀ h),     (h, c) = LSTMCell(features, (h, c))

`update` is the single definition of that step: meta-training differentiates through it and the registered
optimizer ``l2o`` (`raysub.l2o.optimizer`) calls it, so what is meta-trained is what is meta-tested. It is pure —
φ is a dict of tensors, the state a dict, nothing is written in place — so it composes with autograd and
``torch.func``.

Shapes: D = number of coefficients (LSTM batch rows), F = number of features, H = hidden size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from raysub.errors import ConfigError

# name → the per-coordinate feature from (g, m̂, v̂, ε, progress); all are scale-invariant in g (a loss ×k leaves
# them). ``progress`` is the fraction of the run done before the step, (t − 1) / T (T: the run's length in steps,
# `init_state`'s ``horizon``), capped at 1: the same for every coordinate (VeLO and Celo feed it too).
FEATURES: Dict[str, Callable[..., torch.Tensor]] = {
    "m": lambda g, m_hat, v_hat, eps, progress: m_hat / torch.sqrt(v_hat + eps),
    "g": lambda g, m_hat, v_hat, eps, progress: g / torch.sqrt(v_hat + eps),
    "progress": lambda g, m_hat, v_hat, eps, progress: torch.full_like(g, progress),
}
# how φ's output becomes a step: ``lstm`` (SL2O) Δz = step_scale · tanh(w_outᵀ h); ``adam_schedule`` (Celo-Adam
# style) Δz = −adam_lr · exp(clamp(s(p) + w_outᵀ h, ±MAX_LOG_SCALE)) · m̂/(√v̂ + ε): a learned multiplier on Adam's
# step (s: the learned schedule over the fraction done p), exactly Adam at lr adam_lr when s = 0 and w_out = 0 (its
# start)
RULES = ("lstm", "adam_schedule")
MAX_LOG_SCALE = 5.0  # adam_schedule: the multiplier stays within e^±5 ≈ [0.007, 150]
# adam_schedule also learns a schedule over the run (Celo's learned schedule): a piecewise-linear log-multiplier of
# the fraction done, with its values at these knots (``sched.weight``), added to the LSTM's per-coordinate output
SCHEDULE_KNOTS = (0.0, 0.25, 0.5, 0.75, 1.0)

# the tensors of φ and their shapes for a config (see `param_shapes`)
PARAM_NAMES = ("lstm.weight_ih", "lstm.weight_hh", "lstm.bias", "out.weight")

State = Dict[str, Any]  # {"m": (D,), "v": (D,), "t": int, "h": (D, H), "c": (D, H), "horizon": int or None}


@dataclass(frozen=True)
class LearnedOptimizerConfig:
    """What φ is: stored with its weights (``weights.pt`` = {"config": to_dict(), "params": {...}}).

    Raises:
        ConfigError: every bad field at once, each saying what is allowed.
    """

    hidden_size: int = field(default=20, metadata={"help": "LSTM hidden units per coordinate (SL2O code: 8–20)"})
    features: Tuple[str, ...] = field(default=("m", "g"), metadata={
        "help": "per-coordinate inputs, in order: m = m̂/√(v̂+ε), g = g/√(v̂+ε)"})
    step_scale: float = field(default=1.0, metadata={
        "help": "largest |Δz_i| of one step (at the schedule's initial lr): Δz = step_scale · tanh(...)"})
    beta1: float = field(default=0.9, metadata={"help": "first-moment decay (SL2O: 0.9)"})
    beta2: float = field(default=0.99, metadata={"help": "second-moment decay (SL2O: 0.99)"})
    eps: float = field(default=1e-8, metadata={"help": "ε inside √(v̂+ε)"})
    rule: str = field(default="lstm", metadata={
        "help": "lstm: Δz = step_scale·tanh(w_outᵀh) | adam_schedule: a learned multiplier on Adam's step"})
    adam_lr: float = field(default=0.1, metadata={"help": "adam_schedule: the lr of the Adam step it multiplies"})
    per_coordinate: bool = field(default=True, metadata={
        "help": "adam_schedule: one multiplier per coordinate (else their mean: one per step)"})
    max_log_scale: float = field(default=MAX_LOG_SCALE, metadata={
        "help": "adam_schedule: the multiplier stays within e^±max_log_scale"})

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(self.features))
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> List[str]:
        out = []
        if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            out.append(f"hidden_size={self.hidden_size!r}: must be an integer ≥ 1")
        if not self.features:
            out.append(f"features=(): choose one or more of {', '.join(FEATURES)}")
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            out.append(f"features: unknown {', '.join(map(repr, unknown))}: choose from {', '.join(FEATURES)}")
        if len(set(self.features)) != len(self.features):
            out.append(f"features={list(self.features)}: a feature is listed twice")
        if not (isinstance(self.step_scale, (int, float)) and math.isfinite(self.step_scale)
                and self.step_scale > 0):
            out.append(f"step_scale={self.step_scale!r}: must be a finite number > 0")
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not (isinstance(b, (int, float)) and 0 <= b < 1):
                out.append(f"{name}={b!r}: must be in [0, 1)")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            out.append(f"eps={self.eps!r}: must be a finite number > 0")
        if self.rule not in RULES:
            out.append(f"rule={self.rule!r}: choose one of {', '.join(RULES)}")
        if not (isinstance(self.adam_lr, (int, float)) and math.isfinite(self.adam_lr) and self.adam_lr > 0):
            out.append(f"adam_lr={self.adam_lr!r}: must be a finite number > 0")
        return out

    @property
    def needs_horizon(self) -> bool:
        """φ reads the fraction of its run done: whoever runs it must say how long the run is."""
        return "progress" in self.features or self.rule == "adam_schedule"  # its schedule reads it too

    @property
    def num_features(self) -> int:
        return len(self.features)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["features"] = list(self.features)
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LearnedOptimizerConfig":
        """Inverse of `to_dict`.

        Raises:
            ConfigError: unknown keys or bad values.
        """
        known = {f for f in cls.__dataclass_fields__}
        if d.get("rule") == "adam_schedule" and "max_log_scale" not in d:  # written while the cap was fixed at 3
            d = {**d, "max_log_scale": 3.0}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"learned-optimizer config: unknown key(s) {', '.join(unknown)}: "
                              f"known are {', '.join(sorted(known))}")
        return cls(**d)


def param_shapes(config: LearnedOptimizerConfig) -> Dict[str, Tuple[int, ...]]:
    """Shapes of φ's tensors: one LSTM cell (gates i, f, g, o stacked as in torch.nn.LSTMCell, ONE bias standing
    for torch's bias_ih + bias_hh) and an output row without bias (a bias would push every coordinate the same
    way whatever its gradient)."""
    h, f = config.hidden_size, config.num_features
    shapes = {"lstm.weight_ih": (4 * h, f), "lstm.weight_hh": (4 * h, h), "lstm.bias": (4 * h,), "out.weight": (h,)}
    if config.rule == "adam_schedule":  # the log-multiplier's values at SCHEDULE_KNOTS of the fraction done
        shapes["sched.weight"] = (len(SCHEDULE_KNOTS),)
    return shapes


def schedule_value(knots_K: torch.Tensor, progress: float) -> torch.Tensor:
    """The learned schedule at ``progress``: linear between the two `SCHEDULE_KNOTS` around it (two elements of
    ``knots_K`` indexed where they are: no host-to-device copy in the step)."""
    knots = SCHEDULE_KNOTS
    p = min(max(progress, knots[0]), knots[-1])
    i = next((k for k in range(len(knots) - 1) if p <= knots[k + 1]), len(knots) - 2)
    f = (p - knots[i]) / (knots[i + 1] - knots[i])
    return knots_K[i] * (1.0 - f) + knots_K[i + 1] * f


def init_params(config: LearnedOptimizerConfig, seed: int = 0, dtype: torch.dtype = torch.float32
                ) -> Dict[str, torch.Tensor]:
    """Random φ as torch initialises an LSTMCell and a Linear: U(−1/√H, 1/√H), from ``seed`` alone."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(config.hidden_size)
    return {k: (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)
            for k, shape in param_shapes(config).items()}


def adam_like_params(config: LearnedOptimizerConfig, gain: float = 1.0, dtype: torch.dtype = torch.float32
                     ) -> Dict[str, torch.Tensor]:
    """A hand-built φ whose step is close to Δz = −step_scale · tanh(gain · m̂/√(v̂+ε)): Adam with its step
    clipped by tanh. A sane starting point for meta-training and a working l2o for tests.

    Hidden unit 0 copies the ``m`` feature: input and output gates saturated open, the forget gate shut, the cell
    candidate tanh(a·m) with a small a (so h₀ ≈ a·m), and the output row −gain/a. Every other weight is 0.

    Raises:
        ConfigError: the config has no ``m`` feature.
    """
    if "m" not in config.features:
        raise ConfigError(f"adam_like_params needs the 'm' feature; the config has {list(config.features)}")
    h, a, sat = config.hidden_size, 0.05, 30.0  # σ(30) = 1 − 1e-13
    p = {k: torch.zeros(s, dtype=dtype) for k, s in param_shapes(config).items()}
    gates = {"i": 0, "f": h, "g": 2 * h, "o": 3 * h}  # row offsets of unit 0 in each gate
    p["lstm.bias"][gates["i"]] = sat
    p["lstm.bias"][gates["f"]] = -sat
    p["lstm.bias"][gates["o"]] = sat
    p["lstm.weight_ih"][gates["g"], config.features.index("m")] = a
    p["out.weight"][0] = -gain / a
    return p


def init_state(config: LearnedOptimizerConfig, dim: int, dtype: torch.dtype = torch.float32,
               device: Any = "cpu", horizon: Optional[int] = None) -> State:
    """The state before the first step: zero moments, t = 0, zero LSTM hidden and cell states, and the run's
    length ``horizon`` in steps (the ``progress`` feature's T; None when φ does not read it)."""
    def zeros(*s):
        return torch.zeros(*s, dtype=dtype, device=device)
    h = config.hidden_size
    return {"m": zeros(dim), "v": zeros(dim), "t": 0, "h": zeros(dim, h), "c": zeros(dim, h), "horizon": horizon}


def progress_of(t: int, horizon: Optional[int]) -> float:
    """t / horizon capped at 1 (a run longer than it said stays at 'done'); 0 without a horizon."""
    return min(1.0, t / horizon) if horizon else 0.0


def moments(config: LearnedOptimizerConfig, g_D: torch.Tensor, state: State
            ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(m, v, t) after observing g (SL2O Algorithm 1): m ← β1 m + (1−β1) g, v ← β2 v + (1−β2) g², t ← t + 1."""
    b1, b2 = config.beta1, config.beta2
    m = b1 * state["m"] + (1 - b1) * g_D
    v = b2 * state["v"] + (1 - b2) * g_D * g_D
    return m, v, int(state["t"]) + 1


def features(config: LearnedOptimizerConfig, g_D: torch.Tensor, m_D: torch.Tensor, v_D: torch.Tensor, t: int,
             horizon: Optional[int] = None) -> torch.Tensor:
    """The (D, F) LSTM input: the config's features, in order, from the moments after step t (t ≥ 1); the
    ``progress`` feature is (t − 1) / horizon, the fraction done before this step."""
    m_hat = m_D / (1 - config.beta1 ** t)
    v_hat = v_D / (1 - config.beta2 ** t)
    progress = progress_of(t - 1, horizon)
    return torch.stack([FEATURES[name](g_D, m_hat, v_hat, config.eps, progress) for name in config.features], dim=1)


def lstm_cell(params: Dict[str, torch.Tensor], x_DF: torch.Tensor, h_DH: torch.Tensor, c_DH: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One LSTM cell step over the D rows (torch.nn.LSTMCell's equations, gates i, f, g, o)."""
    gates_DG = x_DF @ params["lstm.weight_ih"].t() + h_DH @ params["lstm.weight_hh"].t() + params["lstm.bias"]
    i, f, g, o = gates_DG.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c_DH + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def update(params: Dict[str, torch.Tensor], config: LearnedOptimizerConfig, g_D: torch.Tensor, state: State
           ) -> Tuple[torch.Tensor, State]:
    """One step of the learned optimizer: Δz (to ADD to z) and the new state, from the gradient g = Pᵀ∇L.

    Pure: ``state`` and ``params`` are not modified; the result depends on φ through the LSTM only (the moments
    depend on g alone). Computed in the dtype of the state's moments.

    Args:
        params: φ (`param_shapes`).
        config: φ's config.
        g_D: The gradient of the D coefficients (global, the same on every DDP rank).
        state: `init_state` or the state a previous `update` returned.

    Returns:
        (Δz (D,) = step_scale · tanh(w_outᵀ h), the new state).
    """
    g_D = g_D.to(state["m"].dtype)
    m, v, t = moments(config, g_D, state)
    horizon = state.get("horizon")
    x_DF = features(config, g_D, m, v, t, horizon)
    h, c = lstm_cell(params, x_DF, state["h"], state["c"])
    out_D = h @ params["out.weight"]
    if config.rule == "adam_schedule":
        log_scale = out_D if config.per_coordinate else out_D.mean().expand_as(out_D)
        log_scale = log_scale + schedule_value(params["sched.weight"], progress_of(t - 1, horizon))
        adam_D = (m / (1 - config.beta1 ** t)) / ((v / (1 - config.beta2 ** t)).sqrt() + config.eps)
        delta_D = -config.adam_lr * torch.exp(log_scale.clamp(-config.max_log_scale, config.max_log_scale)) * adam_D
    else:
        delta_D = config.step_scale * torch.tanh(out_D)
    return delta_D, {"m": m, "v": v, "t": t, "h": h, "c": c, "horizon": horizon}


def check_params(config: LearnedOptimizerConfig, params: Dict[str, Any]) -> List[str]:
    """Problems with φ against its config: missing or extra tensors, wrong shapes, non-finite values."""
    want = param_shapes(config)
    problems = []
    missing, extra = sorted(set(want) - set(params)), sorted(set(params) - set(want))
    if missing or extra:
        problems.append(f"params: missing {missing}, unexpected {extra}")
    for k in sorted(set(want) & set(params)):
        v = params[k]
        if not isinstance(v, torch.Tensor):
            problems.append(f"params[{k!r}]: not a tensor")
        elif tuple(v.shape) != want[k]:
            problems.append(f"params[{k!r}]: shape {tuple(v.shape)}, the config needs {want[k]}")
        elif not torch.isfinite(v).all():
            problems.append(f"params[{k!r}]: non-finite values")
    return problems


def expectation_problems(config: LearnedOptimizerConfig, hidden_size: Optional[int] = None,
                         features: Optional[Sequence[str]] = None) -> List[str]:
    """Where ``config`` differs from what a caller expects (None: no expectation)."""
    out = []
    if hidden_size is not None and hidden_size != config.hidden_size:
        out.append(f"hidden_size {config.hidden_size}, not the expected {hidden_size}")
    if features is not None and tuple(features) != config.features:
        out.append(f"features {list(config.features)}, not the expected {list(features)}")
    return out
