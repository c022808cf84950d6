"""Curve metrics: the trailing-mean smoothing every curve uses, and SL2O's convergence step."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

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
