"""Real Ray integration: the sampler on Ray Train (gloo DDP), resume, the basis stage, P-SGD on Ray Train.

All tests share one Ray session and a handful of small runs on the digits MLP (~10 s each on 2 cores).
"""
import os

import numpy as np
import pytest
import torch

from raysub import pipeline
from raysub.pipeline.basis import basis_dir, load_basis, read_spectrum
from raysub.errors import ConfigError
from raysub.storage import RunDir

from helpers import trajectory  # tests/helpers.py
from conftest import QUICKSTART_SMALL, SAMPLED  # tests/conftest.py: the shared runs' overrides

BASE = SAMPLED  # the session's sampled run (tests/conftest.py): 3 epochs, snapshot every 4 steps, batch 64


def quiet(_line):
    pass


@pytest.fixture
def runs(sampled_runs):
    """Reference runs: 1 worker and 2 workers, same global batch and data order (the session's, tests/conftest.py)."""
    return sampled_runs


def test_sample_parity_two_workers_match_one(runs):
    W1, W2 = trajectory(runs[1]), trajectory(runs[2])
    steps = 3 * (1437 // 64)
    assert W1.shape == W2.shape == (1 + steps // 4, 4810)
    np.testing.assert_array_equal(W1[0], W2[0])  # θ0
    np.testing.assert_allclose(W2, W1, rtol=0, atol=2e-5)
    assert np.abs(W1[-1] - W1[0]).max() > 1e-2  # it did move


def test_run_directory_contents(runs):
    run = RunDir(runs[2])
    manifest = run.read_json("manifest.json")
    assert manifest["world_size"] == 2 and manifest["num_params"] == 4810
    assert [b["start"] for b in manifest["blocks"]] == [0, 2405]
    assert manifest["layout"][0]["name"] == "net.0.weight" or manifest["layout"][0]["offset"] == 0
    for key in ("torch", "ray", "python"):
        assert key in manifest["versions"]
    assert manifest["git_revision"]
    assert manifest["stages"]["sample"]["complete"]
    snapshots = [p for p in manifest["shards"] if p.startswith("trajectory/") and p.endswith(".arrow")]
    assert len(snapshots) == 2 * manifest["num_snapshots"]  # one file per snapshot and block (a basis adds its own)
    assert [p for p in manifest["shards"] if p.endswith("index.json")] == [
        "trajectory/block_000/index.json", "trajectory/block_001/index.json"]
    assert run.exists("config.yaml") and run.exists("theta0.pt")
    summary = run.read_json("summary.json")
    assert 0 < summary["results"]["sgd"]["test_acc"] <= 1
    assert summary["results"]["sgd"]["epochs"] == 3
    assert summary["num_snapshots"] == manifest["num_snapshots"]


@pytest.fixture
def basis_run(sampled_basis):
    return sampled_basis


def test_basis_stage(basis_run):
    run = RunDir(basis_run)
    U = load_basis(basis_run)
    assert U.shape == (5, 4810)
    np.testing.assert_allclose(U.astype(np.float64) @ U.T, np.eye(5), atol=1e-5)
    spec = read_spectrum(run)
    assert len(spec["explained_variance_ratio"]) == spec["num_snapshots"]
    assert run.exists("plots/explained_variance.png")
    summary = run.read_json("summary.json")
    assert summary["dim"] == 5 and "basis_s" in summary["timings"]


def test_psgd_parity_two_workers_match_one(basis_run):
    """One rank (Ray Train's local mode, cluster.num_workers=0: the loop in this process) and 2 workers with P
    sharded by parameter rows (issue 25: each rank reads only its block of the stored 2-block basis,
    reduce-scatters the gradient and all-gathers θ over gloo on Ray Train): the same z. Catches a sharded rank that
    projects its local gradient only (half the gradient), the sharded mode never reaching the workers (its record
    would say replicated), and a rank that holds all of P. Two workers with P replicated: the P-BFGS and l2o parity
    tests (the same collectives but the projection's), and `test_pbfgs_parity_two_workers_match_one`'s records."""
    z = {}
    for workers, sharding in ((0, "replicated"), (2, "sharded")):
        label = f"psgd_w{workers or 1}" + ("_sharded" if sharding == "sharded" else "")
        pipeline.stage_train(basis_run, [f"cluster.num_workers={workers}", f"train.label={label}",
                                         f"train.projection_sharding={sharding}"], say=quiet)
        z[label] = RunDir(basis_run).read_torch(f"train/{label}.pt")["z"]
    assert float(z["psgd_w1"].norm()) > 0
    torch.testing.assert_close(z["psgd_w2_sharded"], z["psgd_w1"], rtol=1e-4, atol=1e-5)
    summary = RunDir(basis_run).read_json("summary.json")
    assert summary["results"]["psgd_w1"]["allreduce_floats_per_step"] == 0
    sharded, one = summary["results"]["psgd_w2_sharded"], summary["results"]["psgd_w1"]
    assert (sharded["projection_sharding"], one["projection_sharding"]) == ("sharded", "replicated")
    assert one["p_bytes_per_worker"] == 4810 * 5 * 4  # the digits MLP's N × d × float32
    assert sharded["p_bytes_per_worker"] == 2405 * 5 * 4  # rank 0's block of the two
    assert sharded["allreduce_floats_per_step"] == 5 + 1  # d + the loss
    assert sharded["group_floats_per_step"] == 2 * 2405  # reduce-scatter and all-gather of ⌈N/2⌉
    assert abs(sharded["test_acc"] - one["test_acc"]) < 0.01
    assert RunDir(basis_run).exists("plots/test_accuracy.png")


def test_l2o_parity_two_workers_match_one(basis_run, tmp_path):
    """Meta-testing is an ordinary `raysub train`: the learned optimizer under DDP (2 workers, each stepping with
    the all-reduced gradient) ends at the z of 1 worker with the same global batch. Mutation caught: a rank
    stepping with its local gradient (the LSTM state and z drift apart between ranks and from 1 worker), or
    the optimizer's state not restored/broadcast the same on every rank."""
    from raysub.l2o import LearnedOptimizerConfig, adam_like_params, save_learned_optimizer

    config = LearnedOptimizerConfig(hidden_size=4, step_scale=0.1)
    weights = str(tmp_path / "weights.pt")
    save_learned_optimizer(weights, config, adam_like_params(config))
    z = {}
    for workers in (0, 2):  # 0: one rank in this process (Ray Train's local mode)
        label = f"l2o_w{workers or 1}"
        pipeline.stage_train(basis_run, [f"cluster.num_workers={workers}", f"train.label={label}",
                                         "train.optimizer=l2o", f"train.optimizer_options={{weights: {weights}}}"],
                             say=quiet)
        z[workers or 1] = RunDir(basis_run).read_torch(f"train/{label}.pt")["z"]
    assert float(z[1].norm()) > 0
    torch.testing.assert_close(z[2], z[1], rtol=1e-4, atol=1e-5)


def test_train_refuses_existing_label_and_bad_dim(basis_run):
    with pytest.raises(ConfigError, match="--overwrite"):
        pipeline.stage_train(basis_run, ["train.label=psgd_w1"], say=quiet)
    with pytest.raises(ConfigError, match="train.dim=9"):
        pipeline.stage_train(basis_run, ["train.dim=9", "train.label=x"], say=quiet)
    with pytest.raises(ConfigError, match="only takes"):
        pipeline.stage_train(basis_run, ["sample.epochs=9"], say=quiet)


def test_basis_refuses_corrupted_shard(runs, tmp_path, capsys):
    import shutil

    from raysub.cli import main

    dst = str(tmp_path / "copy")
    shutil.copytree(runs[1], dst)
    manifest = RunDir(dst).read_json("manifest.json")
    path = os.path.join(dst, "trajectory/block_000/snap_00003.arrow")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x55
    open(path, "wb").write(bytes(data))
    assert main(["basis", dst, "basis.dim=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "snap_00003.arrow is corrupted" in err
    assert basis_dir(RunDir(dst)) is None
    os.remove(path)
    assert main(["basis", dst, "basis.dim=3"]) == 2
    assert "snap_00003.arrow is missing" in capsys.readouterr().err
    assert not RunDir(dst).exists("basis")
    assert manifest == RunDir(dst).read_json("manifest.json")


def test_basis_rebuild_killed_before_commit_leaves_the_old_basis(runs, tmp_path, monkeypatch):
    """Kill `raysub basis --overwrite` at its commit: the old basis (dim 3) stays in force and loads (the old
    layout overwrote basis/spectrum.json first and reported the mix as corrupted), then a complete rebuild
    replaces it and deletes the old generation."""
    import shutil

    from raysub.runs import records
    from raysub.pipeline import run as runmod

    dst = str(tmp_path / "copy")
    shutil.copytree(runs[1], dst)
    pipeline.stage_basis(dst, ["basis.dim=3"], say=quiet)
    run = RunDir(dst)
    old = load_basis(run)
    assert old.shape == (3, 4810)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runmod, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.stage_basis(dst, ["basis.dim=2"], overwrite=True, say=quiet)
    monkeypatch.undo()
    assert len(run.listdir("basis")) == 2  # the killed rebuild's files are there, uncommitted
    np.testing.assert_array_equal(load_basis(run), old)
    assert read_spectrum(run)["dim"] == 3 and records.stored_config(run)["basis"]["dim"] == 3
    pipeline.stage_basis(dst, ["basis.dim=2"], overwrite=True, say=quiet)
    assert load_basis(run).shape == (2, 4810) and len(run.listdir("basis")) == 1
    assert run.read_json("summary.json")["dim"] == 2


def test_raysub_run_end_to_end(quickstart_run, capsys):
    """`raysub run` (the quickstart config, shortened): progress lines, the table, summary.json, plots. The run is
    the session's `quickstart_run` (tests/conftest.py), which tests/test_s3.py compares its s3 run with."""
    from raysub.cli import main

    run_dir = quickstart_run["run_dir"]
    args = ["run", *QUICKSTART_SMALL, f"run_dir={run_dir}"]
    assert quickstart_run["rc"] == 0, quickstart_run["err"]
    out = quickstart_run["out"]
    assert "[sgd] epoch 3/3" in out and "[psgd] epoch 2/2" in out and "[basis]" in out
    assert "method" in out and "psgd" in out
    summary = RunDir(str(run_dir)).read_json("summary.json")
    for method in ("sgd", "psgd"):
        r = summary["results"][method]
        assert 0.5 < r["test_acc"] <= 1 and r["epochs"] > 0 and r["wall_s"] > 0
    assert summary["dim"] == 3 and summary["num_params"] == 4810 and summary["num_snapshots"] == 5
    assert {"sample_s", "basis_s", "train_s"} <= set(summary["timings"])
    for plot in ("explained_variance.png", "test_accuracy.png"):
        assert (run_dir / "plots" / plot).stat().st_size > 1000
    # --resume on a finished run skips every stage
    assert main(args + ["--resume"]) == 0
    assert "skipping" in capsys.readouterr().out


def test_label_noise_job(ray_session, tmp_path, capsys):
    """jobs/label_noise.py end to end on digits: table, JSON, plot; SGD best ≥ SGD final by definition."""
    import json

    from raysub.bench import label_noise as job

    out = tmp_path / "ln"
    # local mode (cluster.num_workers=0, one rank in this process): the job's logic is under test, not DDP, and a
    # Ray Train fit costs ~15-20 CPU-s to start
    assert job.main(["quickstart", "--levels", "0.5", "--dims", "2,3", "--out", str(out), "sgd.epochs=2",
                     "sample.epochs=2", "train.epochs=1", "train.lr_milestones=[]", "sgd.lr_milestones=[]",
                     "cluster.num_workers=0"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert rows[0]["c"] == 0.5 and rows[0]["sgd_best"] >= rows[0]["sgd_final"]
    assert {"psgd_d2", "psgd_d3"} <= set(rows[0])
    assert (out / "label_noise.png").exists() and (out / "label_noise.md").exists()
    assert job.main(["quickstart", "--levels", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_pbfgs_parity_two_workers_match_one(basis_run):
    """P-BFGS under DDP: the all-reduced losses make every worker take the same line-search decisions (against
    one rank in this process: Ray Train's local mode)."""
    z = {}
    for workers in (0, 2):
        label = f"pbfgs_w{workers or 1}"
        pipeline.stage_train(basis_run, [f"cluster.num_workers={workers}", f"train.label={label}",
                                         "train.optimizer=pbfgs", "train.batch_size=256", "train.epochs=1"],
                             say=quiet)
        z[workers or 1] = RunDir(basis_run).read_torch(f"train/{label}.pt")["z"]
    assert float(z[1].norm()) > 0
    torch.testing.assert_close(z[2], z[1], rtol=1e-4, atol=1e-5)
    summary = RunDir(basis_run).read_json("summary.json")
    r = summary["results"]["pbfgs_w2"]
    assert r["projection_sharding"] == "replicated" and r["p_bytes_per_worker"] == 4810 * 5 * 4  # all of P
    assert "group_floats_per_step" not in r  # replicated: no group collectives
    s = r["history"][-1]["optimizer_stats"]
    # d + the loss, plus one float per line-search trial (backtracks + 1 per step)
    assert r["allreduce_floats_per_step"] == 6 + (s["steps"] + s["backtracks"]) / s["steps"]
    assert r["history"][-1]["optimizer_stats"]["steps"] == 1437 // 256
    assert r["steps"] == 1437 // 256 and "convergence_step" in r


def test_train_from_a_config_needs_no_trajectory(ray_session, tmp_path, capsys):
    """`raysub train CONFIG` with a projection that needs no trajectory: a normal run directory (θ0 with its
    sha256, manifest, summary), d = N for the full-parameter family, the same θ0 for every label; a dldr run
    with no basis run is a one-line error before anything is written."""
    from raysub.cli import main

    run_dir = tmp_path / "rnd"
    common = ["quickstart", f"run_dir={run_dir}", "cluster.num_workers=1", "train.epochs=1", "train.lr=1.0",
              "train.lr_milestones=[]"]
    assert main(["train", *common, "train.projection=dense", "train.dim=300", "train.label=dense300"]) == 0
    run = RunDir(str(run_dir))
    manifest, summary = run.read_json("manifest.json"), run.read_json("summary.json")
    assert manifest["stages"]["train.dense300"]["complete"] and "theta0.pt" in manifest["shards"]
    r = summary["results"]["dense300"]
    assert r["dim"] == 300 and r["projection"] == "dense"
    assert r["test_acc"] > 0.7  # measured 85% after one epoch in a 300-dim dense subspace (chance: 10%)
    # a second label on the same run: the full-parameter family, d = N
    # in local mode (one rank in this process): the run's record says so
    assert main(["train", str(run_dir), "train.projection=identity", "train.label=full", "train.lr=0.1",
                 "cluster.num_workers=0"]) == 0
    assert "local mode (one rank in this process, not tracked)" in capsys.readouterr().out
    full = run.read_json("summary.json")["results"]["full"]
    assert full["dim"] == 4810 and full["test_acc"] > 0.8
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["train", "quickstart", f"run_dir={bad}", "train.projection=dldr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a sampled run with a basis: set train.basis_run" in err
    assert not bad.exists()


def test_local_mode_resume_restarts_the_stage_and_loses_nothing(runs, tmp_path, monkeypatch, capsys):
    """cluster.num_workers=0 (Ray Train's local mode) keeps no checkpoints, so a sampling that fails after epoch 1
    is restarted from its beginning by --resume. Catches a restart that appends to the snapshots the failed run
    left (a snapshot twice in the index), and a resume that trusts a half-written block: the resumed trajectory
    must equal the uninterrupted one-rank run's bit for bit (both in this process)."""
    from raysub.cli import main

    run_dir = tmp_path / "loc"
    args = ["sample", *SAMPLED, "cluster.num_workers=0", f"run_dir={run_dir}"]
    monkeypatch.setenv("RAYSUB_FAIL_AFTER_EPOCH", "1")
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("--resume"), err
    monkeypatch.delenv("RAYSUB_FAIL_AFTER_EPOCH")
    assert main(args + ["--resume"]) == 0
    np.testing.assert_array_equal(trajectory(str(run_dir)), trajectory(runs[1]))
