"""Divergence: a non-finite loss or parameters stops sampling and subspace training, names the stage, the epoch
and the step, writes no non-finite snapshot and no trained z; in a sweep the trial fails its d.

The Ray tests use digits MLP runs whose divergence point was found by replaying the same SGD in one process
(the same data order, `loop.epoch_batches`): sampling at sgd.lr=2000 (momentum 0.9, batch 64, 22 steps per
epoch) gives a nan loss at step 29 (epoch 2, after the finite snapshot at step 28); P-SGD in a 20-dim dense
subspace at train.lr=100 overflows to an inf loss at step 36 (epoch 2).
"""
import csv
import io
import json
import math
import os

import numpy as np
import pytest

from raysub import pipeline
from raysub.cli import CONFIG_DIR
from raysub.config import load_config
from raysub.errors import DivergedError, StorageError
from raysub.pipeline import sweep
from raysub.engine.loop import divergence, divergence_message, first_nonfinite
from raysub.storage import RunDir, decode_vector

NAN, INF = float("nan"), float("inf")


def quiet(_line):
    pass


# -- the check itself --------------------------------------------------------------------------------------

def test_first_nonfinite_finds_the_first_nan_or_inf():
    """Catches a check for nan only (inf slips through), for inf only, or one that returns the last bad index."""
    assert first_nonfinite([0.5, 1e30, NAN, INF]) == 2
    assert first_nonfinite([0.5, -INF, NAN]) == 1
    assert first_nonfinite([2.0, INF]) == 1
    assert first_nonfinite([0.1, 3.0]) is None
    assert first_nonfinite([]) is None


def test_divergence_record_names_the_global_step():
    """Exact step: 40 steps before the epoch, the 2nd loss of the epoch is bad → step 42. Catches an off-by-one
    (a 0-based step: 41), counting from the epoch instead of the run (2), or reporting the last finite step."""
    assert divergence("sample", 3, 40, [0.5, NAN, 1.0], True) == {
        "stage": "sample", "epoch": 3, "step": 42, "loss": None, "reason": "the loss became nan"}
    assert divergence("psgd", 1, 0, [INF], False)["step"] == 1
    assert divergence("psgd", 1, 0, [INF], False)["reason"] == "the loss became inf"  # the loss names it first
    # finite losses but parameters that overflowed in the last update: the last step, with its (finite) loss
    assert divergence("sample", 3, 40, [0.5, 0.25], False) == {
        "stage": "sample", "epoch": 3, "step": 42, "loss": 0.25, "reason": "the parameters became non-finite"}
    assert divergence("sample", 3, 40, [0.5, 0.25], True) is None
    json.dumps(divergence("sample", 3, 40, [NAN], True), allow_nan=False)  # strict JSON: no nan in the record


def test_divergence_message_is_one_line():
    record = divergence("sample", 3, 40, [0.5, NAN], True)
    assert divergence_message("SGD sampling", record, "lower sgd.lr (now 10000)") == (
        "SGD sampling diverged at epoch 3 (step 42): the loss became nan; lower sgd.lr (now 10000)")


# -- sweep analysis (no Ray) -------------------------------------------------------------------------------

