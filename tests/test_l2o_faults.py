"""Faults in the learned optimizer's run directories: a kill at any instant of a meta-training save, weights whose
bytes changed on disk, θ0 under another run's basis, and ``l2o tune``'s best_config.yaml in a moved directory.

Meta-training runs in-process here: `FakeRay` stands in for Ray (actors are plain objects), so a save can be
killed at every one of its writes in turn within seconds; `test_l2o_meta.py` runs the same code on real Ray.
"""
import importlib.util
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from raysub.cli import QUICKSTART, main
from raysub.storage import LOCK, RunDir
from helpers import tree as tree_digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["data.val_fraction=0.2", "train.projection=dense", "train.dim=8", "l2o.hidden_size=4", "data.augment=false",
        "data.batch_size=32", "l2o.steps=4", "l2o.unroll=2", "l2o.optimizees=2", "l2o.actors=2",
        "l2o.validate_every=1", "l2o.validation_optimizees=1", "l2o.z0_std=0.1", "l2o.init=random",
        "tracking.tensorboard=false"]


# -- Ray, in-process -------------------------------------------------------------------------------------

class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _Handle:
    """An actor handle whose ``.method.remote(...)`` calls the worker's method at once."""

    def __init__(self, worker):
        self._worker = worker

    def __getattr__(self, name):
        return _Remote(getattr(self._worker, name))


class _ActorClass:
    def __init__(self, cls):
        self.cls = cls

    def remote(self, *args):
        return _Handle(self.cls(*args))


def _patch_ray(mp):
    import ray

    import raysub.engine.cluster as cluster
    import raysub.l2o.meta_train as train
    from raysub.l2o.optimizee import OptimizeeWorker

    mp.setattr(cluster, "ensure_ray", lambda *a, **k: None)
    mp.setattr(ray, "put", lambda obj: obj)
    mp.setattr(ray, "get", lambda refs: refs)
    mp.setattr(ray, "kill", lambda actor: None)
    mp.setattr(train, "_actor_class", lambda cpus: _ActorClass(OptimizeeWorker))


@pytest.fixture
def fake_ray(monkeypatch):
    """`meta_train` without a Ray cluster: object refs are the objects, actors live in this process."""
    _patch_ray(monkeypatch)


def meta_args(run, *extra):
    return ["l2o", "meta-train", QUICKSTART, f"run_dir={run}", *TINY, *extra]


def committed(run, name):
    """The path in ``run`` of the committed meta-training file ``name`` and its sha256: in the generation the
    manifest names, or flat in l2o/ (the layout before generations)."""
    manifest = json.loads((run / "manifest.json").read_text())
    rel = f"{manifest['stages']['l2o'].get('dir') or 'l2o'}/{name}"
    return rel, manifest["shards"][rel]


def committed_checkpoint(run):
    """The checkpoint the run's manifest commits (verified), whatever the layout."""
    return RunDir(str(run)).read_torch(*committed(run, "checkpoint.pt"))


class Killed(BaseException):
    """The process died: nothing after this point is written (a BaseException, as a kill is no error)."""


def kill_at(monkeypatch, k):
    """From the ``k``-th write, rename or delete into a run on, every one fails: the process is dead. The lock
    file is left out (in this process a dead owner's lock would be a live one's; `test_lock.py` covers
    takeovers). Returns the counter: ``calls[0]`` writes happened."""

    calls = [0]
    real_write, real_delete = RunDir.write_bytes, RunDir.delete

    def tick(rel):
        if rel == LOCK:
            return
        calls[0] += 1
        if k is not None and calls[0] >= k:
            raise Killed(f"killed at write {calls[0]} ({rel})")

    def write_bytes(self, rel, data):
        tick(rel)
        return real_write(self, rel, data)

    def delete(self, *parts):
        tick("/".join(parts))
        return real_delete(self, *parts)

    monkeypatch.setattr(RunDir, "write_bytes", write_bytes)
    monkeypatch.setattr(RunDir, "delete", delete)
    return calls


