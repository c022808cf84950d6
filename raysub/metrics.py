"""Run metrics."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


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
