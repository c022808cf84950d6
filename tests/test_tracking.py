"""Experiment tracking (raysub.tracking): the curves Ray's TensorBoard and MLflow loggers write for every kind of
stage, read back — the event files with TensorBoard's own reader, the MLflow runs with MLflow's client — and pinned
to the records the stages write themselves (summary.json, Tune's result.json, l2o/history.json).

One tiny run per kind of stage: `raysub run` (the Ray Train stages: sample and train, through the Train V2
`UserCallback`), a one-trial sweep (Ray Tune's own loggers), a meta-training (the driver's `Tracker`).
"""
import glob
import json
import os

import numpy as np
import pytest

from raysub.cli import main
from raysub.config import load_config
from raysub.errors import ConfigError
from raysub.storage import RunDir


def scalars(logdir: str):
    """{tag: [(step, value), ...]} of every scalar in the event files of ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(values):
    """Values as an event file holds them (float32)."""
    return [float(np.float32(v)) for v in values]


def mlflow_runs(store: str, experiment: str):
    """{run name: run} of ``experiment`` in the file store ``store``, and the client."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow ≥ 3.7 reads a file store only with it
    client = MlflowClient("file://" + store)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {store}"
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}, client


def history(client, run, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


# -- checks before anything starts --------------------------------------------------------------------------

def test_mlflow_not_installed_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """Mutation caught: tracking.mlflow=true without MLflow failing later inside the Train controller (a traceback,
    a half-written run) instead of one line naming the extra to install."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main(["run", "tracking.mlflow=true", f"run_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tracking.mlflow=true needs MLflow" in err and "raysub[tracking]" in err
    assert not (tmp_path / "r").exists()


def test_mlflow_default_store_on_object_storage_is_refused():
    """MLflow's file store is local only: a run directory on S3 needs a tracking URI. Mutation caught: a file store
    silently created on the driver's disk (or under a path named after the bucket) for an s3:// run."""
    from raysub.tracking import tracking_problems

    cfg = load_config(None, ["run_dir=s3://bucket/run", "tracking.mlflow=true"])
    (line,) = [p for p in tracking_problems(cfg) if "object storage" in p]
    assert "tracking.mlflow_tracking_uri" in line
    ok = load_config(None, ["run_dir=s3://bucket/run", "tracking.mlflow=true",
                            "tracking.mlflow_tracking_uri=http://127.0.0.1:5000"])
    assert not [p for p in tracking_problems(ok) if "object storage" in p]
    with pytest.raises(ConfigError, match="tracking.mlflow: expected true or false"):
        load_config(None, ["tracking.mlflow=maybe"])


# -- the Train stages' callback ------------------------------------------------------------------------------

class FakeTracker:
    def __init__(self):
        self.calls = []

    def log(self, result, step):
        self.calls.append(("log", step))

    def end(self, failed=False):
        self.calls.append(("end", failed))


def test_train_report_callback_ends_the_run_on_the_last_report_divergence_or_final_failure():
    """Mutation caught: the MLflow run left RUNNING after a finished stage (no end on the report that carries the
    history), a diverged run recorded FINISHED, a failure Ray Train will retry ending the run, or the step taken
    from the report count instead of the epoch (a resumed stage starts at its checkpoint's epoch)."""
    from raysub.tracking import _train_report_tracking

    cls = _train_report_tracking()
    cb = cls(FakeTracker(), max_failures=1)
    cb.after_report(None, [{"epoch": 3, "train_loss": 0.5}, {"epoch": 3, "train_loss": 0.5}], None)
    cb.after_exception(None, {0: RuntimeError("killed")})  # Ray Train retries this one (max_failures=1)
    cb.after_report(None, [{"epoch": 4, "history": [{}]}], None)
    assert cb.tracker.calls == [("log", 3), ("log", 4), ("end", False)]
    diverged = cls(FakeTracker(), max_failures=0)
    diverged.after_report(None, [{"diverged": {"epoch": 2, "step": 30}}], None)
    assert diverged.tracker.calls == [("log", 2), ("end", True)]
    failed = cls(FakeTracker(), max_failures=1)
    failed.after_exception(None, {0: RuntimeError()})
    failed.after_exception(None, {0: RuntimeError()})  # past max_failures: Ray Train gives up
    assert failed.tracker.calls == [("end", True)]
    forever = cls(FakeTracker(), max_failures=-1)
    for _ in range(3):
        forever.after_exception(None, {0: RuntimeError()})
    assert forever.tracker.calls == []


def test_tracker_copies_event_files_to_object_storage(tmp_path, monkeypatch):
    """A run directory on a non-local pyarrow filesystem (pyarrow's in-memory mock): Ray's logger writes local
    files, the tracker copies them to RUN/tensorboard/STAGE there after every result (tensorboardX writes from a
    background thread, so a copy holds the points up to the previous result or so), and all of them when the stage
    ends. Mutation caught: event files left in the local staging directory (or copied only at the end, so no live
    curve), or written to a local path named like the URI."""
    from raysub.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run_dir=mock://bucket/run"])
    run = RunDir("mock://bucket/run")
    tracker = Tracker(cfg, run, "l2o")

    def event_file():
        files = run.listdir("tensorboard", "l2o")
        assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
        return files[0]

    def fetch():
        name = event_file()
        local = tmp_path / "copy"
        local.mkdir(exist_ok=True)
        (local / name).write_bytes(run.read_bytes(f"tensorboard/l2o/{name}").to_pybytes())
        return scalars(str(local))

    tracker.log({"loss": 0.75, "history": [1.0, 2.0], "nested": {"a": 2}}, step=1)
    event_file()  # there after the first result: live
    staging = tracker._staging
    tracker.log({"loss": 0.5, "nested": {"a": 3}}, step=2)
    tracker.end()
    got = fetch()
    assert got["ray/tune/loss"] == [(1, 0.75), (2, 0.5)] and got["ray/tune/nested/a"] == [(1, 2.0), (2, 3.0)]
    assert not any("history" in t for t in got)  # a run's whole record is not a curve
    assert not os.path.exists(staging) and not (tmp_path / "run").exists()  # nothing left on the local disk


# -- real stages ---------------------------------------------------------------------------------------------

def test_sampling_writes_tensorboard_and_mlflow(ray_session, tmp_path):
    """The sampling stage (Ray Train) with MLflow on: one point per epoch in RUN/tensorboard/sample and in the MLflow
    run "sample" of the file store RUN/mlruns, equal to the epochs summary.json records; the run is FINISHED and
    carries the config as params. Mutation caught: the stage not wired to the callback, the step off by one or
    counting reports, stale values, whole-run lists logged as curves, the MLflow run left RUNNING."""
    from raysub import pipeline

    cfg = load_config(None, ["sgd.epochs=2", "sample.epochs=2", "sample.snapshot_every_steps=4", "basis.dim=5",
                             "sgd.lr_milestones=[]", "cluster.num_workers=1", "tracking.mlflow=true",
                             f"run_dir={tmp_path / 'q'}"])
    pipeline.stage_sample(cfg, say=lambda _: None)
    rows = RunDir(cfg.run_dir).read_json("summary.json")["results"]["sgd"]["history"]
    assert [r["epoch"] for r in rows] == [1, 2]
    tb = scalars(str(tmp_path / "q" / "tensorboard" / "sample"))
    assert not any("history" in t or "step_losses" in t for t in tb)
    runs, client = mlflow_runs(str(tmp_path / "q" / "mlruns"), "q")  # the experiment: the run directory's name
    (name,) = runs
    run = runs["sample"]
    assert run.info.status == "FINISHED" and run.data.tags["raysub.stage"] == "sample"
    assert run.data.params["sgd/epochs"] == "2" and run.data.params["basis/dim"] == "5"
    for key in ("train_loss", "test_loss", "test_acc", "num_snapshots"):
        want = [r[key] for r in rows]
        assert tb[f"ray/tune/{key}"] == list(zip([1, 2], f32(want))), key
        assert history(client, run, key) == list(zip([1, 2], want)), key


class Wired(Exception):
    """Raised by a stand-in for the Ray runner: the stage got as far as building it."""


def test_subspace_training_and_l2o_tune_pass_the_callbacks_to_ray(ray_session, tmp_path, monkeypatch):
    """The other two stages hand their callbacks to Ray: subspace training (Ray Train) a `Tracker` of
    "train-LABEL" behind the UserCallback, `raysub l2o tune` Ray's MLflowLoggerCallback to its Tuner (tested by
    stand-ins for TorchTrainer's builder and for Tuner: the runs themselves are what the other tests run). Mutation
    caught: either stage not wired, or the Train stage's tracker named after another stage."""
    import ray.tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    import raysub.engine.cluster
    from raysub.cli import QUICKSTART
    from raysub.l2o.tune import tune_l2o
    from raysub.pipeline.train import run_subspace

    seen = {}

    def torch_trainer(loop, loop_config, cfg, name, storage, callbacks=None):
        seen["train"] = callbacks
        raise Wired

    monkeypatch.setattr(raysub.engine.cluster, "torch_trainer", torch_trainer)
    cfg = load_config(None, [f"run_dir={tmp_path / 't'}", "train.label=p", "tracking.mlflow=true"])
    with pytest.raises(Wired):
        run_subspace(cfg, RunDir(cfg.run_dir), print)
    (cb,) = seen["train"]
    assert type(cb).__name__ == "TrainReportTracking" and cb.tracker.stage == "train-p"
    assert cb.tracker.settings["mlflow"] and cb.tracker.run.uri == str(tmp_path / "t")

    class Tuner:
        def __init__(self, trainable, param_space=None, tune_config=None, run_config=None):
            seen["tune"] = run_config.callbacks
            raise Wired

    monkeypatch.setattr(ray.tune, "Tuner", Tuner)
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path / 'lt'}", "data.val_fraction=0.2", "train.projection=dense",
                                   "train.dim=8", "l2o.hidden_size=4", "l2o.steps=20", "l2o.unroll=5",
                                   "l2o.optimizees=1", "l2o.actors=1", "l2o_tune.samples=1", "tracking.mlflow=true"])
    with pytest.raises(Wired):
        tune_l2o(cfg, say=lambda _: None)
    (cb,) = seen["tune"]
    assert isinstance(cb, MLflowLoggerCallback) and cb.tags["raysub.stage"] == "l2o_tune"


