"""The streaming Gram (raysub.pipeline.stream_gram): exact values on hand-computed trajectories, no Ray."""
import numpy as np
import pytest
import torch

from raysub.pipeline.sample_plan import budget_refusal
from raysub.pipeline.stream_gram import (StreamGram, centre_gram, gram_bytes, outside_fraction,
                                         reach_residual, stop_decision, subspace_drift)

NOOP = lambda t: t  # one rank: the all-reduce is the identity


def stream_of(rows, reduce=NOOP):
    rows = np.asarray(rows, dtype=np.float32)
    s = StreamGram(len(rows) + 2, rows.shape[1], "cpu", reduce)
    for r in rows:
        s.add(torch.from_numpy(r))
    return s


def test_gram_is_relative_to_theta0_and_centring_is_exact():
    """θ0=(1,2), θ1=(2,2), θ2=(1,4): D = θ − θ0 = (0,0),(1,0),(0,2), so K = diag(0,1,4), and the centred Gram is
    the Gram of D − mean(D) computed by hand. Catches rows taken from θ instead of θ − θ0, a transposed row, and a
    centring with a wrong denominator or without its + mean(K) term."""
    s = stream_of([[1, 2], [2, 2], [1, 4]])
    np.testing.assert_array_equal(s.gram, np.diag([0.0, 1.0, 4.0]))
    expected = np.array([[5, 2, -7], [2, 8, -10], [-7, -10, 17]]) / 9.0
    np.testing.assert_allclose(centre_gram(s.gram), expected, rtol=0, atol=1e-15)


def test_block_grams_sum_to_the_full_gram():
    """Each rank adds its block's row and the all-reduce sums them: two half-blocks must give the full Gram.
    Catches a rank using the whole vector (double counting) or another rank's block bounds."""
    rng = np.random.default_rng(0)
    W = rng.normal(size=(6, 10)).astype(np.float32)
    full = stream_of(W).gram
    a, b = stream_of(W[:, :4]).gram, stream_of(W[:, 4:]).gram
    np.testing.assert_allclose(a + b, full, rtol=1e-13, atol=1e-12)


def test_matches_the_posthoc_gram_of_float32_snapshots_far_from_zero():
    """Parameters near 1000 moving by 1e-3: the centred Gram must equal the post-hoc float64 one (centring each
    coordinate over the float32 snapshots) to 1e-10 relative. Catches differences or products formed in float32,
    which lose ~all digits here (float32 resolves 6e-5 at 1000)."""
    rng = np.random.default_rng(1)
    base = 1000 + rng.normal(size=3000)
    W = (base + np.cumsum(rng.normal(scale=1e-3, size=(12, 3000)), axis=0)).astype(np.float32)
    X = W.astype(np.float64)
    X -= X.mean(axis=0)
    posthoc = X @ X.T
    streamed = centre_gram(stream_of(W).gram)
    assert np.abs(streamed - posthoc).max() / np.abs(posthoc).max() < 1e-10


def test_restored_stream_continues_exactly():
    """A checkpoint keeps K and the count; the block is reread from the shards. Catches a resume that recomputes
    rows against the wrong snapshots or keeps rows past the count."""
    rng = np.random.default_rng(2)
    W = rng.normal(size=(5, 7)).astype(np.float32)
    whole = stream_of(W)
    first = stream_of(W[:3])
    first.add(torch.from_numpy(W[3]))  # an unfinished epoch's snapshot, not in the checkpoint
    state = first.state_dict()
    first.truncate(3)
    state = {"gram": state["gram"][:3, :3], "count": 3}
    resumed = StreamGram(7, 7, "cpu", NOOP)
    resumed.load_state_dict(state, iter(W))
    for r in W[3:]:
        resumed.add(torch.from_numpy(r))
    np.testing.assert_array_equal(resumed.gram, whole.gram)


def test_outside_fraction_on_hand_cases():
    """Snapshots 0..2 on the x axis, d = 1 (the x axis): a step along y is all outside (1), along x all inside
    (0), along (1,1) half. Catches a dropped centring of the reference set, Σ⁻¹ missing (|UᵀΔ|² scaled by σ²),
    or the displacement measured from θ0 instead of the previous check."""
    base = [[0, 0], [1, 0], [2, 0]]
    for new, expected in (([2, 1], 1.0), ([3, 0], 0.0), ([3, 1], 0.5)):
        K = stream_of(base + [new]).gram
        assert outside_fraction(K, 3, 3, 1) == pytest.approx(expected, abs=1e-12)