# -- a kill at any instant of a save ---------------------------------------------------------------------

def test_kill_at_every_write_of_a_save_then_resume_reproduces_the_run(tmp_path, fake_ray, monkeypatch, capsys):
    """A run meta-trained to meta-step 2, resumed towards 4 (a save at each of meta-steps 3 and 4), is killed at
    its 1st, 2nd, … write in turn, through the last one; each time `--resume` must then finish and reproduce the
    uninterrupted run's φ bit for bit, and the committed checkpoint must read at every instant. Mutation caught:
    checkpoint.pt/weights.pt/history.json replaced under their committed names before the manifest commit (the
    old code: '--resume: checkpoint.pt is corrupted … --overwrite'), older generations deleted before the commit,
    a resume that reads an uncommitted generation."""
    assert main(meta_args(tmp_path / "ref", "l2o.meta_steps=4")) == 0
    ref = committed_checkpoint(tmp_path / "ref")
    assert main(meta_args(tmp_path / "base", "l2o.meta_steps=2")) == 0
    capsys.readouterr()

    with monkeypatch.context() as m:  # how many writes the resume makes
        shutil.copytree(tmp_path / "base", tmp_path / "count")
        calls = kill_at(m, None)
        assert main(meta_args(tmp_path / "count", "l2o.meta_steps=4", "--resume")) == 0
    total = calls[0]
    assert total >= 12, total  # two saves of 3 files + manifest and copies each
    for k in range(1, total + 1):
        run = tmp_path / f"k{k}"
        shutil.copytree(tmp_path / "base", run)
        with monkeypatch.context() as m:
            kill_at(m, k)
            with pytest.raises(Killed):
                main(meta_args(run, "l2o.meta_steps=4", "--resume"))
        step = committed_checkpoint(run)["meta_step"]  # the old state or the new one, verified
        assert step in (2, 3, 4), (k, step)
        capsys.readouterr()
        rc = main(meta_args(run, "l2o.meta_steps=4", "--resume"))
        assert rc == 0, (k, capsys.readouterr().err)
        ck = committed_checkpoint(run)
        assert ck["meta_step"] == 4
        for name in ref["phi"]:
            assert torch.equal(ck["phi"][name], ref["phi"][name]), (k, name)
        current = json.loads((run / "manifest.json").read_text())["stages"]["l2o"].get("dir")
        if current is not None:  # the killed save's generation is gone once another commits
            assert [f"l2o/ckpt/{g}" for g in os.listdir(run / "l2o" / "ckpt")] == [current], k
        shutil.rmtree(run)


def test_resume_of_a_run_with_the_flat_layout(tmp_path, fake_ray, capsys):
    """A run written before generations (l2o/checkpoint.pt, weights.pt, history.json committed flat) resumes,
    and its weights read through the run directory before and after. Mutation caught: old runs unreadable."""
    from raysub.l2o import load_learned_optimizer
    from raysub.l2o.layout import CHECKPOINT, HISTORY, WEIGHTS

    run = tmp_path / "old"
    assert main(meta_args(run, "l2o.meta_steps=2")) == 0
    r = RunDir(str(run))
    manifest = r.read_json("manifest.json")
    for name, flat in (("checkpoint.pt", CHECKPOINT), ("weights.pt", WEIGHTS), ("history.json", HISTORY)):
        rel = committed(run, name)[0]
        shutil.copyfile(run / rel, run / flat)
        manifest["shards"][flat] = manifest["shards"].pop(rel)
    del manifest["stages"]["l2o"]["dir"]
    shutil.rmtree(run / "l2o" / "ckpt")
    r.write_json("manifest.json", manifest)
    _, before = load_learned_optimizer(str(run))
    assert main(meta_args(run, "l2o.meta_steps=3", "--resume")) == 0, capsys.readouterr().err
    assert committed_checkpoint(run)["meta_step"] == 3 and not (run / CHECKPOINT).exists()
    _, after = load_learned_optimizer(str(run / "l2o" / "weights.pt"))
    assert set(after) == set(before)


