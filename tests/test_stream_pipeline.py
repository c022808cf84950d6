"""Real Ray integration of the streaming Gram (issue 11): across a Ray Train restart, into the basis stage, the
rank-written basis and the adaptive end of the window. Shares the session's Ray cluster; digits MLP, ~1 minute.
"""
import numpy as np
import pytest

from raysub import pipeline
from raysub.config import load_config
from raysub.pipeline.basis import load_basis, read_spectrum
from raysub.pipeline.stream_gram import read_streamed_gram
from raysub.runs.manifest import Manifest
from raysub.storage import RunDir

from test_pipeline import BASE, quiet, trajectory


def gram_of(W_TN: np.ndarray) -> np.ndarray:
    """The post-hoc Gram relative to θ0, float64."""
    D = W_TN.astype(np.float64) - W_TN[0].astype(np.float64)
    return D @ D.T


def assert_same_spectrum(a, b):
    """Singular values equal to 1e-9 relative over the rank; beyond it (the centred trajectory's null direction)
    both are rounding noise, √ε-sized: compared absolutely."""
    a, b = np.asarray(a["singular_values"]), np.asarray(b["singular_values"])
    r = len(a) - 1
    np.testing.assert_allclose(a[:r], b[:r], rtol=1e-9)
    np.testing.assert_allclose(a[r:], b[r:], rtol=0, atol=1e-6 * a[0])


def max_angle_deg(A_DN: np.ndarray, B_DN: np.ndarray) -> float:
    """Largest principal angle between the row spaces, sine-based (arccos loses it below ~1e-3°)."""
    Qa = np.linalg.qr(A_DN.astype(np.float64).T)[0]
    Qb = np.linalg.qr(B_DN.astype(np.float64).T)[0]
    s = np.linalg.norm(Qb - Qa @ (Qa.T @ Qb), 2)
    return float(np.degrees(np.arcsin(min(1.0, s))))


def test_streamed_gram_survives_a_restart_and_feeds_the_basis(sampled_runs, tmp_path, monkeypatch):
    """A worker group that fails after epoch 1 is restarted by Ray Train from the checkpoint: the trajectory equals
    the uninterrupted run's bit for bit (a snapshot lost or written twice, or a restart from another state than the
    checkpoint's, would break it); the resumed ranks reload K and their blocks, so the stored Gram equals the Gram
    of the trajectory on disk to 1e-12 (a block not reread, a row added twice, or the unfinished epoch's rows kept
    would break it), and the basis stage from it (one read, gram_source "stream") equals the post-hoc one (the
    Gram pass)."""
    monkeypatch.setenv("RAYSUB_FAIL_AFTER_EPOCH", "1")
    cfg = load_config(None, BASE + ["cluster.num_workers=2", "cluster.max_failures=1", "sample.stream_gram=true",
                                    f"run_dir={tmp_path}/r"])
    pipeline.stage_sample(cfg, say=quiet)
    run = RunDir(cfg.run_dir)
    assert run.exists("failure_injected")
    manifest = Manifest.read(run)
    K = read_streamed_gram(run, manifest)
    W = trajectory(cfg.run_dir)
    np.testing.assert_array_equal(W, trajectory(sampled_runs[2]))  # the same config, never interrupted
    assert K.shape == (len(W), len(W)) == (manifest.num_snapshots,) * 2
    expected = gram_of(W)
    np.testing.assert_allclose(K, expected, rtol=0, atol=1e-12 * np.abs(expected).max())

    monkeypatch.delenv("RAYSUB_FAIL_AFTER_EPOCH")
    pipeline.stage_basis(cfg.run_dir, ["basis.gram=posthoc"], say=quiet)
    post_spec, post_U = read_spectrum(run), load_basis(cfg.run_dir)
    pipeline.stage_basis(cfg.run_dir, ["basis.gram=auto"], overwrite=True, say=quiet)
    stream_spec, stream_U = read_spectrum(run), load_basis(cfg.run_dir)
    assert (post_spec["gram_source"], stream_spec["gram_source"]) == ("posthoc", "stream")
    assert_same_spectrum(stream_spec, post_spec)
    assert max_angle_deg(stream_U, post_U) < 1e-4
    np.testing.assert_allclose(stream_U.astype(np.float64) @ stream_U.T, np.eye(5), atol=1e-5)


def test_adaptive_window_ends_the_stage_and_the_ranks_write_the_basis(ray_session, tmp_path, capsys):
    """`raysub run` with the adaptive window (threshold 0.99, patience 1: the first check with a fall, epoch 3,
    ends it) and the rank-written basis: the stage stops at the window (no baseline: 3 epochs of history, not
    6), the trajectory holds only the window's snapshots, the signal is in the manifest and plotted, the basis
    stage is skipped (gram_source "sampler") and its basis equals the post-hoc one of the same trajectory."""
    from raysub.cli import main

    run_dir = tmp_path / "a"
    args = ["run"] + BASE + ["sgd.epochs=6", "sample.epochs=6", "sample.stream_gram=true", "sample.stop=adaptive",
                             "sample.stop_threshold=0.99", "sample.stop_patience=1", "sample.write_basis=true",
                             "cluster.num_workers=2", f"run_dir={run_dir}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[sample] adaptive window ended after 3 of at most 6 epochs" in out
    assert "reach residual" in out and "[window ends]" in out
    assert "(sampler Gram" in out and "block actors" not in out  # no basis stage read: the ranks wrote it
    run = RunDir(str(run_dir))
    manifest = run.read_json("manifest.json")
    stage = manifest["stages"]["sample"]
    steps = 3 * (1437 // 64)
    assert stage["window_epochs"] == 3 and stage["stop"] == "adaptive"
    assert manifest["num_snapshots"] == 1 + steps // 4 == len(trajectory(str(run_dir)))
    signals = stage["stop_signal"]
    assert [s["epoch"] for s in signals] == [1, 2, 3] and signals[-1]["stop"]
    assert signals[0]["reach_residual"] is None and signals[1]["residual_drop"] is None
    assert 0 < signals[2]["reach_residual"] < 1 and signals[2]["residual_drop"] < 0.99
    hist = run.read_json("summary.json")["results"]["sgd"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert (run_dir / "plots" / "stop_signal.png").stat().st_size > 1000
    assert manifest["stages"]["basis"]["gram_source"] == "sampler"
    assert "psgd" in run.read_json("summary.json")["results"]

    sampler_spec, sampler_U = read_spectrum(run), load_basis(str(run_dir))
    pipeline.stage_basis(str(run_dir), ["basis.gram=posthoc"], overwrite=True, say=quiet)
    post_spec, post_U = read_spectrum(run), load_basis(str(run_dir))
    assert_same_spectrum(sampler_spec, post_spec)
    assert max_angle_deg(sampler_U, post_U) < 1e-4


def test_adaptive_window_refused_when_the_gram_does_not_fit(ray_session, tmp_path):
    """The adaptive window cannot fall back to the post-hoc Gram: over budget it is refused before sampling."""
    from raysub.errors import ConfigError

    cfg = load_config(None, BASE + ["sample.stream_gram=true", "sample.stop=adaptive",
                                    "sample.stream_gram_budget_mb=0.01", f"run_dir={tmp_path}/b"])
    with pytest.raises(ConfigError, match="sample.stop=adaptive needs the streaming Gram.*stream_gram_budget_mb"):
        pipeline.stage_sample(cfg, say=quiet)
    assert not (tmp_path / "b" / "trajectory").exists()