def test_sweep_trials_write_tensorboard_and_mlflow(ray_session, tmp_path, capsys):
    """A one-trial sweep with MLflow on: Tune's own TensorBoard logger leaves the trial's epochs in its directory
    under RUN/tune/ (Tune's storage sync), and Ray's MLflowLoggerCallback an MLflow run named after the trial with
    the same values as the trial's result.json. Mutation caught: the MLflow callback not passed to the Tuner, event
    files left in Ray's session directory instead of the run directory."""
    from raysub.cli import CONFIG_DIR

    run_dir = tmp_path / "sw"
    assert main(["sweep", os.path.join(CONFIG_DIR, "sweep_digits.yaml"), "train.epochs=2", "train.lr_milestones=[]",
                 "sweep.seeds=[0]", "sweep.refine=0", "sweep.families=[dense]", "sweep.dims=[20]",
                 "sweep.baseline=0.97", "tracking.mlflow=true", f"run_dir={run_dir}"]) == 0, capsys.readouterr().err
    (trial,) = [d for d in glob.glob(str(run_dir / "tune" / "coarse" / "*")) if os.path.isdir(d)]
    with open(os.path.join(trial, "result.json")) as fh:
        reports = [json.loads(line) for line in fh]
    assert [r["epoch"] for r in reports] == [1, 2]
    tb = scalars(trial)
    runs, client = mlflow_runs(str(run_dir / "mlruns"), "sw")
    (name,) = runs
    assert name == os.path.basename(trial) and runs[name].info.status == "FINISHED"
    assert runs[name].data.tags["raysub.stage"] == "sweep/coarse"
    for key in ("val_acc", "test_acc", "train_loss"):
        want = [r[key] for r in reports]
        assert tb[f"ray/tune/{key}"] == list(zip([1, 2], f32(want))), key
        assert history(client, runs[name], key) == list(zip([1, 2], want)), key