def test_a_diverged_seed_fails_its_point_and_is_named_under_the_table():
    """Seeds 0.95, 0.95, 0.95 and one diverged (scored 0): the mean 0.7125 clears a 0.5 target, but the point
    must fail. Catches d_int taken from the mean alone, or diverged trials dropped from the point (which would
    make the mean 0.95 and pass)."""
    rows = [{"family": "fastjl", "dim": 10, "seed": s, "val_acc": 0.95, "test_acc": 0.9, "train_s": 1.0}
            for s in range(3)]
    rows.append({"family": "fastjl", "dim": 10, "seed": 3, "val_acc": 0.0, "test_acc": 0.0, "train_s": 1.0,
                 "diverged": 2, "epochs_run": 1})
    rows += [{"family": "fastjl", "dim": 100, "seed": s, "val_acc": 0.6, "test_acc": 0.6, "train_s": 1.0}
             for s in range(4)]
    pts = sweep.points(rows)
    assert [(p["dim"], p["seeds"], p["diverged"]) for p in pts] == [(10, 4, 1), (100, 4, 0)]
    assert pts[0]["val_acc"] == pytest.approx(0.7125) and pts[0]["val_acc_min"] == 0.0
    assert sweep.intrinsic_dim(pts, "fastjl", 0.5)["dim"] == 100
    assert sweep.refinement(pts, "fastjl", 0.5, 1) == [32]  # between the failing 10 and the passing 100
    summary = {"baseline": {"val_acc": 0.97, "given": True, "trials": 0}, "num_params": 4810, "threshold": 0.5,
               "target": 0.485, "seeds": [0, 1, 2, 3], "wall_s": 1.0, "trials": rows,
               "families": {"fastjl": {"d_int": 100, "val_acc": 0.6, "test_acc": 0.6, "trials": 8, "train_s": 8.0,
                                       "max_dim": 100}}}
    assert sweep.sweep_table(summary).splitlines()[-1] == "diverged, so failing their d: fastjl d=10 seed 3 (epoch 2)"
    rows_csv = list(csv.DictReader(io.StringIO(sweep._csv(rows))))
    assert [r["diverged"] for r in rows_csv] == ["", "", "", "2", "", "", "", ""]


# -- sampling on Ray Train ---------------------------------------------------------------------------------

SAMPLE = ["sgd.epochs=3", "sample.epochs=3", "sample.snapshot_every_steps=4", "basis.dim=5", "data.batch_size=64",
          "sgd.lr=2000", "train.epochs=1", "train.lr_milestones=[]"]


def test_diverged_sampling_stops_with_no_nan_snapshot(ray_session, tmp_path):
    """2 workers: every rank must take the same decision (a rank that stopped alone would hang the other in
    DDP's all-reduce). Before the fix the run exited 0 with nan snapshots; a check after writing the snapshot
    (not before) leaves the nan snapshot of step 32; a check of the loss alone misses parameters that are
    already nan at a snapshot. (One worker takes the same decision from the same global losses, with no peer to
    agree with; the 2-worker run is the harder case, and the one run here: a Ray Train fit costs ~20 CPU-s.)"""
    workers = 2
    cfg = load_config(None, SAMPLE + [f"cluster.num_workers={workers}", f"run_dir={tmp_path}/r"])
    with pytest.raises(DivergedError) as err:
        pipeline.stage_sample(cfg, say=quiet)
    assert str(err.value) == ("SGD sampling diverged at epoch 2 (step 29): the loss became nan; lower sgd.lr "
                              "(now 2000) and rerun with --overwrite")
    run = RunDir(cfg.run_dir)
    files = [f"trajectory/{b}/{f}" for b in run.listdir("trajectory") for f in run.listdir(f"trajectory/{b}")]
    snapshots = [f for f in files if not f.endswith("index.json")]
    assert len(snapshots) == workers * 8  # θ0 and steps 4, 8, …, 28: one block per worker
    for f in snapshots:
        assert np.isfinite(decode_vector(run.read_bytes(f))).all(), f
    for b in run.listdir("trajectory"):
        index = run.read_json(f"trajectory/{b}/index.json")
        assert [s["step"] for s in index["snapshots"]] == [0, 4, 8, 12, 16, 20, 24, 28]
    assert not run.read_json("manifest.json")["stages"].get("sample")  # never marked complete
    # --resume finds the divergence report and says it again, rather than training on from it
    with pytest.raises(DivergedError) as again:
        pipeline.stage_sample(cfg, resume=True, say=quiet)
    assert str(again.value) == str(err.value)
    with pytest.raises(StorageError, match="no complete trajectory"):  # the basis refuses it: no LinAlgError
        pipeline.stage_basis(cfg.run_dir, say=quiet)


# -- subspace training on Ray Train ------------------------------------------------------------------------

