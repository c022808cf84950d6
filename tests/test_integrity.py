"""Run-directory integrity: strict JSON, the lock, resume against the stored config, θ0 and index checksums,
commits that leave the old state or the new one, and the CLI's one-line failures.

None of these needs Ray; the stages' own failures under Ray (a worker-group failure through the CLI, a basis
rebuild killed before its commit) are in test_pipeline.py, on its shared runs.
"""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from raysub import cli, pipeline
from raysub.config import load_config
from raysub.errors import ConfigError, DivergedError, StorageError
from raysub.lock import LOCK, RunLock, RunLocked, run_lock
from raysub.runs import records
from raysub.runs.manifest import Manifest
from raysub.pipeline import run as runmod
from raysub.pipeline.basis import basis_dir, load_basis, read_spectrum
from raysub.storage import RunDir, encode_vector


def strict_loads(text: str):
    def bad(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=bad)


# ---------------------------------------------------------------------------------------------------------
# strict JSON, unreadable JSON

def test_json_is_strict_nan_and_inf_become_null(tmp_path):
    """Catches json.dumps' default allow_nan=True (a diverged run wrote a bare NaN into summary.json)."""
    run = RunDir(str(tmp_path))
    run.write_json("s.json", {"acc": float("nan"), "curve": [1.5, float("inf"), -float("inf")], "n": 3,
                              "nested": {"x": (float("nan"),)}})
    text = (tmp_path / "s.json").read_text()
    assert strict_loads(text) == {"acc": None, "curve": [1.5, None, None], "n": 3, "nested": {"x": [None]}}


@pytest.mark.parametrize("content", [b"", b'{"block": 0, "snap', b"\xff\xfe"])
def test_unreadable_json_is_a_one_line_storage_error(tmp_path, content):
    """An empty, truncated or non-UTF-8 JSON file names the file and the fix (was a JSONDecodeError traceback)."""
    (tmp_path / "index.json").write_bytes(content)
    with pytest.raises(StorageError, match=r"index.json is not valid JSON .*rerun the stage"):
        RunDir(str(tmp_path)).read_json("index.json")


# ---------------------------------------------------------------------------------------------------------
# resume against the stored config

def test_config_diff_names_each_changed_key_and_skips_safe_ones():
    """Catches a diff that stops at the first section, misses a nested key, or lets cluster.* through."""
    old = {"seed": 0, "sgd": {"lr": 0.1, "momentum": 0.9}, "cluster": {"num_workers": 1},
           "data": {"num_workers": 0, "batch_size": 64}}
    new = {"seed": 1, "sgd": {"lr": 0.1, "momentum": 0.0}, "cluster": {"num_workers": 4},
           "data": {"num_workers": 2, "batch_size": 32}}
    assert records.config_diff(old, new) == [("data.batch_size", 64, 32), ("seed", 0, 1), ("sgd.momentum", 0.9, 0.0)]
    assert records.config_diff(old, old) == []


def _committed_run(tmp_path, overrides=(), resume=False, overwrite=False):
    """A committed run directory without Ray: plan, prepare, init_run (θ0 + manifest)."""
    cfg = load_config(None, [f"run_dir={tmp_path}/run", *overrides])
    info = pipeline.plan.plan(cfg)
    run = RunDir(cfg.run_dir)
    cfg.run_dir = run.uri
    with run_lock(run):
        resuming = records.prepare_run_dir(run, resume, overwrite, cfg)
        records.init_run(cfg, info, resuming, overwrite)
    return cfg, info, run


def test_resume_refuses_a_config_that_changes_results(tmp_path):
    """The issue's case: sample seed 0, then `--resume seed=1` mixed two runs; cluster.* may change."""
    cfg, _, run = _committed_run(tmp_path)
    other = load_config(None, [f"run_dir={run.uri}", "seed=1", "sgd.lr=0.05"])
    with pytest.raises(ConfigError) as exc:
        records.prepare_run_dir(run, True, False, other)
    msg = str(exc.value)
    assert "seed (0 in the run, 1 now)" in msg and "sgd.lr (0.1 in the run, 0.05 now)" in msg and "\n" not in msg
    wider = load_config(None, [f"run_dir={run.uri}", "cluster.num_workers=2", "cluster.max_failures=3"])
    assert records.prepare_run_dir(run, True, False, wider) is True