# -- weights whose bytes changed -------------------------------------------------------------------------

def flip_param_byte(path):
    """Flip one bit inside a tensor of a weights file: it still loads, with one value changed."""
    data = bytearray(open(path, "rb").read())
    blob = torch.load(io.BytesIO(bytes(data)), weights_only=True)
    t = blob["params"]["out.weight"].numpy().tobytes()
    i = data.find(t)
    assert i > 0
    data[i + len(t) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory):
    """A finished meta-training run (in-process Ray); tests copy it before they damage it."""
    run = tmp_path_factory.mktemp("meta") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _patch_ray(mp)
        assert main(meta_args(run, "l2o.meta_steps=1")) == 0
    return run


def committed_weights(run):
    return run / committed(run, "weights.pt")[0]


def _check_refused(rc, err, out_dir, before, where):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert "corrupted" in lines[0] and "Traceback" not in err
    assert tree_digest(where) == before
    assert out_dir is None or not os.path.exists(out_dir)


@pytest.mark.parametrize("how", ["run", "l2o/weights.pt", "generation"])
def test_train_with_flipped_weights_is_refused(tmp_path, meta_run, capsys, how):
    """`raysub train CONFIG` with train.optimizer=l2o and optimizer_options.weights = the meta-training run
    (RUN), RUN/l2o/weights.pt, or the committed generation's file, one bit of a tensor of the committed weights
    flipped: exit 2, one line, no run directory, the meta-training run's bytes unchanged. The old code trained
    with the damaged φ and exited 0. Mutation caught: the reader ignoring the manifest's sha256 (and the one in
    the file), or reading the copy l2o/weights.pt instead of the committed generation."""
    run = tmp_path / "mt"
    shutil.copytree(meta_run, run)
    flip_param_byte(committed_weights(run))
    target = {"run": run, "l2o/weights.pt": run / "l2o" / "weights.pt", "generation": committed_weights(run)}[how]
    before = tree_digest(run)
    out = tmp_path / "train"
    rc = main(["train", QUICKSTART, f"run_dir={out}", "train.projection=dense", "train.dim=8", "train.epochs=1",
               "train.optimizer=l2o", f"train.optimizer_options={{weights: {target}}}", "cluster.num_workers=1"])
    _check_refused(rc, capsys.readouterr().err, out, before, run)


def test_readers_use_the_committed_weights_not_the_copy(tmp_path, meta_run):
    """RUN/l2o/weights.pt is a copy for people; readers given RUN or that path read the committed generation's
    file. Mutation caught: a reader trusting the copy (stale after a kill between a commit and its copy)."""
    from raysub.l2o import load_learned_optimizer

    run = tmp_path / "mt"
    shutil.copytree(meta_run, run)
    flip_param_byte(run / "l2o" / "weights.pt")
    _, ok = load_learned_optimizer(str(committed_weights(run)))
    for target in (run, run / "l2o" / "weights.pt"):
        _, params = load_learned_optimizer(str(target))
        assert all(torch.equal(params[k], ok[k]) for k in ok)


def test_standalone_weights_file_verifies_itself(tmp_path):
    """A weights.pt outside any run (copied away, or the meta-test's hand-built one) carries its own sha256: one
    flipped bit is refused. Mutation caught: no digest stored, or not compared."""
    from raysub.errors import ConfigError
    from raysub.l2o import load_learned_optimizer, save_learned_optimizer
    from raysub.l2o.lstm import LearnedOptimizerConfig, adam_like_params

    config = LearnedOptimizerConfig(hidden_size=4, step_scale=0.1)
    path = str(tmp_path / "w.pt")
    save_learned_optimizer(path, config, adam_like_params(config))
    load_learned_optimizer(path)
    flip_param_byte(path)
    with pytest.raises(ConfigError, match="corrupted"):
        load_learned_optimizer(path)


