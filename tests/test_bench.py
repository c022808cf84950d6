"""The benchmark scripts' own logic (jobs/bench/), without running a benchmark: what they refuse and how they
turn records into figures."""
import importlib.util
import os

import pytest

import raysub.bench.basis
import raysub.bench.vit_uv
from raysub.config import load_config
from raysub.errors import ConfigError
from raysub.runs.manifest import Manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_job(name):
    # only jobs/bench/time_to_accuracy.py is still loaded from its path (it is not in raysub.bench yet)
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(REPO, "jobs", "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tta(monkeypatch):
    """jobs/bench/time_to_accuracy.py with a pipeline that must not run (a call fails the test)."""
    from raysub import pipeline

    calls = []

    def run_pipeline(cfg, **kwargs):
        calls.append(kwargs)
        raise AssertionError("the pipeline ran")

    monkeypatch.setattr(pipeline, "run_pipeline", run_pipeline)
    module = load_job("time_to_accuracy")
    module.pipeline_calls = calls
    return module


def test_time_to_accuracy_refuses_an_existing_out(tta, tmp_path, capsys):
    """Issue 11 (time_to_accuracy reuses --out): a rerun into an --out that holds a run must not report that run's
    old figures; it is refused with one line naming the directory and the fix, before the pipeline starts."""
    out = tmp_path / "bench_tta"
    (out / "pipeline").mkdir(parents=True)
    (out / "pipeline" / "manifest.json").write_text("{}")
    assert tta.main(["--out", str(out), "sgd.lr=0.04"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(out / "pipeline") in err and "--overwrite" in err and "--out" in err
    assert tta.pipeline_calls == []


def test_time_to_accuracy_overwrite_and_resume_reach_the_pipeline(tta, tmp_path):
    """Issue 11: --overwrite starts afresh (the library's overwrite, which clears --out under its lock) and an empty
    --out starts a new run; neither resumes."""
    out = tmp_path / "bench_tta"
    (out / "pipeline").mkdir(parents=True)
    (out / "pipeline" / "manifest.json").write_text("{}")
    with pytest.raises(AssertionError, match="the pipeline ran"):
        tta.main(["--out", str(out), "--overwrite"])
    with pytest.raises(AssertionError, match="the pipeline ran"):
        tta.main(["--out", str(tmp_path / "new")])
    assert tta.pipeline_calls == [{"resume": False, "overwrite": True}, {"resume": False, "overwrite": False}]


def test_time_to_accuracy_resume_needs_the_same_config(tta, tmp_path):
    """Issue 11: --resume continues a killed bench only with the config it started with (the library's check)."""
    out = tmp_path / "bench_tta"
    cfg, _ = tta.configs("fashion_mnist_lenet_pbfgs", str(out), [], 30)
    (out / "pipeline").mkdir(parents=True)
    (out / "pipeline" / "config.yaml").write_text(cfg.to_yaml())  # what a killed bench leaves
    same, _ = tta.configs("fashion_mnist_lenet_pbfgs", str(out), [], 30)
    tta.check_out(same, resume=True, overwrite=False)
    other, _ = tta.configs("fashion_mnist_lenet_pbfgs", str(out), ["sgd.lr=0.04"], 30)
    with pytest.raises(ConfigError, match="sgd.lr"):
        tta.check_out(other, resume=True, overwrite=False)


def test_time_to_accuracy_runs_the_production_pipeline_against_a_separate_reference(tta):
    """The pipeline run is the production one (streaming Gram, adaptive window ending the stage, ranks writing
    the basis); the reference is the same config, seed and data for 30 epochs. Catches a baseline left inside
    the pipeline (sgd.epochs > sample.epochs) or a reference with another seed or lr."""
    pipe, ref = tta.configs("fashion_mnist_lenet_pbfgs", "/tmp/x", ["sgd.lr=0.04"], 30)
    assert pipe.sgd.epochs == pipe.sample.epochs and pipe.sample.stop == "adaptive" and pipe.sample.write_basis
    assert ref.sgd.epochs == 30 and (ref.seed, ref.sgd.lr, ref.data.name) == (pipe.seed, 0.04, pipe.data.name)
    assert ref.sgd.lr_milestones == pipe.sgd.lr_milestones and ref.run_dir != pipe.run_dir


def test_time_to_accuracy_figures_on_a_hand_made_record(tta):
    """SGD ends at 0.90 (target 0.895), first reached at epoch 3 (elapsed 30 s of 50 s); P-BFGS first reaches it
    at epoch 2 (elapsed 8 s; epoch 3 is better but later); the window took 12 s and the ranks wrote the basis
    (its 0.5 s inside the window): pipeline 20 s, 0.40 of full SGD and 0.667 of SGD to target. Catches the
    rank-written basis counted twice, the best epoch instead of the first reaching, and swapped denominators."""
    hist = lambda accs, dt: [{"epoch": i + 1, "test_acc": a, "elapsed_s": dt * (i + 1)}
                             for i, a in enumerate(accs)]
    ref = {"results": {"sgd": {"test_acc": 0.90, "epochs": 5, "wall_s": 50.0,
                               "history": hist([0.8, 0.85, 0.896, 0.89, 0.90], 10.0)}}}
    summary = {"results": {"sgd": {"test_acc": 0.88}, "pbfgs": {"test_acc": 0.899, "wall_s": 12.0,
                                                                "history": hist([0.88, 0.897, 0.899], 4.0)}},
               "timings": {"sample_s": 12.0, "basis_s": 0.5}}
    manifest = Manifest(stages={"basis": {"gram_source": "sampler"},
                                "sample": {"window_epochs": 4, "num_snapshots": 90, "stop_signal": []}})
    f = tta.figures(summary, ref, manifest, 0.005)
    assert f["pipeline_s"] == pytest.approx(20.0) and f["pbfgs_epochs_to_target"] == 2
    assert f["pipeline_over_sgd"] == pytest.approx(0.40)
    assert f["pipeline_over_sgd_to_target"] == pytest.approx(20.0 / 30.0)
    assert f["window_epochs"] == 4 and f["sgd_epochs_to_target"] == 3
    manifest.stages["basis"]["gram_source"] = "stream"  # a separate basis stage: its time counts
    assert tta.figures(summary, ref, manifest, 0.005)["pipeline_s"] == pytest.approx(20.5)


def block(peak, start=100, nbytes=1000):
    return {"peak_rss": peak, "start_rss": start, "block_bytes": nbytes, "peak_rss_source": "vmhwm_since_reset"}


def test_basis_bench_compares_the_reference_with_all_block_actors():
    """Issue 11 (basis bench, reference_over_raysub_ram): every block actor holds its block at once, so the
    reference's peak RSS is compared with the sum of the actors' peaks, not with one actor's."""
    bench = raysub.bench.basis
    mem = bench.raysub_memory([block(1500), block(1300), block(1200, start=200), block(1400)])
    assert mem["raysub_peak_rss_sum_bytes"] == 5400
    assert mem["raysub_actor_peak_rss_bytes_all"] == [1500, 1300, 1200, 1400]
    assert mem["raysub_actor_peak_rss_bytes"] == 1500
    assert mem["peak_ram_over_block"] == pytest.approx(1.4)  # per actor: (peak - start) / its block, the largest
    assert mem["peak_rss_over_block_abs"] == pytest.approx(1.5)
    assert mem["raysub_peak_rss_source"] == ["vmhwm_since_reset"]
    assert bench.reference_over_raysub_ram(10800, mem) == pytest.approx(2.0)


def test_basis_bench_streamed_gram_is_the_samplers_gram(tmp_path):
    """Issue 11 (basis bench, streamed path): the bench's one-pass Gram equals what the sampling ranks' `StreamGram`
    rows sum to — relative to θ0, uncentred. Catches a Gram centred on the mean (the basis stage would centre it
    twice), one relative to zero instead of θ0, or a block missing from the sum."""
    import numpy as np
    import torch

    from raysub.pipeline.sample import collect_trajectory
    from raysub.pipeline.stream_gram import StreamGram
    from raysub.storage import RunDir, decode_vector

    bench = raysub.bench.basis
    run = RunDir(str(tmp_path / "traj"))
    bench.write_trajectory(run, n=301, t=6, num_blocks=3, rank=4, decay=0.8, scale=0.5, noise=1e-3, seed=1)
    blocks, _ = collect_trajectory(run)
    K = bench.streamed_gram(run, blocks, tile=50)  # tiles across the blocks' boundaries too
    total = np.zeros((6, 6))
    for b in blocks:
        stream = StreamGram(6, b["stop"] - b["start"], "cpu", lambda row: None)
        for s in b["snapshots"]:
            stream.add(torch.from_numpy(decode_vector(run.read_buffer(s["path"]))))
        total += stream.gram
    np.testing.assert_allclose(K, total, rtol=1e-12, atol=1e-15)
    assert K[0].max() == 0.0 and K[1, 1] > 0  # row 0 is θ0 − θ0


def test_basis_bench_angle_is_taken_from_its_sine():
    """The largest principal angle between two 2-D subspaces of R^4 rotated by a known angle in one direction, for
    angles down to 1e-9 rad, where arccos of the cosine (or 1 − cos²) rounds to 0. Scaled rows check the
    orthonormalisation. Catches cosines used unorthonormalised or the smallest angle reported instead of the
    largest."""
    import numpy as np

    bench = raysub.bench.basis
    for angle in (0.3, 1e-4, 1e-9):
        B = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
        P = np.array([[2.0, 0, 0, 0], [0, np.cos(angle), np.sin(angle), 0]])  # row 0 is B's row 0, scaled
        got = bench.max_principal_angle(B, P, chunk=3)[0]
        assert got == pytest.approx(angle, rel=1e-6)
    assert bench.sv_max_rel_diff([2.0, 4.0], [2.2, 4.0, 9.0], 2) == pytest.approx(0.1)


def test_basis_bench_floor_and_overhead_on_hand_figures():
    """stream_basis_over_floor divides by read + write + GEMM (the three are summed, not the largest), over post-hoc
    by the post-hoc stage; the overhead of 3.9 s of adds over 50 snapshot intervals of 390 steps at 0.1 s is
    1 + 3.9/1950 = 1.002 — θ0 comes before the first step, so 51 snapshots are 50 intervals. Catches a floor
    missing a term, swapped denominators, and counting θ0 as an interval."""
    bench = raysub.bench.basis
    fig = bench.floor_figures(read_s=0.5, write_s=1.0, gemm_s=0.5, stream_basis_s=3.0, basis_s=20.0)
    assert fig["floor_s"] == pytest.approx(2.0)
    assert fig["stream_basis_over_floor"] == pytest.approx(1.5)
    assert fig["stream_basis_over_posthoc"] == pytest.approx(0.15)
    assert bench.overhead_ratio(0.1, 390, 51, 3.9) == pytest.approx(1.002)


def test_vit_uv_figures_on_a_hand_made_record():
    """jobs/bench/vit_uv.py's figures: the gap is full − Momentum† (points, not a fraction; not the reverse), the
    step ratio is φ ÷ Momentum† (not its inverse), the fraction is UV-trainable ÷ the ViT's parameters (not ÷ the
    UV model's, which counts U and V twice), and the step ratio is UV ÷ full."""
    bench = raysub.bench.vit_uv

    def summary(conv, acc, not_converged=0):
        return {"summary": {"convergence_step": {"mean": conv, "std": 1.0}, "not_converged": not_converged,
                            "test_acc": {"mean": acc, "std": 0.01}}, "lr": 0.1}

    record = {"seeds": [1, 2, 3], "optimizers": {"l2o": {**summary(40.0, 0.90), "lr": None},
                                                 "psgd": summary(80.0, 0.91), "adam": summary(60.0, 0.92),
                                                 "full": summary(100.0, 0.925, 1)}}
    timing = {"uv": {"forward": 2.0, "backward": 3.0, "optimizer": 1.0, "step": 6.0},
              "full": {"forward": 2.0, "backward": 4.0, "optimizer": 2.0, "step": 8.0}}
    fig = bench.figures(record, timing, {"uv_trainable": 250, "vit_params": 1000})
    assert fig["trainable_fraction"] == 0.25
    assert fig["uv_acc_gap_pts"] == pytest.approx(1.5)
    assert fig["l2o_over_momentum_steps_vit"] == 0.5 and fig["l2o_over_adam_steps_vit"] == pytest.approx(40 / 60)
    assert fig["uv_step_over_full_step"] == 0.75
    assert fig["l2o_over_momentum_steps_censored"] is False
    assert fig["lrs"] == {"psgd": 0.1, "adam": 0.1, "full": 0.1} and fig["seeds"] == 3
    assert fig["test_acc_full"] == {"mean": 92.5, "std": 1.0}


def test_vit_uv_step_breakdown_times_each_phase(tmp_path):
    """The timing harness runs every phase of a real step and keeps θ at θ0 (lr 0), on a tiny UV task."""
    import torch

    from raysub.engine.task import build_task

    bench = raysub.bench.vit_uv
    cfg = load_config(None, ["model.name=vit", "model.options={dim: 16, depth: 1, heads: 2}", "model.uv.rank=2",
                             "train.projection=identity", f"run_dir={tmp_path}/r"])
    task = build_task(cfg)
    x, y = next(task.data.batches("train", [torch.arange(16)], augment=False, seed=0))
    theta0 = task.theta0_N.clone()
    out = bench.step_breakdown({"uv": task}, (x, y), steps=2, rounds=2)
    assert set(out["uv"]) == {"forward", "backward", "optimizer", "step"}
    assert all(v > 0 for v in out["uv"].values())
    assert out["uv"]["step"] == pytest.approx(out["uv"]["forward"] + out["uv"]["backward"] + out["uv"]["optimizer"])
    assert torch.equal(task.sub.flat.theta_N, theta0)


def test_data_ingest_figures_on_hand_made_records():
    """jobs/bench/data_ingest.py's ratios. Catches: a ratio upside down, the better crop size reported under the
    bare name instead of the worse, the S3 side compared with the DataLoader where the storage alone is meant."""
    from raysub.bench.data_ingest import figures

    def side(r64, r224):
        return {"64": {"images_per_s": r64, "cores_busy": 2.0}, "224": {"images_per_s": r224, "cores_busy": 1.5}}

    results = {"dataloader_local": side(800.0, 400.0), "ray_data_local": side(600.0, 440.0),
               "ray_data_s3": side(150.0, 110.0)}
    fig = figures(results, 200.0, [64, 224])
    assert fig["ray_data_over_dataloader_64"] == 0.75 and fig["ray_data_over_dataloader_224"] == 1.1
    assert fig["ray_data_over_dataloader"] == 0.75
    assert fig["s3_over_local_64"] == 0.25 and fig["s3_over_local_224"] == 0.25 and fig["s3_over_local"] == 0.25
    assert fig["ray_data_s3_over_dataloader"] == 0.188 and fig["ray_data_s3_over_server_gets"] == 0.75
    assert fig["dataloader_local_images_per_s_224"] == 400.0 and fig["ray_data_s3_cores_224"] == 1.5
    assert "s3_over_local" not in figures({"dataloader_local": side(1.0, 1.0)}, None, [64, 224])


def test_data_ingest_refuses_no_rounds_in_one_line(capsys):
    from raysub.bench.data_ingest import main

    with pytest.raises(SystemExit) as e:
        main(["--rounds", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("data_ingest: error: --rounds must be at least 1 (a warm-up epoch of "
                                               "every side comes first)")