def test_meta_training_writes_tensorboard_and_mlflow(ray_session, tmp_path):
    """Meta-training (a learner loop on the driver): the meta-loss at every meta-step and every meta-validation
    (the starting φ at meta-step 0 included) in RUN/tensorboard/l2o and an MLflow run "l2o", equal to
    l2o/history.json. Mutation caught: validations logged at the wrong meta-step, the meta-loss curve missing, the
    run not ended."""
    from raysub.cli import QUICKSTART
    from raysub.l2o.meta_train import meta_train

    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path / 'm'}", "data.val_fraction=0.2", "train.projection=dense",
                                   "train.dim=8", "l2o.hidden_size=4", "data.augment=false", "data.batch_size=32",
                                   "l2o.steps=4", "l2o.unroll=2", "l2o.optimizees=1", "l2o.actors=1",
                                   "l2o.meta_steps=2", "l2o.validate_every=1", "l2o.validation_optimizees=1",
                                   "tracking.mlflow=true", "tracking.mlflow_experiment=meta"])
    meta_train(cfg, say=lambda _: None)
    hist = RunDir(cfg.run_dir).read_json("l2o/history.json")
    tb = scalars(str(tmp_path / "m" / "tensorboard" / "l2o"))
    runs, client = mlflow_runs(str(tmp_path / "m" / "mlruns"), "meta")
    run = runs["l2o"]
    assert run.info.status == "FINISHED"
    loss = [(r["meta_step"], r["loss"]) for r in hist["meta"]]
    val = [(r["meta_step"], r["val_acc"]) for r in hist["validation"]]
    assert [s for s, _ in loss] == [1, 2] and [s for s, _ in val] == [0, 1, 2]
    assert tb["ray/tune/loss"] == [(s, float(np.float32(v))) for s, v in loss]
    assert tb["ray/tune/val_acc"] == [(s, float(np.float32(v))) for s, v in val]
    assert history(client, run, "loss") == loss and history(client, run, "val_acc") == val


def test_a_tracking_failure_warns_once_and_the_stage_goes_on(tmp_path, monkeypatch, capsys):
    """The event files' storage fails mid-stage (an outage): one warning, tracking off for the rest of the stage,
    no exception into the stage (in the Train controller that would fail the run). Catches the copy error
    propagating, and a warning repeated per epoch."""
    from raysub.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run_dir=mock://bucket/run2"])
    tracker = Tracker(cfg, RunDir("mock://bucket/run2"), "sample")
    tracker.log({"loss": 1.0}, step=1)

    def outage(*a, **k):
        raise OSError("storage unreachable")

    monkeypatch.setattr(tracker, "_sync", outage)
    tracker.log({"loss": 0.5}, step=2)
    tracker.log({"loss": 0.25}, step=3)
    tracker.end()
    err = capsys.readouterr().err
    assert err.count("experiment tracking of sample stopped (OSError: storage unreachable)") == 1
    assert not tracker.enabled and tracker._staging is None