def _job(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, *path))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_meta_test_jobs_refuse_flipped_weights(tmp_path, meta_run, capsys):
    """jobs/l2o_meta_test.py and jobs/bench/l2o_meta_test.py with --weights RUN whose committed weights.pt has one
    flipped bit: exit 2, one line, no output directory, the run's bytes unchanged (old code: it meta-tested the
    damaged φ)."""
    run = tmp_path / "mt"
    shutil.copytree(meta_run, run)
    flip_param_byte(committed_weights(run))
    before = tree_digest(run)
    out = tmp_path / "out"
    from raysub.bench import meta_test_job

    rc = meta_test_job.main(
        ["quickstart", "data.val_fraction=0.2", "train.projection=dense", "train.dim=8", "--weights", str(run),
         "--steps", "4", "--horizons", "1", "--seeds", "1", "--val-seeds", "1", "--lr-grid", "psgd=0.3",
         "--out", str(out)])
    _check_refused(rc, capsys.readouterr().err, out, before, run)
    out2 = tmp_path / "out2"
    rc = importlib.import_module("raysub.bench.l2o_meta_test").main(
        ["--config", "quickstart", "--basis-run", str(run), "--weights", str(run), "--out", str(out2),
         "train.projection=dense", "train.dim=8", "data.val_fraction=0.2"])
    _check_refused(rc, capsys.readouterr().err, out2, before, run)


def test_tuning_weights_are_checked_against_results_json(tmp_path, meta_run, capsys):
    """`raysub train` with optimizer_options.weights = an `l2o tune` directory (its RUN/l2o/weights.pt, whose
    sha256 results.json records), one bit flipped: exit 2, one line naming results.json, nothing written.
    Mutation caught: the tuning's weights read without results.json's sha256."""
    from raysub.l2o import load_learned_optimizer

    tuning = RunDir(str(tmp_path / "tuning"))
    data = committed_weights(meta_run).read_bytes()
    checksum = tuning.write_bytes("l2o/weights.pt", data)
    tuning.write_json("l2o_tune/results.json", {"best": {"trial": "h4-x_00000", "weights_sha256": checksum}})
    load_learned_optimizer(tuning.uri)
    flip_param_byte(str(tmp_path / "tuning" / "l2o" / "weights.pt"))
    before = tree_digest(tmp_path / "tuning")
    out = tmp_path / "train"
    rc = main(["train", QUICKSTART, f"run_dir={out}", "train.projection=dense", "train.dim=8", "train.epochs=1",
               "train.optimizer=l2o", f"train.optimizer_options={{weights: {tuning.uri}}}",
               "cluster.num_workers=1"])
    err = capsys.readouterr().err
    _check_refused(rc, err, out, before, tmp_path / "tuning")
    assert "l2o_tune/results.json" in err


def test_tune_copies_the_best_trials_weights_verified(tmp_path, meta_run):
    """`l2o tune` takes the best trial's committed weights through `best_weights`, verified against the trial's
    manifest. Mutation caught: the copy read unverified (a damaged trial file would become the tuning's φ)."""
    from raysub.errors import StorageError
    from raysub.l2o.tune import best_weights

    trial = tmp_path / "trials" / "h4-x_00000"
    shutil.copytree(meta_run, trial)
    assert best_weights(RunDir(str(trial))) == committed_weights(trial).read_bytes()
    flip_param_byte(str(committed_weights(trial)))
    with pytest.raises(StorageError, match="corrupted"):
        best_weights(RunDir(str(trial)))


# -- θ0 under another run's basis ------------------------------------------------------------------------