def test_stage_config_and_copies_come_from_the_manifest(tmp_path):
    """A kill between the manifest's commit and its copies leaves config.yaml/summary.json one commit behind; the
    next command re-syncs them from the manifest (catches readers that trust the copies)."""
    import yaml

    cfg, _, run = _committed_run(tmp_path, ["basis.dim=5"])
    manifest = run.read_json("manifest.json")
    manifest["config"]["basis"]["dim"] = 7
    manifest["summary"]["results"]["x"] = {"test_acc": 0.5}
    run.write_json("manifest.json", manifest)  # "killed" before the copies
    assert yaml.safe_load(run.read_text("config.yaml"))["basis"]["dim"] == 5
    assert runmod._stage_config(run, [], "basis").basis.dim == 7
    records.settle(run, records.open_manifest(run))  # a command past its checks (open_manifest writes nothing)
    assert yaml.safe_load(run.read_text("config.yaml"))["basis"]["dim"] == 7
    assert run.read_json("summary.json")["results"]["x"] == {"test_acc": 0.5}


# ---------------------------------------------------------------------------------------------------------
# θ0: written by the run itself, verified on every read

@pytest.mark.parametrize("flag", ["resume", "overwrite"])
def test_fresh_run_never_reuses_a_theta0_it_did_not_write(tmp_path, flag):
    """A theta0.pt that no manifest commits (another run's, here a seed-1 model) is replaced by this run's own,
    on --overwrite and on --resume of a run killed before its first commit (it used to be kept)."""
    cfg1 = load_config(None, [f"run_dir={tmp_path}/run", "seed=1"])
    foreign = pipeline.plan.plan(cfg1)["model"].state_dict()
    RunDir(f"{tmp_path}/run").write_torch("theta0.pt", foreign)
    cfg, info, run = _committed_run(tmp_path, **{flag: True})  # seed 0
    mine = run.read_theta0()
    assert all(torch.equal(mine[k], v) for k, v in info["model"].state_dict().items())
    assert not all(torch.equal(mine[k], v) for k, v in foreign.items())


def test_theta0_is_verified_against_the_manifest(tmp_path):
    """Catches a reader that loads theta0.pt unchecked (the concurrent run's θ0 passed every checksum)."""
    cfg, info, run = _committed_run(tmp_path)
    state = {k: v + 1 for k, v in info["model"].state_dict().items()}
    run.write_torch("theta0.pt", state)
    with pytest.raises(StorageError, match="theta0.pt is corrupted"):
        run.read_theta0()
    with pytest.raises(StorageError, match="theta0.pt is corrupted"):
        records.init_run(cfg, info, True, False)  # a resume verifies it too
    manifest = run.read_json("manifest.json")
    del manifest["shards"]["theta0.pt"]
    run.write_json("manifest.json", manifest)
    with pytest.raises(StorageError, match="no checksum"):
        run.read_theta0()


