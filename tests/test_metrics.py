"""`convergence_step` against hand-computed cases of SL2O §4.1: training converged at step t if
std(L_{t−19}, …, L_t) < 0.1 and L_t < L* + 0.1, L* the globally minimal training loss; steps count from 1."""
import math
import numpy as np
import pytest

from raysub.metrics import convergence_step


@pytest.mark.parametrize("losses,step", [
    # the window ending at t = 25 alternates 0.196 and 0: population std 0.098 < 0.1, L_25 = 0 = L*.
    # ddof=1 gives 0.098·√(20/19) = 0.1005 and never converges.
    ([1.0] * 5 + [0.196, 0.0] * 10, 25),
    # a flat plateau 0.3 above L* (t = 20: std 0 but L_20 = 0.3 ≥ L* + 0.1); at t = 21 one 0 in the window:
    # std 0.3·√19/20 = 0.065 and L_21 = 0. Dropping the L_t condition or a gap of 0.5 give 20.
    ([0.3] * 20 + [0.0] * 20, 21),
    # a plateau at 1: windows mixing k zeros have std √(k(20−k))/20 ≥ 0.22, so t = 40 (the first window of
    # zeros). With L* the final loss (0.95) the plateau is within the gap: 20; without the L_t condition: 20.
    ([1.0] * 20 + [0.0] * 20 + [0.95], 40),
    # steps count from 1: a constant run converges at the end of its first full window
    ([0.5] * 20, 20),
    # shorter than the window: no std over 20 losses exists
    ([0.0] * 19, None),
])
def test_convergence_step_hand_computed(losses, step):
    """Catches: ddof=1 (the sample std), the L_t < L* + 0.1 condition dropped, L* taken as the final rather than
    the minimal loss, a gap of 0.5, an off-by-one step (0-based, or the window's first step)."""
    assert convergence_step(losses) == step


def test_convergence_step_conditions_are_strict():
    """Both inequalities are strict (≤ would converge here), on dyadic values where the boundary is exact:
    alternating 1 and 0 has population std exactly ½; [0] + [½]·20 puts L_21 exactly at L* + ½ (the window
    ending at 20 holds the 0: std ½·√19/20 ≈ 0.109)."""
    assert convergence_step([1.0, 0.0] * 10, std_tol=0.5) is None
    assert convergence_step([1.0, 0.0] * 10, std_tol=0.5 + 1e-9) == 20
    assert convergence_step([0.0] + [0.5] * 20, gap=0.5) is None
    assert convergence_step([0.0] + [0.5] * 20, gap=0.5 + 1e-9) == 21


def test_convergence_step_on_a_decaying_curve():
    """A linear decay 3 → 0.5 over 50 steps then flat: the first 20-step window with std < 0.1 that ends within
    0.1 of the minimum, found by brute force from the definition."""
    losses = list(np.linspace(3.0, 0.5, 50)) + [0.5] * 30
    L = np.array(losses)
    expect = next(i + 1 for i in range(19, len(L)) if L[i - 19 : i + 1].std() < 0.1 and L[i] < L.min() + 0.1)
    assert convergence_step(losses) == expect


def test_smoothed_is_one_implementation_with_two_nonfinite_policies():
    """One trailing mean for every curve (meta-testing's `smoothed` and the class-gradient QN plot's `smooth`
    were two, differing in NaN handling): by default a non-finite value makes every later entry non-finite; with
    skip_nonfinite it gives None and the windows hold the last finite values."""
    from raysub import metrics
    from raysub.l2o import metatest

    assert metatest.smoothed is metrics.smoothed
    nan = float("nan")
    assert metrics.smoothed([4, 2, 6, 0, 8], window=2) == [4, 3, 4, 3, 4]
    out = metrics.smoothed([4, nan, 2, 6], window=2)
    assert out[0] == 4 and all(math.isnan(v) for v in out[1:])  # a diverged run stays diverged
    assert metrics.smoothed([4, nan, 2, None, float("inf"), 6], window=2, skip_nonfinite=True) == \
        [4, None, 3, None, None, 4]
