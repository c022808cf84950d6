"""Intrinsic-dimension sweeps: planning errors (no Ray), the analysis, and real Ray Tune sweeps on digits."""
import csv
import glob
import io
import json
import os

import pytest
import torch

from raysub.pipeline import sweep
from raysub.cli import main
from raysub.config import load_config
from raysub.data import open_dataset
from raysub.storage import RunDir

SMALL = ["train.epochs=3", "train.lr_milestones=[]", "sweep.seeds=[0]", "sweep.refine=1"]


def cfg_of(tmp_path, *overrides):
    from raysub.cli import CONFIG_DIR

    return load_config(os.path.join(CONFIG_DIR, "sweep_digits.yaml"), [f"run_dir={tmp_path}/sw", *overrides])


# -- bad input: one line, exit 2, nothing written -----------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("sweep.families=[dense,hadamard9]", "unknown projection family 'hadamard9'"),
    ("sweep.families=[]", "sweep.families is empty"),
    ("sweep.dims=[]", "sweep.dims has no values"),
    ("sweep.dims=[0,10]", "d=0 must be > 0"),
    ("sweep.dims=[-5]", "d=-5 must be > 0"),
    ("sweep.dims=[10,5000]", "d=5000 exceeds the model's 4,810 parameters"),
    ("sweep.families=[dldr]", "projection 'dldr' needs a sampled run with a basis: set train.basis_run"),
    ("data.val_fraction=0", "never on test"),
    ("sweep.seeds=[]", "sweep.seeds is empty"),
    ("sweep.family_options={dense: {bogus: 1}}", "unexpected option(s) 'bogus'"),
])
def test_bad_sweep_input_is_one_line_and_writes_nothing(tmp_path, capsys, override, needle):
    args = ["sweep", "sweep_digits", override, f"run_dir={tmp_path}/sw"]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err, err
    assert not os.path.exists(f"{tmp_path}/sw")