def test_resume_of_a_directory_that_is_not_a_run_is_refused(tmp_path):
    """--resume with no manifest may only replace a killed run's own first files, never someone's data."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    cfg = load_config(None, [f"run_dir={tmp_path}/run"])
    info = pipeline.plan.plan(cfg)
    with pytest.raises(StorageError, match="no manifest.json but holds notes.txt"):
        records.init_run(cfg, info, True, False)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------
# trajectory indices and basis generations

def _fake_trajectory(run: RunDir, T: int = 4, n: int = 6):
    from raysub.storage import block_index_rel, snapshot_rel

    shards, index = {}, []
    rng = np.random.default_rng(0)
    for s in range(T):
        rel = snapshot_rel(0, s)
        shards[rel] = run.write_bytes(rel, encode_vector(rng.standard_normal(n).astype(np.float32)))
        index.append({"snapshot": s, "step": s, "epoch": 0, "path": rel, "sha256": shards[rel]})
    shards[block_index_rel(0)] = run.write_json(block_index_rel(0), {"block": 0, "start": 0, "stop": n,
                                                                      "snapshots": index})
    return shards


def test_block_index_is_verified_against_the_manifest(tmp_path):
    """Catches an index.json read unchecked: an edited index (dropping a snapshot) would silently shrink T."""
    from raysub.pipeline.sample import collect_trajectory

    run = RunDir(str(tmp_path))
    shards = _fake_trajectory(run)
    blocks, sums = collect_trajectory(run, shards)
    assert len(blocks[0]["snapshots"]) == 4 and sums == shards
    index = run.read_json("trajectory/block_000/index.json")
    index["snapshots"] = index["snapshots"][:3]
    run.write_json("trajectory/block_000/index.json", index)
    with pytest.raises(StorageError, match="index.json is corrupted"):
        collect_trajectory(run, shards)
    with pytest.raises(StorageError, match="has no checksum in the manifest"):
        collect_trajectory(run, {k: v for k, v in shards.items() if not k.endswith("index.json")})
    run.write_json("trajectory/block_000/index.json", {})
    with pytest.raises(StorageError, match="not a trajectory block index"):
        collect_trajectory(run)


def test_basis_in_force_is_the_committed_generation(tmp_path):
    """A rebuild killed before its commit leaves the previous basis in force: its files, its dim, no
    'corrupted' error (the old layout wrote basis/spectrum.json over the committed one)."""
    from raysub.storage import ColumnWriter, basis_rel

    run = RunDir(str(tmp_path))

    def write_generation(gen, dim, value):
        with run.open_writer(basis_rel(0, gen)) as sink:
            w = ColumnWriter(sink, dim)
            w.write(np.full((dim, 6), value))
            w.close()
        sha = run.write_json(f"{gen}/spectrum.json", {"dim": dim, "blocks": [{"path": basis_rel(0, gen),
                                                                                 "sha256": sink.sha256}]})
        return {basis_rel(0, gen): sink.sha256, f"{gen}/spectrum.json": sha}

    shards = write_generation("basis/g1", 2, 1.0)
    run.write_json("manifest.json", {"stages": {"basis": {"complete": True, "dir": "basis/g1", "dim": 2}},
                                     "shards": shards})
    write_generation("basis/g2", 3, 2.0)  # a rebuild killed before it committed
    assert basis_dir(run) == "basis/g1" and read_spectrum(run)["dim"] == 2
    np.testing.assert_array_equal(load_basis(run), np.ones((2, 6)))
    assert not run.exists("basis/spectrum.json")


# ---------------------------------------------------------------------------------------------------------
# the lock

def test_lock_records_its_owner_and_refuses_a_second_command(tmp_path):
    """The second command gets one line naming the owner (pid, host, command), and writes nothing."""
    run = RunDir(str(tmp_path / "run"))
    first = RunLock(run, "raysub run seed=0")
    first.acquire()
    try:
        record = json.loads((tmp_path / "run" / LOCK).read_text())
        assert record["pid"] == os.getpid() and record["command"] == "raysub run seed=0"
        assert {"host", "user", "heartbeat", "token", "started"} <= set(record)
        with pytest.raises(RunLocked) as exc:
            RunLock(run, "raysub run seed=1 --overwrite").acquire()
        assert f"in use by 'raysub run seed=0' (pid {os.getpid()}" in str(exc.value)
        assert sorted(os.listdir(tmp_path / "run")) == [LOCK]
    finally:
        first.release()
    assert not (tmp_path / "run").exists()  # created by the lock, left empty: removed


@pytest.mark.system  # a second process holds or held the lock
def test_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path):
    """A killed command (same host, pid gone) must not block `--resume` until a timeout."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    run = RunDir(str(tmp_path))
    run.write_bytes(LOCK, json.dumps({"pid": proc.pid, "host": __import__("platform").node(), "token": "x",
                                      "command": "raysub sample", "heartbeat": time.time()}).encode())
    said = []
    lock = RunLock(run, "raysub sample --resume")
    lock.acquire(said.append)
    lock.release()
    assert len(said) == 1 and f"pid {proc.pid} no longer runs" in said[0] and "raysub sample" in said[0]