def test_subspace_drift_between_checks():
    """Top-1 subspace along x, then (after many y steps) along y: 90°; unchanged: 0°, mean cos² 1."""
    xs = [[i, 0] for i in range(4)]
    K = stream_of(xs + [[3, 0.0]]).gram
    same = subspace_drift(K, 4, 5, 1)
    assert same["max_angle_deg"] == pytest.approx(0.0, abs=1e-4) and same["mean_cos2"] == pytest.approx(1.0)
    K = stream_of(xs + [[3, 10 * k] for k in range(1, 6)]).gram
    turned = subspace_drift(K, 4, 9, 1)
    assert turned["max_angle_deg"] > 80 and turned["mean_cos2"] < 0.05


def test_reach_residual_on_hand_cases():
    """Snapshots 0..2 on the x axis, d = 1 (the x axis). θ = (3, 4): 4/5 of its distance from θ0 is off the axis
    (0.8); (3, 0): 0; (0, 2): 1. Catches the displacement measured from the previous snapshot ((1, 4): 0.970)
    or the last reference snapshot instead of θ0, a squared residual (0.64), and Σ⁻¹ missing."""
    base = [[0, 0], [1, 0], [2, 0]]
    for new, expected in (([3, 4], 0.8), ([3, 0], 0.0), ([0, 2], 1.0)):
        K = stream_of(base + [new]).gram
        assert reach_residual(K, 3, 3, 1) == pytest.approx(expected, abs=1e-7)  # √(rounding) at 0
    K = stream_of(base + [[0, 0]]).gram
    assert reach_residual(K, 3, 3, 1) is None  # back at θ0: no direction to reach


def test_reach_residual_centres_the_reference_set():
    """Reference snapshots (0,0), (2,1), (4,0): the centred rows' top direction is exactly x (the y offsets
    −1/3, 2/3, −1/3 are smaller), so θ = (0, 3) is all outside (1.0). Without the centring the top direction of
    the rows (2,1), (4,0) tilts towards y and the residual drops below 0.99 — caught."""
    K = stream_of([[0, 0], [2, 1], [4, 0], [0, 3]]).gram
    assert reach_residual(K, 3, 3, 1) == pytest.approx(1.0, abs=1e-12)


def test_stop_decision_needs_patience_and_min_snapshots():
    """On the reach residual's relative fall: catches an off-by-one in the patience window, ≤ for < at the
    threshold, a rise (negative fall) not counting as levelled off, and a stop before min_snapshots or on a
    missing signal."""
    sig = lambda *r: [{"residual_drop": x} for x in r]
    assert stop_decision(sig(0.2, 0.01), 0.05, 1, 10, 10)
    assert not stop_decision(sig(0.2, 0.01), 0.05, 2, 10, 10)
    assert stop_decision(sig(0.2, 0.01, -0.02), 0.05, 2, 10, 10)
    assert not stop_decision(sig(0.01, 0.05), 0.05, 2, 10, 10)
    assert not stop_decision(sig(0.01), 0.05, 1, 11, 10)
    assert not stop_decision(sig(None), 0.05, 1, 1, 10)


def test_budget_refusal_names_the_sizes():
    """100 snapshots × 1M coordinates × 4 B = 381 MB per rank: within 400 MB, over 300 MB (wrong factor: caught)."""
    assert budget_refusal(100, 1_000_000, 400) is None
    msg = budget_refusal(100, 1_000_000, 300)
    assert "381 MB per rank" in msg and "sample.stream_gram_budget_mb=300" in msg


def test_stored_gram_is_verified(tmp_path):
    """A corrupted or wrong-size gram.pt is refused in one line naming the fallback (basis.gram=posthoc)."""
    from raysub.errors import StorageError
    from raysub.pipeline.stream_gram import GRAM_REL, read_streamed_gram
    from raysub.runs.manifest import Manifest
    from raysub.storage import RunDir

    run = RunDir(str(tmp_path))
    K = stream_of([[1, 2], [2, 2], [1, 4]]).gram
    checksum = run.write_bytes(GRAM_REL, gram_bytes(K))
    stored = {"num_snapshots": 3, "shards": {GRAM_REL: checksum},
              "stages": {"sample": {"stream_gram": {"path": GRAM_REL, "sha256": checksum}}}}
    manifest = Manifest.from_json(stored)
    np.testing.assert_array_equal(read_streamed_gram(run, manifest), K)
    with pytest.raises(StorageError, match="not the 4×4 Gram"):
        read_streamed_gram(run, Manifest.from_json({**stored, "num_snapshots": 4}))
    run.write_bytes(GRAM_REL, gram_bytes(K * 2))
    with pytest.raises(StorageError, match="corrupted.*basis.gram=posthoc"):
        read_streamed_gram(run, manifest)
    assert read_streamed_gram(run, Manifest(stages={"sample": {}})) is None