def fake_basis_run(path, dim=4):
    """A run directory with a seed-0 θ0 of the quickstart MLP and a committed `dim`-dim DLDR basis (random
    orthonormal directions), as `raysub basis` lays it out."""
    from raysub.config import load_config
    from raysub.pipeline.plan import plan
    from raysub.storage import ColumnWriter

    cfg = load_config(QUICKSTART, [f"run_dir={path}", "seed=0"])
    info = plan(cfg)
    n = info["num_params"]
    run = RunDir(str(path))
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((n, dim)))
    with run.open_writer("basis/g0/block-0.arrow") as sink:
        w = ColumnWriter(sink, dim)
        w.write(q.T.astype(np.float32))
        w.close()
    blocks = [{"path": "basis/g0/block-0.arrow", "sha256": sink.sha256}]
    spectrum = {"dim": dim, "blocks": blocks, "num_snapshots": dim + 1, "singular_values": [1.0] * (dim + 1),
                "explained_variance_ratio": [1.0 / (dim + 1)] * (dim + 1)}
    shards = {"theta0.pt": run.write_torch("theta0.pt", info["model"].state_dict()),
              "basis/g0/block-0.arrow": sink.sha256, "basis/g0/spectrum.json": run.write_json(
                  "basis/g0/spectrum.json", spectrum)}
    run.write_json("manifest.json", {"num_params": n, "shards": shards, "config": cfg.to_dict(),
                                     "stages": {"basis": {"complete": True, "dir": "basis/g0", "dim": dim}},
                                     "summary": {"results": {}, "timings": {}}})
    return run


def test_meta_train_under_a_basis_run_uses_its_theta0(tmp_path, fake_ray, capsys):
    """`l2o meta-train` with seed=7 in a seed-0 run's DLDR basis writes the basis run's θ0 as its own (pinned:
    used, not refused), so the optimizees train around the point the basis was built from. The old code wrote a
    θ0 seeded with 7. Mutation caught: a freshly seeded θ0 under another run's basis."""
    basis = fake_basis_run(tmp_path / "basis")
    run = tmp_path / "mt"
    args = [a for a in meta_args(run, "l2o.meta_steps=1") if not a.startswith("train.")]
    rc = main([*args, "seed=7", "train.projection=dldr", "train.dim=4", f"train.basis_run={basis.uri}"])
    assert rc == 0, capsys.readouterr().err
    mine = RunDir(str(run)).read_theta0()
    ref = basis.read_theta0()
    assert all(torch.equal(mine[k], ref[k]) for k in ref)


# -- l2o tune's best_config.yaml in a moved directory ---------------------------------------------------

def test_best_config_resume_line_holds_wherever_the_tuning_lies(tmp_path):
    """The header's resume line names the config and the trial relative to the tuning's directory: after the
    tuning is moved, running it from there resumes the trial where it now is. Mutation caught: an absolute path
    baked in (the old header named the tuning's original location, whose run_dir no longer exists — a --resume
    there would start a new meta-training)."""
    from raysub.config import Config, load_config
    from raysub.l2o.tune import BEST_CONFIG, best_config_header, trial_config

    base = load_config(QUICKSTART, [f"run_dir={tmp_path / 'a'}", *TINY])
    trial = "h4-x_00000"
    best = {"val_acc": 0.5, "convergence_step": 3.0, "meta_step": 2}
    cfg = Config.from_dict(trial_config(base.to_dict(), {"hidden_size": 4}, str(tmp_path / "a" / "trials" / trial)))
    text = cfg.to_yaml(best_config_header(trial, best))
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert not any(str(tmp_path) in line for line in header), header
    resume = [line for line in header if "--resume" in line]
    assert len(resume) == 1 and resume[0].split("raysub ", 1)[1] == (
        f"l2o meta-train {BEST_CONFIG} run_dir=trials/{trial} --resume")
    moved = tmp_path / "b"
    (moved / "l2o_tune").mkdir(parents=True)
    (moved / BEST_CONFIG).write_text(text)
    cwd = os.getcwd()
    try:
        os.chdir(moved)
        words = resume[0].split("raysub ", 1)[1].split()
        where = RunDir(load_config(words[2], [words[3]]).run_dir).uri  # as meta-train resolves it, from here
    finally:
        os.chdir(cwd)
    assert where == str(moved / "trials" / trial)