@pytest.mark.parametrize("age, taken", [(10, False), (120, True)])
def test_lock_of_another_host_goes_stale_after_the_heartbeat_timeout(tmp_path, age, taken):
    """Catches a stale test with the wrong sign or on the start time instead of the last heartbeat."""
    run = RunDir(str(tmp_path))
    run.write_bytes(LOCK, json.dumps({"pid": 1, "host": "elsewhere", "token": "x", "command": "raysub run",
                                      "started": "long ago", "heartbeat": time.time() - age}).encode())
    lock = RunLock(run, "raysub run --resume", stale_s=60)
    if taken:
        said = []
        lock.acquire(said.append)
        lock.release()
        assert "no heartbeat for 120s" in said[0]
    else:
        with pytest.raises(RunLocked, match="pid 1 on elsewhere"):
            lock.acquire()


def test_lock_heartbeat_advances_while_held(tmp_path):
    run = RunDir(str(tmp_path))
    lock = RunLock(run, "raysub run", stale_s=0.4)
    lock.acquire()
    try:
        first = json.loads((tmp_path / LOCK).read_text())["heartbeat"]
        time.sleep(0.35)
        assert json.loads((tmp_path / LOCK).read_text())["heartbeat"] > first
    finally:
        lock.release()


@pytest.mark.parametrize("exclusive", [True, False])
def test_two_commands_racing_for_one_directory_exactly_one_wins(tmp_path, exclusive):
    """Local disks decide by exclusive create; object storage (no create-if-absent) by write, settle, read back."""
    run = RunDir(str(tmp_path / "run"))
    results = []
    barrier = threading.Barrier(2)
    lost = threading.Event()

    def contender(name):
        lock = RunLock(run, name, settle_s=0.3)
        lock.exclusive_create = exclusive
        barrier.wait()
        try:
            lock.acquire()
            results.append(("won", name))
            lost.wait(timeout=30)  # hold the lock until the other one has tried
            lock.release()
        except RunLocked as exc:
            results.append(("lost", str(exc)))
            lost.set()

    threads = [threading.Thread(target=contender, args=(f"raysub run seed={i}",)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in results) == ["lost", "won"]
    winner = [r[1] for r in results if r[0] == "won"][0]
    assert f"in use by '{winner}'" in [r[1] for r in results if r[0] == "lost"][0]


def test_lock_is_reentrant_and_overwrite_keeps_it(tmp_path):
    """A stage inside `raysub run` reuses the run's lock; `--overwrite` clears everything but the lock."""
    run = RunDir(str(tmp_path))
    (tmp_path / "old.txt").write_text("x")
    with run_lock(run, "raysub run") as outer:
        with run_lock(RunDir(str(tmp_path)), "raysub sample") as inner:
            assert inner is outer
        run.clear()
        assert os.listdir(tmp_path) == [LOCK]
    assert not (tmp_path / LOCK).exists()


@pytest.mark.system  # a second process holds or held the lock
def test_second_cli_command_is_refused_while_another_process_holds_the_lock(tmp_path):
    """Real processes: a holder, then `raysub run --overwrite` (which used to kill the first with a traceback):
    exit 2, one line naming the holder's pid, the holder's directory untouched. Then the holder is SIGKILLed and
    the lock is taken over at once (same host, pid gone)."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom raysub.lock import run_lock\nfrom raysub.storage import RunDir\n"
         f"with run_lock(RunDir({str(run_dir)!r}), 'raysub run seed=0'):\n"
         "    RunDir(sys.argv[1]).write_text('theta0.pt', 'first')\n    print('locked', flush=True)\n"
         "    time.sleep(120)\n", str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = subprocess.run([sys.executable, "-m", "raysub.cli", "run", f"run_dir={run_dir}", "seed=1",
                              "--overwrite"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "'raysub run seed=0'" in lines[0]
        assert (run_dir / "theta0.pt").read_text() == "first"
    finally:
        holder.kill()
        holder.wait()
    said = []
    with run_lock(RunDir(str(run_dir)), "raysub run --resume", say=said.append):
        pass
    assert f"pid {holder.pid} no longer runs" in said[0]


# ---------------------------------------------------------------------------------------------------------
# the CLI's exit codes and one-line failures

def _fail_with(monkeypatch, exc):
    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(pipeline, "run_pipeline", boom)


@pytest.mark.parametrize("exc, code, needle", [
    (ConfigError("bad thing: fix it"), 2, "raysub: error: bad thing: fix it"),
    (DivergedError("sampling diverged at epoch 3"), 3, "raysub: error: sampling diverged at epoch 3"),
    (KeyboardInterrupt(), 130, "raysub: interrupted; continue with: raysub run run_dir="),
    (RuntimeError("disk on fire\nsecond line"), 1, "raysub: error: the command failed (RuntimeError: disk on fire)"),
])
def test_cli_exit_codes_and_one_line(tmp_path, capsys, monkeypatch, exc, code, needle):
    """Each failure class has its exit code and exactly one stderr line; an unexpected error names what failed,
    where the traceback is, and the --resume command."""
    _fail_with(monkeypatch, exc)
    (tmp_path / "run").mkdir()
    assert cli.main(["run", f"run_dir={tmp_path}/run", "--overwrite"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    if code in (1, 130):
        assert err[0].endswith(f"raysub run run_dir={tmp_path}/run --resume")
    if code == 1:
        logs = os.listdir(tmp_path / "run" / "logs")
        assert len(logs) == 1 and "disk on fire" in (tmp_path / "run" / "logs" / logs[0]).read_text()


def test_cli_debug_shows_the_traceback(tmp_path, monkeypatch):
    _fail_with(monkeypatch, RuntimeError("disk on fire"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["run", f"run_dir={tmp_path}/run", "--debug"])


def test_describe_failure_follows_ray_wrappers_to_the_worker_error():
    class TrainingFailedError(Exception):
        def __init__(self):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = {1: ValueError("rank 1: shard missing\n  traceback...")}

    assert cli.describe_failure(TrainingFailedError()) == "a Ray Train worker failed (ValueError: rank 1: shard missing)"


@pytest.mark.parametrize("args", [["train", "{run}", "--resume", "--overwrite"],
                                  ["run", "run_dir={run}", "--resume", "--overwrite"]])
def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys, args):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    assert cli.main([a.format(run=tmp_path / "run") for a in args]) == 2
    assert "--resume and --overwrite exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["file", "uncreatable"])
def test_bad_run_dir_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch, kind):
    """A run_dir that is a file, or cannot be created, is a one-line error before Ray starts (was a traceback
    after start-up)."""
    import raysub.engine.cluster as cluster

    monkeypatch.setattr(cluster, "ensure_ray", lambda *a, **k: pytest.fail("Ray started"))
    target = tmp_path / "afile"
    target.write_text("")
    if kind == "uncreatable":
        target = "/proc/raysub-test/run"  # even root cannot create it
    assert cli.main(["run", f"run_dir={target}"]) == 2
    err = capsys.readouterr().err
    assert ("is a file" if kind == "file" else "cannot be created") in err
    assert os.listdir(tmp_path) == ["afile"]


# ---------------------------------------------------------------------------------------------------------
# stage_train's records (the Ray loop replaced by its result)

def _train_ready(tmp_path, monkeypatch, result):
    """A committed run with a dense projection, Ray's start and the Train loop replaced: run_subspace writes a
    checkpoint directory and returns (or raises) ``result``."""
    import raysub.engine.cluster as cluster
    import raysub.pipeline.train as train

    cfg, _, run = _committed_run(tmp_path, ["train.projection=dense", "train.dim=4", "train.label=dense4",
                                            "train.lr=1000000"])
    monkeypatch.setattr(cluster, "ensure_ray", lambda *a, **k: None)

    def fake(cfg, run, printer, sharding=""):
        run.child("checkpoints").write_text(f"train-{cfg.train_label}/checkpoint_0/state.pt", "x")
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(train, "run_subspace", fake)
    return cfg, run


def test_diverged_training_is_recorded_as_diverged_never_as_an_accuracy(tmp_path, monkeypatch, capsys):
    """`raysub train RUN train.lr=1000000` used to exit 0 with an all-NaN z and 'test accuracy 8.6%'."""
    history = [{"epoch": 1, "test_acc": 0.9, "elapsed_s": 1.0, "allreduce_floats_per_step": 0}]
    diverged = {"stage": "dense4", "epoch": 2, "step": 57, "loss": None, "reason": "the loss became nan"}
    cfg, run = _train_ready(tmp_path, monkeypatch, {"history": history, "step_losses": [2.3, 1.0],
                                                      "wall_s": 2.0, "diverged": diverged})
    with pytest.raises(DivergedError) as exc:
        pipeline.stage_train(run.uri, cfg=cfg, say=lambda s: None)
    assert str(exc.value) == ("training 'dense4' diverged at epoch 2 (step 57): the loss became nan; lower "
                              "train.lr (now 1e+06) and rerun with --overwrite")
    r = strict_loads((tmp_path / "run" / "summary.json").read_text())["results"]["dense4"]
    assert r["test_acc"] is None and r["diverged"] == diverged and r["epochs"] == 2
    manifest = run.read_json("manifest.json")
    assert "train/dense4.pt" not in manifest["shards"] and manifest["stages"]["train.dense4"]["diverged"]
    table = runmod.results_table(run.read_json("summary.json"))
    assert "diverged (epoch 2)" in table.splitlines()[-2] and "%" not in table.splitlines()[-2]
    with pytest.raises(DivergedError):  # --resume does not turn it into a result either
        pipeline.stage_train(run.uri, cfg=cfg, resume=True, say=lambda s: None)


def test_failed_training_leaves_no_checkpoints_or_stage_behind(tmp_path, monkeypatch):
    """A bad input found by the workers removes checkpoints/train-LABEL and the stage's entry (they were left)."""
    cfg, run = _train_ready(tmp_path, monkeypatch, ConfigError("bad thing: fix it"))
    with pytest.raises(ConfigError, match="bad thing"):
        pipeline.stage_train(run.uri, cfg=cfg, say=lambda s: None)
    assert not run.child("checkpoints").exists("train-dense4")
    assert "train.dense4" not in run.read_json("manifest.json")["stages"]


# ---------------------------------------------------------------------------------------------------------
# review follow-ups: a rebuilt basis, moved runs, worker counts, old manifests, odd lock files

def test_a_new_basis_drops_the_trainings_done_in_the_old_one():
    """A training in the run's own basis (dldr, no basis_run) is another model once the basis is rebuilt: its
    result must not be reported as complete (it was, against a basis of another dim). Trainings in a random
    family or in another run's basis stay."""
    manifest = Manifest.from_json(
        {"stages": {"sample": {"complete": True},
                    "train.psgd": {"complete": True, "train": {"projection": "dldr", "basis_run": None}},
                    "train.dense": {"complete": True, "train": {"projection": "dense", "basis_run": None}},
                    "train.other": {"complete": True, "train": {"projection": "dldr", "basis_run": "/a"}}},
         "summary": {"results": {"psgd": {}, "dense": {}, "other": {}, "sgd": {}}},
         "shards": {"train/psgd.pt": "x", "train/dense.pt": "y"}})
    assert runmod._drop_own_basis_trainings(manifest) == ["psgd"]
    assert sorted(manifest.stages) == ["sample", "train.dense", "train.other"]
    assert sorted(manifest.summary["results"]) == ["dense", "other", "sgd"]
    assert manifest.shards == {"train/dense.pt": "y"}


def test_resume_allows_a_moved_run_and_refuses_resharding_an_unfinished_sampling(tmp_path):
    """run_dir is where a run is, not what it computes (a copied run resumes); an unfinished sampling is sharded
    one block per worker, so its cluster.num_workers may not change until sampling completes."""
    import shutil

    cfg, _, run = _committed_run(tmp_path, ["cluster.num_workers=2"])
    shutil.copytree(tmp_path / "run", tmp_path / "moved")
    moved = RunDir(str(tmp_path / "moved"))
    assert records.prepare_run_dir(moved, True, False, load_config(None, [f"run_dir={moved.uri}",
                                                                          "cluster.num_workers=2"])) is True
    wider = load_config(None, [f"run_dir={run.uri}", "cluster.num_workers=3"])
    with pytest.raises(ConfigError, match="sharded over 2 workers: resume it with cluster.num_workers=2"):
        records.prepare_run_dir(run, True, False, wider)
    manifest = run.read_json("manifest.json")
    manifest["stages"]["sample"] = {"complete": True}
    run.write_json("manifest.json", manifest)
    assert records.prepare_run_dir(run, True, False, wider) is True


def test_interrupted_training_needs_a_flag(tmp_path, monkeypatch):
    """`raysub train RUN` with neither flag must not silently restart an interrupted training (it discarded its
    checkpoints)."""
    cfg, run = _train_ready(tmp_path, monkeypatch, ConfigError("unused"))
    manifest = run.read_json("manifest.json")
    manifest["stages"]["train.dense4"] = {"complete": False, "train": cfg.to_dict()["train"]}
    run.write_json("manifest.json", manifest)
    with pytest.raises(ConfigError, match="'dense4' was interrupted .*--resume to continue it or --overwrite"):
        pipeline.stage_train(run.uri, cfg=cfg, say=lambda s: None)


def test_a_manifest_from_before_commits_is_migrated(tmp_path):
    """A run written before the manifest held its config and summary still opens (was KeyError: 'summary')."""
    cfg, _, run = _committed_run(tmp_path, ["basis.dim=4"])
    manifest = run.read_json("manifest.json")
    summary = manifest.pop("summary")
    manifest.pop("config")
    run.write_json("manifest.json", manifest)
    opened = records.open_manifest(run)
    assert opened.summary == summary and opened.config["basis"]["dim"] == 4


def test_unreadable_or_foreign_lock_files(tmp_path, monkeypatch):
    """An unreadable lock is someone's write in progress until it is stale_s old, then taken over; a record from
    another boot (or pid namespace) of a same-named host is judged by its heartbeat, not by a local pid."""
    import platform

    run = RunDir(str(tmp_path))
    (tmp_path / LOCK).write_text("{not json")
    with pytest.raises(RunLocked, match="an unreadable lock file"):
        RunLock(run, "raysub run", stale_s=60).acquire()
    old = time.time() - 120
    os.utime(tmp_path / LOCK, (old, old))
    said = []
    lock = RunLock(run, "raysub run", stale_s=60)
    lock.acquire(said.append)
    lock.release()
    assert "no heartbeat for 120s" in said[0]
    run.write_bytes(LOCK, json.dumps({"pid": os.getpid(), "host": platform.node(), "boot_id": "another-boot",
                                      "token": "x", "command": "raysub run", "heartbeat": time.time()}).encode())
    with pytest.raises(RunLocked):  # our own pid runs, but on another boot it proves nothing: heartbeat is fresh
        RunLock(run, "raysub run").acquire()


def test_lock_owner_without_a_user_name(tmp_path, monkeypatch):
    """A uid with no passwd entry (containers) made every command fail in getpass.getuser()."""
    import getpass

    def no_user():
        raise KeyError("getpwuid(): uid not found: 1000730000")

    monkeypatch.setattr(getpass, "getuser", no_user)
    lock = RunLock(RunDir(str(tmp_path)), "raysub run")
    assert lock.record["user"] == str(os.getuid())


def test_a_command_whose_lock_was_taken_over_does_not_commit(tmp_path):
    """After a takeover (a stalled heartbeat), the first command must not commit over the new owner's state."""
    from raysub.lock import check_held

    cfg, _, run = _committed_run(tmp_path)
    with run_lock(run, "raysub run") as lock:
        lock.lost = {"command": "raysub run --resume", "pid": 7, "host": "elsewhere"}
        with pytest.raises(RunLocked, match="taken over by 'raysub run --resume' .*stops without committing"):
            records.commit(run, Manifest.read(run))
        with pytest.raises(RunLocked):
            check_held(run)


def test_resume_command_quotes_what_the_shell_would_split():
    assert cli.resume_command(["run", "train.optimizer_options={c: 0.4}", "--overwrite"]) == \
        "raysub run 'train.optimizer_options={c: 0.4}' --resume"
    assert cli.resume_command(["basis", "runs/x", "basis.dim=5"]) == "raysub basis runs/x basis.dim=5 --overwrite"
