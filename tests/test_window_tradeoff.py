"""raysub/bench/window_tradeoff.py (jobs/bench/window_tradeoff.py): the window prefixes, the signals and the time-to-target bookkeeping (seconds,
synthetic trajectories; no dataset, no Ray)."""
import os
from types import SimpleNamespace

import numpy as np
import pytest

from raysub.bench import window_tradeoff as wt
from raysub.runs.manifest import Manifest


def _trajectory(T=40, N=300, rank=6, seed=0):
    """A drifting trajectory: θ0 + a planted rank-``rank`` path + small noise, float32 like the shards."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, N))
    t = np.linspace(0, 1, T)[:, None]
    coef = np.hstack([np.sin((k + 1) * np.pi * t) * 0.7 ** k + t * (k == 0) for k in range(rank)])
    W = rng.standard_normal(N) + coef @ basis + 1e-3 * rng.standard_normal((T, N))
    W[0] = W[0] - coef[0] @ basis  # snapshot 0 is θ0
    return W.astype(np.float32)


def _projector(U_DN):
    Q, _ = np.linalg.qr(U_DN.T)
    return Q @ Q.T


def test_prefix_basis_equals_the_basis_of_only_those_snapshots():
    """Bug: the window's basis taken from the full trajectory's centred Gram (the mean of all T snapshots) instead
    of re-centring the prefix of the θ0-relative Gram — the short windows would use directions they never saw."""
    from raysub.pipeline.stream_gram import centre_gram

    W = _trajectory()
    K = wt.gram_theta0(W)
    D = wt.displacements(W)
    count, dim = 15, 5
    U, spec = wt.prefix_basis(K, D, count, dim)
    X = W[:count].astype(np.float64)
    X -= X.mean(axis=0)
    _, S, Vt = np.linalg.svd(X, full_matrices=False)
    np.testing.assert_allclose(spec["singular_values"][:dim], S[:dim], rtol=1e-9)
    np.testing.assert_allclose(U @ U.T, np.eye(dim), atol=1e-9)  # orthonormal rows
    for k in range(dim):  # each component equals the SVD's up to sign
        assert abs(abs(U[k] @ Vt[k]) - 1) < 1e-8
    # and the prefix Gram is the Gram of the prefix alone (what the streaming Gram holds after the window)
    np.testing.assert_allclose(K[:count, :count], wt.gram_theta0(W[:count]), rtol=1e-12, atol=1e-12)
    wrong = np.linalg.eigh(centre_gram(K)[:count, :count])[0][::-1][:dim]  # the full trajectory's centring
    assert not np.allclose(np.sqrt(np.clip(wrong, 0, None)), S[:dim], rtol=1e-3)


def test_window_sizes_count_theta0_and_every_snapshot_up_to_the_epoch():
    """Bug: a window of w epochs missing θ0 (epoch 0) or the snapshots of epoch w itself."""
    sizes = wt.window_sizes([0, 1, 1, 1, 2, 2, 3, 3, 3])
    assert sizes == {0: 1, 1: 4, 2: 6, 3: 9}


def test_stop_signals_match_the_samplers_window_check():
    """Bug: the recorded outside fraction / drift computed over other snapshot ranges than the adaptive window's
    `window_check` uses (reference set: snapshots up to the previous epoch; displacement to this epoch's last)."""
    from raysub.pipeline.sample import window_check

    W = _trajectory(T=31)
    epochs = [0] + [1 + i // 6 for i in range(30)]  # 5 epochs of 6 snapshots
    K = wt.gram_theta0(W)
    sizes = wt.window_sizes(epochs)
    dim = 4
    rows = wt.stop_signals(K, sizes, [dim])
    signals = []
    for e in range(1, 6):
        stream = SimpleNamespace(count=sizes[e], gram=K[: sizes[e], : sizes[e]])
        ref = window_check(stream, signals, e, SimpleNamespace(basis=SimpleNamespace(dim=dim)))
        row = rows[e - 1]
        assert row["epoch"] == e and row["num_snapshots"] == sizes[e]
        if ref["reach_residual"] is None:
            assert row[f"reach_residual_d{dim}"] is None
        else:
            assert row[f"reach_residual_d{dim}"] == pytest.approx(ref["reach_residual"], abs=1e-12)
            assert row[f"max_angle_deg_d{dim}"] == pytest.approx(ref["max_angle_deg"], abs=1e-9)
    assert rows[0][f"reach_residual_d{dim}"] is None  # epoch 1: θ0 alone is no reference set
    assert rows[-1][f"residual_k1_d{dim}"] is None  # nothing sampled beyond the last epoch


def test_adaptive_windows_replays_the_samplers_rule():
    """Residuals 0.5, 0.4 (−20%), 0.39 (−2.5%), 0.385 (−1.3%) at epochs 2..5: with 5% and patience 2 the rule
    ends at epoch 5, patience 1 at epoch 4, never (→ the last epoch) at 1%; min_snapshots holds it back. Catches
    the fall taken against the first check rather than the previous one, or min_snapshots ignored."""
    res = [None, 0.5, 0.4, 0.39, 0.385, 0.384]
    signal = [{"epoch": e + 1, "num_snapshots": 10 * (e + 1), "reach_residual_d3": r} for e, r in enumerate(res)]
    assert wt.adaptive_windows(signal, [3], 0.05, 2) == {3: 5}
    assert wt.adaptive_windows(signal, [3], 0.05, 1) == {3: 4}
    assert wt.adaptive_windows(signal, [3], 0.001, 1) == {3: 6}
    assert wt.adaptive_windows(signal, [3], 0.05, 1, min_snapshots=45) == {3: 5}


def test_residual_outside_is_the_explicit_projection_residual():
    """Bug: the Gram-space residual forgetting the centring of the reference rows or measuring from the mean
    instead of θ0 (θ = θ0 + P z can only reach θ0 + span(U))."""
    W = _trajectory()
    K = wt.gram_theta0(W)
    D = wt.displacements(W)
    count, dim, a = 20, 5, 35
    U, _ = wt.prefix_basis(K, D, count, dim)
    x = D[a]
    expected = np.linalg.norm(x - U.T @ (U @ x)) / np.linalg.norm(x)
    assert wt.residual_outside(K, count, a, dim) == pytest.approx(expected, rel=1e-7)


def test_time_to_target_picks_the_first_epoch_reaching_it():
    """Bug: the best epoch, the last epoch, or a strict > used for "first reaching the target", or the end-to-end
    time adding the whole training instead of the time to that epoch."""
    hist = [{"epoch": 1, "test_acc": 0.85, "elapsed_s": 10.0}, {"epoch": 2, "test_acc": 0.90, "elapsed_s": 20.0},
            {"epoch": 3, "test_acc": 0.93, "elapsed_s": 30.0}, {"epoch": 4, "test_acc": 0.91, "elapsed_s": 40.0}]
    assert wt.first_reaching(hist, 0.90)["epoch"] == 2
    assert wt.first_reaching(hist, 0.95) is None
    ref = {"sgd_s": 200.0, "sgd_s_to_target": 100.0, "sgd_epochs": 20}
    out = wt.end_to_end(50.0, 5.0, hist, 0.90, ref, sgd_epoch_s=10.0, window=5)
    assert out["epoch_to_target"] == 2 and out["end_to_end_s"] == pytest.approx(75.0)
    assert out["end_to_end_over_sgd"] == pytest.approx(0.375)
    assert out["end_to_end_over_sgd_to_target"] == pytest.approx(0.75)
    assert out["end_to_end_epochs"] == pytest.approx(5 + 25.0 / 10.0)
    assert wt.end_to_end(50.0, 5.0, hist, 0.95, ref)["end_to_end_s"] is None
    summary = {"results": {"sgd": {"history": [{"epoch": e + 1, "test_acc": a, "elapsed_s": 10.0 * (e + 1)}
                                               for e, a in enumerate([0.80, 0.905, 0.90, 0.91])]}}}
    r = wt.sgd_reference(summary, 0.005)
    assert r["target_acc"] == pytest.approx(0.905) and r["sgd_epochs_to_target"] == 2 and r["sgd_s"] == 40.0


def test_optimizer_overrides_merge_over_the_defaults():
    """Bug: ``--set pbfgs.optimizer_options={c: 0.2}`` replacing P-BFGS's other defaults (β, batch) instead of
    merging into them, or a mistyped key passing silently."""
    from raysub.config import load_config
    from raysub.errors import ConfigError

    base = load_config(None).to_dict()
    user = wt.optimizer_overrides(["pbfgs.optimizer_options={c: 0.2}", "psgd.lr=0.5"], ["psgd", "pbfgs"])
    pb = wt.train_config(base, "pbfgs", user["pbfgs"])
    assert pb.train.optimizer == "pbfgs" and pb.train.batch_size == 1024
    assert pb.train.optimizer_options["c"] == 0.2 and pb.train.optimizer_options["beta"] == 0.55
    ps = wt.train_config(base, "psgd", user["psgd"])
    assert ps.train.lr == 0.5 and list(ps.train.lr_milestones) == [7] and ps.train.optimizer_options == {}
    with pytest.raises(ConfigError):
        wt.train_config(base, "pbfgs", ["train.optimizer_options={cc: 0.2}"])
    with pytest.raises(ConfigError):
        wt.optimizer_overrides(["sgdx.lr=1"], ["psgd"])
    short = wt.scaled_schedule(ps, 5)
    assert short.train.epochs == 5 and list(short.train.lr_milestones) == [4] and ps.train.epochs == 10


def test_read_trajectory_assembles_the_blocks_in_coordinate_order(tmp_path):
    """Bug: blocks concatenated in listing order rather than by their coordinate range, or a shard read without
    its checksum."""
    import torch

    from raysub.errors import StorageError
    from raysub.pipeline.sample import collect_trajectory, write_snapshot
    from raysub.storage import RunDir, block_bounds

    run = RunDir(str(tmp_path / "run"))
    W = _trajectory(T=5, N=23)
    bounds = block_bounds(23, 3)
    for b in (2, 0, 1):
        index = []
        for s in range(5):
            write_snapshot(run, torch.from_numpy(W[s]), b, bounds, s, 10 * s, (s + 1) // 2, index)
    _, shards = collect_trajectory(run)
    got, meta = wt.read_trajectory(run, Manifest(shards=shards))
    np.testing.assert_array_equal(got, W)
    assert [m["epoch"] for m in meta] == [0, 1, 1, 2, 2]
    first, _ = wt.read_trajectory(run, Manifest(shards=shards), count=3)
    np.testing.assert_array_equal(first, W[:3])
    bad = dict(shards)
    bad["trajectory/block_001/snap_00001.arrow"] = "0" * 64
    with pytest.raises(StorageError):
        wt.read_trajectory(run, Manifest(shards=bad))


def test_extra_target_is_measured_against_sgds_own_time_to_it():
    """Bug: an extra (lower) target's end-to-end time divided by SGD's time to the main target instead of SGD's
    time to that same accuracy."""
    summary = {"results": {"sgd": {"history": [{"epoch": e + 1, "test_acc": a, "elapsed_s": 10.0 * (e + 1)}
                                               for e, a in enumerate([0.80, 0.85, 0.90, 0.91])]}}}
    ref = wt.sgd_reference(summary, 0.005)
    row = {"window": 1, "optimizer": "psgd", "dim": 2, "final_acc": 0.86, "window_s": 10.0, "basis_s": 1.0,
           "history": [{"epoch": 1, "test_acc": 0.84, "elapsed_s": 4.0}, {"epoch": 2, "test_acc": 0.86,
                                                                          "elapsed_s": 9.0}]}
    out = wt.extra_target([row], summary, 0.85, ref, None)
    assert out["sgd_epochs_to_target"] == 2 and out["sgd_s_to_target"] == 20.0
    r = out["rows"][0]
    assert r["end_to_end_s"] == pytest.approx(20.0) and r["end_to_end_over_sgd_to_target"] == pytest.approx(1.0)
    assert out["best_window_per_optimizer"]["psgd"]["window"] == 1


def test_window_scales_are_the_dldr_projections_std_scales():
    """P-BFGS trains in the shipped config's coordinates (scale: std): column i of the basis times σ_i/√T of
    *this window* (T = its snapshot count). Catches the full run's T or the unscaled basis being used."""
    from raysub.config import Config

    cfg = wt.train_config(Config().to_dict(), "pbfgs")
    spec = {"singular_values": np.array([6.0, 3.0, 1.5])}
    np.testing.assert_allclose(wt.window_scales(spec, 9, 2, cfg).ravel(), [2.0, 1.0])
    psgd = wt.train_config(Config().to_dict(), "psgd")
    np.testing.assert_allclose(wt.window_scales(spec, 9, 2, psgd).ravel(), [1.0, 1.0])


def test_time_panel_falls_back_to_the_highest_reached_extra_target():
    """The time panel shows SGD's own target when any row reaches it; when none does (the measured run: 90.35%
    out of every window's reach), the highest --extra-targets target some row reaches, not an empty panel and
    not the lowest one. Catches min for max and a fallback taken although the main target was reached."""
    ref = {"target_acc": 0.9035, "sgd_s_to_target": 280.0}
    none = [{"end_to_end_over_sgd": None}]
    extra = {"0.895": {"rows": [{"end_to_end_over_sgd": 0.21}], "sgd_s_to_target": 200.0},
             "0.9": {"rows": [{"end_to_end_over_sgd": 0.30}], "sgd_s_to_target": 279.0},
             "0.91": {"rows": [{"end_to_end_over_sgd": None}], "sgd_s_to_target": None}}
    target, rows, sgd_to = wt.panel_target(none, ref, extra)
    assert (target, rows[0]["end_to_end_over_sgd"], sgd_to) == (0.9, 0.30, 279.0)
    hit = [{"end_to_end_over_sgd": 0.4}]
    assert wt.panel_target(hit, ref, extra) == (0.9035, hit, 280.0)
    assert wt.panel_target(none, ref, None) == (0.9035, none, 280.0)


def test_replot_without_a_finished_run_is_a_one_line_error(tmp_path, capsys):
    """--replot on an --out with no table.json: exit 2, one line naming the file and the fix, nothing written.
    Catches a traceback (KeyError/FileNotFoundError) or an empty plot written into the directory."""
    assert wt.main(["--out", str(tmp_path), "--replot", "--extra-targets", "0.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "table.json" in err and "run the benchmark" in err
    assert os.listdir(tmp_path) == []
