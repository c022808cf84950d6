"""Curve metrics: pure functions of loss curves and per-run records (no torch, no Ray).

- `smoothed` — the trailing mean every curve uses; `convergence_step` — SL2O §4.1's convergence step;
- `steps_to_reach`, `speedup` (VeLO's speedup of one curve over another at a horizon), `final_loss`;
- `curve_speedup` — the same speedup on evaluated curves (a fixed set of samples, no minibatch noise);
- `mean_std`, `summarize` — mean ± std over optimizees of meta-test runs (`raysub.l2o.metatest`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np


SMOOTH_WINDOW = 20  # the default of `smoothed`: the window of SL2O's convergence-step criterion


def smoothed(values: Sequence[Optional[float]], window: int = SMOOTH_WINDOW, *,
             skip_nonfinite: bool = False) -> List[Optional[float]]:
    """Trailing mean: entry t is the mean of the last ``window`` values up to t (the first window−1 entries
    average the values so far).

    Non-finite values (NaN, ±inf): by default every entry from the first one on is non-finite (the running sum
    keeps it: a diverged run's smoothed loss stays non-finite, which meta-testing's speedups rely on). With
    ``skip_nonfinite`` each non-finite value (or None) gives None and the windows hold the last ``window`` finite
    values (a plot line through a run with a few bad steps).
    """
    if skip_nonfinite:
        ok = [v is not None and math.isfinite(v) for v in values]
        means = iter(smoothed([v for v, good in zip(values, ok) if good], window))
        return [next(means) if good else None for good in ok]
    out, acc = [], 0.0
    for t, v in enumerate(values):  # a running sum: the window's mean in O(1) per step
        acc += v
        if t >= window:
            acc -= values[t - window]
        out.append(acc / min(t + 1, window))
    return out


def convergence_step(losses: Sequence[float], window: int = 20, std_tol: float = 0.1, gap: float = 0.1
                     ) -> Optional[int]:
    """SL2O §4.1: the first step t (1-based) with std(L_{t-19..t}) < 0.1 and L_t < L* + 0.1.

    L* is the run's minimal training loss; the std is the population std of the last ``window`` losses (the paper
    does not say which; numpy's default).
    Returns None when the run never converged by that definition (or is shorter than the window).
    """
    L = np.asarray(losses, dtype=np.float64)
    if len(L) < window:
        return None
    best = L.min()
    windows = np.lib.stride_tricks.sliding_window_view(L, window)
    ok = (windows.std(axis=1) < std_tol) & (L[window - 1 :] < best + gap)
    hits = np.flatnonzero(ok)
    return int(hits[0] + window) if len(hits) else None


def steps_to_reach(curve: Sequence[float], target: float) -> Optional[int]:
    """The first step t (1-based) with curve[t−1] ≤ target; None when the curve never gets there."""
    for t, v in enumerate(curve, start=1):
        if v <= target:
            return t
    return None


def speedup(l2o_losses: Sequence[float], momentum_losses: Sequence[float], n: int,
            window: int = SMOOTH_WINDOW) -> Dict[str, Any]:
    """VeLO's speedup at horizon n: the steps Momentum† needs to reach the smoothed training loss φ reaches after
    n steps, divided by n (both curves `smoothed`).

    Returns:
        {"value", "lower_bound", "target", "momentum_steps"}: when Momentum† never reaches the target within its
        run, value = len(momentum_losses) / n and lower_bound = True (the speedup is at least that). When φ's run
        diverged by step n (its run is shorter than n, or its smoothed loss at n is not finite), value = 0.0 and
        target = None.
    """
    target = smoothed(l2o_losses[:n], window)[n - 1] if len(l2o_losses) >= n else math.nan
    if not math.isfinite(target):
        return {"value": 0.0, "lower_bound": False, "target": None, "momentum_steps": None}
    t = steps_to_reach(smoothed(momentum_losses, window), target)
    if t is None:
        return {"value": len(momentum_losses) / n, "lower_bound": True, "target": target, "momentum_steps": None}
    return {"value": t / n, "lower_bound": False, "target": target, "momentum_steps": t}


def curve_speedup(l2o_curve: Sequence[Sequence[float]], base_curve: Sequence[Sequence[float]], n: int,
                  base_steps: Optional[int] = None) -> Dict[str, Any]:
    """VeLO's speedup at horizon n on evaluated loss curves ([step, loss] pairs, steps increasing; the loss of z
    after that many steps on a fixed set of samples, so no minibatch noise): the step at which the baseline's
    curve first reaches φ's loss at step n, linearly interpolated between its two evaluations around the
    crossing, divided by n.

    Returns:
        {"value", "lower_bound", "target", "steps"} as `speedup`: a baseline that never gets there gives the
        steps it ran (``base_steps``: its run's length, up to a divergence; default its last evaluated step) ÷ n
        with lower_bound = True; φ with no finite loss at step n (diverged) gives 0.0.
    """
    target = dict((int(s), v) for s, v in l2o_curve).get(int(n), math.nan)
    if target is None or not math.isfinite(target):
        return {"value": 0.0, "lower_bound": False, "target": None, "steps": None}
    prev = None
    for s, v in base_curve:
        if v is not None and v <= target:
            t = float(s)
            if prev is not None:  # prev[1] > target ≥ v: the crossing between the two evaluations
                t = prev[0] + (prev[1] - target) / (prev[1] - v) * (s - prev[0])
            return {"value": t / n, "lower_bound": False, "target": target, "steps": t}
        prev = (s, v) if v is not None and math.isfinite(v) else None
    last = base_steps if base_steps is not None else (base_curve[-1][0] if base_curve else 0)
    return {"value": last / n, "lower_bound": True, "target": target, "steps": None}


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """{"mean", "std"} with the sample std (ddof = 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std}


def final_loss(losses: Sequence[float], window: int = SMOOTH_WINDOW) -> float:
    """The smoothed training loss at the end of a run (inf for an empty or non-finite one)."""
    if not losses:
        return math.inf
    v = smoothed(losses, window)[-1]
    return v if math.isfinite(v) else math.inf


def summarize(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean ± std over optimizees of one optimizer's meta-test runs.

    A run that never converged (or diverged) counts its convergence step as its length (a lower bound);
    ``not_converged`` says how many did. Test accuracy is the one after the full run (0 for a diverged run).

    Returns:
        {"convergence_step": {"mean", "std"}, "not_converged", "test_acc": {"mean", "std"},
        "val_acc": {"mean", "std"}, "diverged"}.
    """
    steps = [r["convergence_step"] if r["convergence_step"] is not None else r["steps"] for r in runs]
    return {"convergence_step": mean_std(steps),
            "not_converged": sum(r["convergence_step"] is None for r in runs),
            "test_acc": mean_std([r["test_acc"] for r in runs]),
            "val_acc": mean_std([r["val_acc"] for r in runs]),
            "diverged": sum(bool(r["diverged"]) for r in runs)}