def test_diverged_subspace_training_writes_no_z(ray_session, tmp_path):
    """Before the fix the run saved an all-nan z and reported an accuracy. Catches a check of z alone (z stays
    finite while the loss overflows to inf at step 36), a check after the checkpoint/report, and history or
    step losses that include the diverged epoch."""
    from raysub.engine.cluster import ensure_ray
    from raysub.pipeline.plan import plan
    from raysub.runs.records import init_run
    from raysub.pipeline.train import divergence_line, run_subspace

    cfg = load_config(None, ["train.epochs=3", "train.lr_milestones=[]", "train.projection=dense", "train.dim=20",
                             "train.lr=100", "cluster.num_workers=2", f"run_dir={tmp_path}/r"])
    info = plan(cfg)
    ensure_ray(cfg)
    init_run(cfg, info, resuming=False, overwrite=False)
    run = RunDir(cfg.run_dir)
    out = run_subspace(cfg, run, quiet)
    assert out["diverged"] == {"stage": "psgd", "epoch": 2, "step": 36, "loss": None,
                               "reason": "the loss became inf"}
    assert [h["epoch"] for h in out["history"]] == [1]
    assert len(out["step_losses"]) == 22 and all(math.isfinite(v) for v in out["step_losses"])
    assert not run.exists("train/psgd.pt")
    json.dumps(out, allow_nan=False)
    again = run_subspace(cfg, run, quiet)  # Ray restores the divergence report: said again, nothing trained
    assert [again[k] for k in ("diverged", "history", "step_losses")] == [out[k] for k in ("diverged", "history",
                                                                                           "step_losses")]
    assert divergence_line(cfg, out["diverged"]) == ("training 'psgd' diverged at epoch 2 (step 36): the loss "
                                                     "became inf; lower train.lr (now 100) and rerun with --overwrite")


# -- a sweep on Ray Tune -----------------------------------------------------------------------------------

def test_diverged_sweep_trial_fails_its_d_visibly(ray_session, tmp_path, capsys):
    """fastjl at train.lr=30: d=300 overflows in epoch 2 (step 34, replayed in one process), d=5 does not. Before the fix the trial's best finite epoch counted
    as its accuracy; catches a diverged trial reported as unfinished (the sweep would stop with an error) or
    as an accuracy, and a table / trials.csv / results.json that does not name it."""
    from raysub.cli import main

    rc = main(["sweep", "sweep_digits", "train.epochs=2", "train.lr_milestones=[]", "train.lr=30",
               "sweep.seeds=[0]", "sweep.refine=0", "sweep.baseline=0.97", "sweep.families=[fastjl]",
               "sweep.dims=[5,300]", f"run_dir={tmp_path}/sw"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    run = RunDir(f"{tmp_path}/sw")
    res = json.loads(run.read_text("results.json"))
    by_dim = {t["dim"]: t for t in res["trials"]}
    assert by_dim[300]["diverged"] == 2 and by_dim[300]["epochs_run"] == 1 and by_dim[300]["val_acc"] == 0.0
    assert "diverged" not in by_dim[5]
    assert [(p["dim"], p["diverged"]) for p in res["points"]] == [(5, 0), (300, 1)]
    assert res["families"]["fastjl"]["d_int"] is None and res["families"]["fastjl"]["diverged"] == 1
    assert "diverged, so failing their d: fastjl d=300 seed 0 (epoch 2)" in captured.out
    rows = {int(r["dim"]): r for r in csv.DictReader(io.StringIO(run.read_text("trials.csv")))}
    assert rows[300]["diverged"] == "2" and rows[5]["diverged"] == ""


def test_a_sweep_whose_baseline_diverged_says_so(ray_session, tmp_path):
    """The identity baseline at sgd.lr=1e5 overflows in epoch 1 (replayed in one process): no target can be set.
    Catches averaging the diverged baseline's 0 into the target (the sweep would end with every family
    "passing" a target of 0) and a message that blames something else."""
    cfg = load_config(os.path.join(CONFIG_DIR, "sweep_digits.yaml"), [
        "train.epochs=2", "train.lr_milestones=[]", "sgd.lr=1e5", "sweep.seeds=[0]", "sweep.refine=0",
        "sweep.families=[fastjl]", "sweep.dims=[5]", f"run_dir={tmp_path}/sw"])
    with pytest.raises(DivergedError) as err:
        sweep.run_sweep(cfg, say=quiet)
    assert str(err.value) == ("every full-training baseline trial diverged (first: seed 0 at epoch 1): lower sgd.lr "
                              "(now 100000) and rerun with --overwrite")
    assert not os.path.exists(f"{tmp_path}/sw/results.json")