def test_dldr_basis_run_without_a_basis(tmp_path, capsys):
    (tmp_path / "nobasis").mkdir()
    rc = main(["sweep", "sweep_digits", "sweep.families=[dldr]", "sweep.dims=[2]",
               f"train.basis_run={tmp_path}/nobasis", f"run_dir={tmp_path}/sw"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no basis" in err and "raysub basis" in err
    assert not os.path.exists(f"{tmp_path}/sw")


def test_sweep_needs_a_config(capsys):
    assert main(["sweep", "sweep.dims=[3]"]) == 2
    assert "needs a CONFIG" in capsys.readouterr().err


# -- analysis ----------------------------------------------------------------------------------------------

def _rows(family, accs):
    return [{"family": family, "dim": d, "seed": s, "val_acc": a, "test_acc": a - 0.01, "train_s": 1.0}
            for (d, s), a in accs.items()]


def test_points_intrinsic_dim_and_refinement():
    rows = _rows("dense", {(10, 0): 0.5, (10, 1): 0.6, (100, 0): 0.80, (100, 1): 0.86, (1000, 0): 0.95,
                           (1000, 1): 0.93})
    rows.append({"family": "dense", "dim": 100, "seed": 2, "error": "boom"})  # failed trials do not count
    pts = sweep.points(rows)
    assert [(p["dim"], p["seeds"]) for p in pts] == [(10, 2), (100, 2), (1000, 2)]
    assert pts[1]["val_acc"] == pytest.approx(0.83)
    assert pts[1]["val_acc_min"] == 0.80 and pts[1]["val_acc_max"] == 0.86
    hit = sweep.intrinsic_dim(pts, "dense", 0.9)
    assert hit["dim"] == 1000
    assert sweep.intrinsic_dim(pts, "dense", 0.99) is None
    # geometric points strictly between the last failing d (100) and the first passing d (1000)
    assert sweep.refinement(pts, "dense", 0.9, 3) == [178, 316, 562]
    assert sweep.refinement(pts, "dense", 0.9, 0) == []
    assert sweep.refinement(pts, "dense", 0.5, 3) == []  # the smallest d already passes: nothing below
    assert sweep.refinement(pts, "dense", 0.99, 3) == []  # nothing passes: nothing to refine


def test_trial_config_sets_family_dim_seed_and_baseline_hyperparameters(tmp_path):
    cfg = cfg_of(tmp_path, "sweep.family_options={fastjl: {index: mod}}")
    base = cfg.to_dict()
    t = sweep.trial_config(base, "fastjl", 123, 7)
    assert t["seed"] == 7 and t["train"]["dim"] == 123 and t["train"]["projection"] == "fastjl"
    assert t["train"]["projection_options"] == {"index": "mod"}
    assert sweep.trial_config(base, "dense", 5, 0)["train"]["projection_options"] == {}
    b = sweep.trial_config(base, "identity", 4810, 1)
    assert b["train"]["lr"] == cfg.sgd.lr and b["train"]["weight_decay"] == 0.0
    # the baseline is psgd: a sweep whose subspace optimizer has options must not hand them to it
    adam = cfg_of(tmp_path, "train.optimizer=adam", "train.optimizer_options={beta2: 0.99}").to_dict()
    b = sweep.trial_config(adam, "identity", 4810, 1)
    assert b["train"]["optimizer"] == "psgd" and b["train"]["optimizer_options"] == {}
    assert sweep.trial_config(adam, "dense", 5, 0)["train"]["optimizer_options"] == {"beta2": 0.99}
    assert base["train"]["dim"] is None  # the base is not modified


def test_holdout_split_is_disjoint_fixed_and_leaves_test_alone(tmp_path):
    cfg = cfg_of(tmp_path)
    data = open_dataset(cfg)
    full = open_dataset(cfg_of(tmp_path, "data.val_fraction=0"))
    n = full.size("train")
    assert data.size("train") + data.size("val") == n
    assert data.size("val") == round(0.1 * n)
    assert set(data.index["train"].tolist()).isdisjoint(data.index["val"].tolist())
    assert data.size("test") == full.size("test")
    again = open_dataset(cfg_of(tmp_path, "seed=5"))  # the split does not follow the run seed
    assert torch.equal(again.index["val"], data.index["val"])
    (x, y), = data.batches("val", [torch.arange(4)], augment=True, seed=0)
    (xf, yf), = full.batches("train", [data.index["val"][:4]], augment=False, seed=0)
    assert torch.equal(x, xf) and torch.equal(y, yf)


# -- real Ray Tune sweeps ----------------------------------------------------------------------------------

@pytest.fixture
def basis_run(sampled_basis):
    """A small sampled run with a 5-dim DLDR basis, for the dldr family (the session's, tests/conftest.py)."""
    return sampled_basis


def test_sweep_end_to_end_with_failure_and_resume(ray_session, basis_run, tmp_path, monkeypatch, capsys):
    args = ["sweep", "sweep_digits", *SMALL, "sweep.families=[dldr,fastjl]", "sweep.dims=[5,300]",
            "sweep.family_dims={dldr:[1,5]}", f"train.basis_run={basis_run}", f"run_dir={tmp_path}/sw"]
    monkeypatch.setenv("RAYSUB_FAIL_AFTER_EPOCH", "2")
    assert main(args) == 2  # a trial died after epoch 2: the sweep stops and says how to go on
    err = capsys.readouterr().err
    assert "did not finish" in err and "--resume" in err
    monkeypatch.delenv("RAYSUB_FAIL_AFTER_EPOCH")
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "restoring" in out and "d_int90" in out
    # the restored experiment kept its finished trials: one directory per coarse trial, none run twice
    coarse_dirs = [d for d in os.listdir(f"{tmp_path}/sw/tune/coarse") if os.path.isdir(f"{tmp_path}/sw/tune/coarse/{d}")]
    assert len(coarse_dirs) == 5, coarse_dirs

    run = RunDir(f"{tmp_path}/sw")
    res = run.read_json("results.json")
    # every family starts from the basis run's θ0
    assert run.read_bytes("theta0.pt") == RunDir(basis_run).read_bytes("theta0.pt")
    trials = res["trials"]
    assert {(t["family"], t["dim"]) for t in trials if t["phase"] == "coarse"} == {
        ("identity", 4810), ("dldr", 1), ("dldr", 5), ("fastjl", 5), ("fastjl", 300)}
    assert all(t["epochs_run"] == 3 and 0 <= t["val_acc"] <= 1 for t in trials)
    base = res["baseline"]
    assert base["trials"] == 1 and base["val_acc"] > 0.9
    assert res["target"] == pytest.approx(0.9 * base["val_acc"])
    for family, r in res["families"].items():
        mine = [p for p in res["points"] if p["family"] == family]
        passing = [p["dim"] for p in mine if p["val_acc"] >= res["target"]]
        assert r["d_int"] == (min(passing) if passing else None)
    # a refinement phase ran where a family crossed the line between two coarse points
    refine = [t for t in trials if t["phase"] == "refine"]
    for t in refine:
        coarse = sorted(p["dim"] for p in res["points"] if p["family"] == t["family"])
        assert coarse[0] < t["dim"] < coarse[-1]
    rows = list(csv.DictReader(io.StringIO(run.read_text("trials.csv"))))
    assert len(rows) == len(trials)
    assert run.exists("plots/accuracy_vs_dim.png")
    json.dumps(res)  # plain data


def test_sweep_ddp_trials_run_ray_train_inside_tune(ray_session, tmp_path, capsys):
    """workers_per_trial=2: each trial is a TorchTrainer (gloo DDP) inside a Tune function trainable. Every epoch's
    report carries the world size the workers saw: catches a trial that trains in its own Tune actor (one process)
    or on a 1-worker trainer while the sweep still "runs"."""
    rc = main(["sweep", "sweep_digits", *SMALL, "train.epochs=2", "sweep.families=[fastfood]", "sweep.dims=[50]",
               "sweep.baseline=0.97", "sweep.workers_per_trial=2", "cluster.cpus_per_worker=0.5",
               f"run_dir={tmp_path}/sw"])
    assert rc == 0, capsys.readouterr().err
    res = RunDir(f"{tmp_path}/sw").read_json("results.json")
    assert res["baseline"] == {"val_acc": 0.97, "given": True, "trials": 0}
    assert res["max_concurrent"] == 4  # 4 logical CPUs / (2 workers × 0.5 CPU); the trial's own actor takes none
    (t,) = res["trials"]
    assert t["family"] == "fastfood" and t["epochs_run"] == 2
    (trial_dir,) = [d for d in glob.glob(f"{tmp_path}/sw/tune/coarse/*") if os.path.isdir(d)]
    with open(os.path.join(trial_dir, "result.json")) as fh:
        reports = [json.loads(line) for line in fh]
    assert [(r["epoch"], r["world_size"]) for r in reports] == [(1, 2), (2, 2)]


def test_trial_resources_exceeding_the_cluster(ray_session, tmp_path, capsys):
    rc = main(["sweep", "sweep_digits", "sweep.workers_per_trial=3", "cluster.cpus_per_worker=2",
               f"run_dir={tmp_path}/sw"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs sweep.workers_per_trial=3 × cluster.cpus_per_worker=2 = 6 CPUs" in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(f"{tmp_path}/sw")


def test_the_baseline_trains_as_the_sgd_section_does():
    """The full-training baseline of a sweep follows sgd.optimizer: momentum SGD at sgd.lr, but Adam at sgd.lr for
    an AdamW config (a ViT's AdamW lr, 2e-3, would starve momentum SGD and lower every d_int's target)."""
    from raysub.pipeline.sweep import BASELINE, trial_config

    sgd = trial_config(load_config(None, ["sgd.lr=0.05"]).to_dict(), BASELINE, 100, 1)["train"]
    adamw = trial_config(load_config(None, ["sgd.optimizer=adamw", "sgd.lr=0.002"]).to_dict(), BASELINE, 100, 1)
    assert (sgd["optimizer"], sgd["lr"]) == ("psgd", 0.05)
    assert (adamw["train"]["optimizer"], adamw["train"]["lr"]) == ("adam", 0.002)
    dense = trial_config(load_config(None, ["sgd.optimizer=adamw"]).to_dict(), "dense", 100, 1)["train"]
    assert dense["optimizer"] == "psgd"  # the subspace trials keep train.optimizer