@pytest.mark.system  # a fresh interpreter, to see what it imports
def test_the_basis_actors_modules_do_not_import_torch():
    """The basis stage's block actors import `raysub.pipeline.basis` and, for the streamed path, this module's
    `basis_tile`: a top-level `import torch` in either costs every actor ~1 s of CPU — on the benchmark's small
    sizes it made the streamed basis stage 2.5× slower than the post-hoc one (jobs/bench/basis.py). Also checks
    that the numpy path of `basis_tile` is taken for numpy input without torch loaded."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; import raysub.pipeline.basis as b; import raysub.pipeline.stream_gram as s; "
            "u = s.basis_tile(s.increment_coefficients(np.array([[1.0], [-1.0]])), np.array([[1.0, 2.0], [3.0, 2.0]], "
            "dtype=np.float32)); print('torch' in sys.modules, u.tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    # proj column (1, -1) centred to (1, -1); X relative to θ0 = row 0: [[0, 0], [2, 0]] → U = -(2, 0)
    assert out[0] == "False"
    assert " ".join(out[1:]) == "[[-2.0, 0.0]]"


def test_basis_tile_sums_increments_and_keeps_float64_accuracy():
    """U = Σ_t p_t (θ_t − θ0) = Σ_s q_s Δ_s with q the reverse cumulative sum of the centred p. Hand case: p = (1, 0,
    −1) gives q = (−1, −1), so U = −(θ2 − θ0). Then a strongly drifting float32 trajectory far from zero (positions
    correlated, σ_1/σ_12 = 132): the float32 increments GEMM stays within 1e-6 of the float64 positions product
    per basis vector, a third of a float32 GEMM of positions' error. Catches a forward instead of reverse cumsum,
    an uncentred p, the θ0 term kept, and a float32 GEMM of positions."""
    from raysub.pipeline.basis import solve_spectrum
    from raysub.pipeline.stream_gram import basis_tile, increment_coefficients

    W = np.array([[1.0, 2.0, 3.0], [1.5, 2.0, 2.0], [4.0, 0.0, 3.5]], dtype=np.float32)
    Q = increment_coefficients(np.array([[1.0], [0.0], [-1.0]]))
    np.testing.assert_array_equal(Q, [[-1.0, -1.0]])
    np.testing.assert_array_equal(basis_tile(Q, W), [-(W[2] - W[0])])
    Qt = increment_coefficients(torch.tensor([[1.0], [0.0], [-1.0]], dtype=torch.float64))  # the ranks' path
    assert torch.equal(basis_tile(Qt, torch.from_numpy(W)), torch.from_numpy(-(W[2] - W[0]))[None])

    rng = np.random.default_rng(0)
    T, n, d = 40, 20000, 12
    steps = rng.standard_normal((T - 1, n)) * 1e-3 + 2e-3 * rng.standard_normal(n)  # noise + a common drift
    W = (5.0 + np.concatenate([np.zeros((1, n)), np.cumsum(steps, axis=0)])).astype(np.float32)
    X = W.astype(np.float64) - W[0].astype(np.float64)
    spec = solve_spectrum(centre_gram(X @ X.T), d)
    assert spec["singular_values"][0] / spec["singular_values"][d - 1] > 20
    P = spec["V"] / spec["singular_values"][:d]
    exact = (P - P.mean(axis=0)).T @ X
    got = basis_tile(increment_coefficients(P), W).astype(np.float64)
    err = np.linalg.norm(got - exact, axis=1).max()
    assert err < 1e-6  # 5.8e-7 (3e-5°); the float32 storage of the basis rounds each vector by ~1e-7
    positions = (P - P.mean(axis=0)).T.astype(np.float32) @ (W - W[0])
    assert np.linalg.norm(positions - exact, axis=1).max() > 2 * err  # 1.7e-6: what the increments avoid
