"""Lock fencing: a command whose lock was taken over (its process tree paused past RAYSUB_LOCK_STALE_S) never
writes into the run directory again; the driver commits the digests its writers reported, never a re-read's; a
refused command leaves no directory it created.

Unit tier (no Ray): the heartbeat, `fence`, `records.commit`, the sampler's and the subspace loop's writes (their
Ray Train calls replaced), the CLI. One subprocess test: the heartbeat's interrupt of a real command, through the
CLI's one line.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch

from raysub import cli
from raysub import lock as lockmod
from raysub.config import load_config
from raysub.errors import StorageError
from raysub.lock import LOCK, RunLock, RunLocked, run_lock
from raysub.runs import records
from raysub.runs.manifest import Manifest
from raysub.storage import RunDir
from helpers import tree as tree_hash


def wait_for(cond, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def other_host_lock(run: RunDir, command: str, stale_s: float) -> RunLock:
    """A lock whose record says another host holds it: only its heartbeat's age tells whether it is alive (a paused
    VM's command, as another host sees it)."""
    lock = RunLock(run, command, stale_s=stale_s)
    lock.record["host"] = "paused-vm"
    return lock


# ---------------------------------------------------------------------------------------------------------
# the heartbeat: read, compare, then write; a missing or foreign record is lost, never re-created

@pytest.mark.parametrize("how", ["deleted", "foreign"])
def test_heartbeat_marks_a_missing_or_foreign_record_lost_and_never_recreates_it(tmp_path, how):
    """Catches a heartbeat that re-creates a deleted lock file (the paused owner that 'never counted itself as
    having lost it') or overwrites another owner's record (a blind write with no compare step)."""
    run = RunDir(str(tmp_path))
    lock = RunLock(run, "raysub l2o meta-train", stale_s=0.2)
    lock.acquire()
    try:
        path = tmp_path / LOCK
        other = {"token": "the-new-owner", "command": "raysub l2o meta-train --overwrite", "pid": 7,
                 "host": "elsewhere", "heartbeat": time.time()}
        if how == "deleted":
            path.unlink()
        else:
            path.write_text(json.dumps(other))
        assert wait_for(lambda: lock.lost is not None, 5)
        time.sleep(0.3)  # more beats: none may write
        if how == "deleted":
            assert not path.exists()
        else:
            assert json.loads(path.read_text()) == other
        with pytest.raises(RunLocked, match="taken over by .*stops without committing"):
            lock.check()
    finally:
        lock.release()
    if how == "foreign":  # release removes only its own record
        assert json.loads((tmp_path / LOCK).read_text())["token"] == "the-new-owner"


def test_commit_reads_the_record_on_storage_not_only_memory(tmp_path, monkeypatch):
    """Catches a commit fence that trusts the in-memory `lost` flag: the record was replaced before any heartbeat
    could notice (RAYSUB_LOCK_STALE_S=60: the next beat is 15 s away)."""
    monkeypatch.setenv("RAYSUB_LOCK_STALE_S", "60")
    run = RunDir(str(tmp_path / "run"))
    with run_lock(run, "raysub run") as lock:
        run.write_json("manifest.json", {"shards": {}, "stages": {}})
        records.commit(run, Manifest.from_json({"shards": {}, "stages": {"ours": 1}}))  # ours: committed
        before = tree_hash(tmp_path / "run")
        (tmp_path / "run" / LOCK).write_text(json.dumps({"token": "x", "command": "raysub run --overwrite",
                                                         "pid": 9, "host": "other"}))
        before[LOCK] = tree_hash(tmp_path / "run")[LOCK]
        with pytest.raises(RunLocked, match="taken over by 'raysub run --overwrite' .*stops without committing"):
            records.commit(run, Manifest.from_json({"shards": {}, "stages": {"ours": 2}}))
        assert lock.lost is not None
        assert tree_hash(tmp_path / "run") == before


@pytest.mark.parametrize("other_finished", [True, False])
def test_a_paused_owner_can_never_commit_after_a_takeover(tmp_path, monkeypatch, other_finished):
    """The issue's sequence without the VM: A's heartbeat stops for longer than stale_s (a pause), B takes the lock
    over from another host, writes, and (maybe) finishes and releases it; A resumes. A must not commit, not
    re-create the lock, and leave B's files as they are — whether A's main thread or its heartbeat runs first."""
    run = RunDir(str(tmp_path / "run"))
    a = other_host_lock(run, "raysub l2o meta-train cfg.yaml", stale_s=0.4)
    a.acquire()
    monkeypatch.setitem(lockmod._held, run.uri, a)
    a._stop.set()  # the pause: no heartbeat
    a._thread.join()
    time.sleep(0.5)
    said = []
    b = RunLock(run, "raysub l2o meta-train cfg.yaml --overwrite", stale_s=0.4)
    b.acquire(said.append)
    assert "taking over the lock" in said[0] and "no heartbeat" in said[0]
    run.write_json("manifest.json", {"shards": {"l2o/weights.pt": "b's"}, "stages": {}})
    run.write_text("l2o/weights.pt", "b's weights")
    if other_finished:
        b.release()
    before = tree_hash(tmp_path / "run")
    # A resumes: its main thread reaches a commit (its heartbeat has not run yet)
    with pytest.raises(RunLocked, match="stops without committing"):
        records.commit(run, Manifest.from_json({"shards": {"l2o/weights.pt": "a's"}, "stages": {}}))
    with pytest.raises(RunLocked):
        lockmod.fence(run)
    # and its heartbeat resumes: it finds the lock lost and writes nothing
    a._stop.clear()
    a._renew()
    assert a.lost is not None
    a.release()
    assert tree_hash(tmp_path / "run") == before
    if not other_finished:
        b.release()


def test_a_worker_fence_needs_the_token_on_storage(tmp_path):
    """Catches a fence that only looks at the driver's memory (a remote worker shares none of it) or accepts a
    missing record."""
    run = RunDir(str(tmp_path))
    lockmod.fence(run)  # no lock held, no token: nothing to check (library use)
    lock = RunLock(run, "raysub sample", stale_s=60)
    lock.acquire()
    lockmod.fence(run, lock.token)
    with pytest.raises(RunLocked, match="taken over by"):
        lockmod.fence(run, "someone-else")
    (tmp_path / LOCK).unlink()
    with pytest.raises(RunLocked, match="finished and released the lock"):
        lockmod.fence(run, lock.token)
    lock.release()


# ---------------------------------------------------------------------------------------------------------
# the workers' writes (their Ray Train calls replaced: one process, no Ray)

def _sample_cfg(tmp_path):
    return load_config(None, [f"run_dir={tmp_path}/r", "model.options={hidden: [16]}", "sgd.epochs=1",
                              "sample.epochs=1", "sample.snapshots_per_epoch=2", "basis.dim=1",
                              "sample.stream_gram=false", "cluster.num_workers=1", "sgd.lr_milestones=[]"])


def _in_process(monkeypatch, cfg, run, reports):
    from raysub.engine import loop

    monkeypatch.setattr(loop, "worker_context", lambda config: loop.WorkerContext(
        cfg, None, 0, 1, torch.device("cpu"), run, config.get("session", "train")))
    monkeypatch.setattr(loop, "load_checkpoint", lambda session="train": None)
    monkeypatch.setattr(loop, "report", lambda metrics, ckpt, session="train": reports.append(metrics))


def test_sampler_workers_write_nothing_without_the_lock_token_on_storage(tmp_path, monkeypatch):
    """Catches a Train worker that keeps writing snapshots into a directory whose lock another command holds (the
    issue: the paused command's workers wrote into the directory the second had cleared)."""
    from raysub.pipeline import sample as S
    from raysub.pipeline.plan import plan
    from raysub.runs.records import init_run

    cfg = _sample_cfg(tmp_path)
    init_run(cfg, plan(cfg), False, False)
    run = RunDir(cfg.run_dir)
    reports = []
    _in_process(monkeypatch, cfg, run, reports)
    holder = RunLock(run, "raysub sample --overwrite", stale_s=60)  # the new owner
    holder.acquire()
    try:
        before = tree_hash(tmp_path / "r")
        with pytest.raises(RunLocked, match="taken over by 'raysub sample --overwrite'"):
            S.sample_loop({"cfg": cfg.to_dict(), "progress": None, "stream_gram": False,
                           "lock_token": "the-paused-command"})
        assert tree_hash(tmp_path / "r") == before and reports == []
        # with the owner's token the same loop writes, and reports every digest its writers computed
        S.sample_loop({"cfg": cfg.to_dict(), "progress": None, "stream_gram": False, "lock_token": holder.token})
    finally:
        holder.release()
    written = reports[-1]["written"]
    files = tree_hash(tmp_path / "r")
    assert written["model.pt"] == files["model.pt"]
    assert written["trajectory/block_000/index.json"] == files["trajectory/block_000/index.json"]


def _fake_trainer(monkeypatch, after=None):
    """Ray Train replaced: `fit_with_progress` runs the loop in this process; ``after(run)`` runs once the workers
    are done (another writer)."""
    import raysub.engine.cluster as cluster
    import raysub.tracking as tracking

    def fit(trainer, progress, printer):
        fn, config = trainer
        reports = []
        from raysub.engine import loop

        monkeypatch.setattr(loop, "report", lambda metrics, ckpt, session="train": reports.append(metrics))
        fn(config)
        if after is not None:
            after()
        return types.SimpleNamespace(metrics=reports[-1])

    monkeypatch.setattr(cluster, "make_progress_queue", lambda: None)
    monkeypatch.setattr(cluster, "torch_trainer", lambda fn, config, *a, **k: (fn, config))
    monkeypatch.setattr(cluster, "fit_with_progress", fit)
    monkeypatch.setattr(tracking, "train_callbacks", lambda *a, **k: [])


def test_the_sample_driver_commits_its_writers_digests_never_a_reread(tmp_path, monkeypatch):
    """Catches `sha256(run.read_bytes("model.pt"))` at commit time: another writer's model.pt (written after the
    worker's) would be committed as this run's; a foreign index is refused, not hashed."""
    from raysub.pipeline import sample as S
    from raysub.pipeline.plan import plan
    from raysub.runs.records import init_run

    cfg = _sample_cfg(tmp_path)
    init_run(cfg, plan(cfg), False, False)
    run = RunDir(cfg.run_dir)
    _in_process(monkeypatch, cfg, run, [])
    mine = {}

    def another_writer():
        mine.update(tree_hash(tmp_path / "r"))
        run.write_bytes("model.pt", b"the other command's model")

    _fake_trainer(monkeypatch, another_writer)
    out = S.run_sample(cfg, run, lambda line: None)
    assert out["shards"]["model.pt"] == mine["model.pt"] != tree_hash(tmp_path / "r")["model.pt"]

    def another_index():
        index = run.read_json("trajectory/block_000/index.json")
        index["snapshots"] = index["snapshots"][:1]
        run.write_json("trajectory/block_000/index.json", index)

    _fake_trainer(monkeypatch, another_index)
    with pytest.raises(StorageError, match="block_000/index.json is corrupted"):
        S.run_sample(cfg, run, lambda line: None)


def test_the_streamed_gram_and_basis_are_committed_with_their_writers_digests(tmp_path, monkeypatch):
    """Catches the driver re-reading trajectory/gram.pt and the sampler-written spectrum.json at commit time."""
    from raysub.pipeline import sample as S
    from raysub.pipeline.plan import plan
    from raysub.runs.records import init_run
    from raysub.pipeline.stream_gram import GRAM_REL

    cfg = load_config(None, [f"run_dir={tmp_path}/r", "model.options={hidden: [16]}", "sgd.epochs=1",
                             "sample.epochs=1", "sample.snapshots_per_epoch=4", "basis.dim=2",
                             "sample.stream_gram=true", "sample.write_basis=true", "cluster.num_workers=1",
                             "sgd.lr_milestones=[]"])
    info = plan(cfg)
    init_run(cfg, info, False, False)
    run = RunDir(cfg.run_dir)
    _in_process(monkeypatch, cfg, run, [])
    mine = {}

    def another_writer():
        mine.update(tree_hash(tmp_path / "r"))
        run.write_bytes(GRAM_REL, b"another command's Gram")

    _fake_trainer(monkeypatch, another_writer)
    sample = dict(num_params=info["num_params"], num_snaps=5, basis_prefix="basis-g")
    out = S.run_sample(cfg, run, lambda line: None, **sample)
    assert out["stream_gram"]["sha256"] == out["shards"][GRAM_REL] == mine[GRAM_REL]
    prefix, record = out["basis"]
    assert prefix == "basis-g" and record["sha256"] == mine["basis-g/spectrum.json"]
    _fake_trainer(monkeypatch, lambda: run.write_json("basis-g/spectrum.json", {"another": "command's"}))
    with pytest.raises(StorageError, match="spectrum.json is corrupted"):  # verified, never hashed as found
        S.run_sample(cfg, run, lambda line: None, **sample)


def test_the_subspace_training_reports_its_digest_and_is_fenced(tmp_path, monkeypatch):
    """Catches train/LABEL.pt hashed by the driver re-reading it, and rank 0 writing it under a foreign lock."""
    from raysub.pipeline import train as T
    from raysub.pipeline.plan import plan
    from raysub.runs.records import init_run

    cfg = load_config(None, [f"run_dir={tmp_path}/r", "model.options={hidden: [16]}", "train.projection=dense",
                             "train.dim=4", "train.epochs=1", "cluster.num_workers=1"])
    init_run(cfg, plan(cfg), False, False)
    run = RunDir(cfg.run_dir)
    _in_process(monkeypatch, cfg, run, [])
    _fake_trainer(monkeypatch, lambda: run.write_bytes(f"train/{cfg.train_label}.pt", b"another command's"))
    rel = f"train/{cfg.train_label}.pt"
    with run_lock(run, "raysub train") as lock:
        lock.interrupt = False
        out = T.run_subspace(cfg, run, lambda r: None)
        assert out["written"][rel] not in (None, tree_hash(tmp_path / "r")[rel])
        run.delete(rel)
        before = tree_hash(tmp_path / "r")
        with pytest.raises(RunLocked):
            T.subspace_loop({"cfg": cfg.to_dict(), "progress": None, "lock_token": "not-the-owner"})
        assert tree_hash(tmp_path / "r") == before


# ---------------------------------------------------------------------------------------------------------
# the CLI

@pytest.mark.parametrize("args", [["run", "--resume", "--overwrite"],
                                  ["run", "run_dir=a/b/c", "--resume", "--overwrite"]])
def test_a_refused_run_leaves_no_directory_behind(tmp_path, monkeypatch, capsys, args):
    """Catches the lock's acquire leaving the parents it created (`runs/`) when a later check refuses the
    command."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err == "raysub: error: --resume and --overwrite exclude each other: pick one\n"
    assert os.listdir(tmp_path) == []


def test_a_refused_run_keeps_the_parents_that_were_there(tmp_path, monkeypatch, capsys):
    """Catches a cleanup that removes more than the lock created."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "keep").mkdir()
    assert cli.main(["run", "run_dir=keep/x/y", "--resume", "--overwrite"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["keep", "runs"] and os.listdir(tmp_path / "keep") == []


@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["sigint-default", "sigint-ignored"])
@pytest.mark.system  # a real command in a subprocess
def test_the_heartbeat_stops_a_command_whose_lock_was_taken_over_with_one_line(tmp_path, sigint):
    """A real process: its lock record disappears (the new owner finished and released it) while it runs. Catches a
    command that runs on to exit 0 (the heartbeat re-created the lock), one that writes an error log into the
    directory, and a traceback or an 'interrupted; --resume' line instead of the lock's. With SIGINT ignored (a
    script's `raysub run ... &` inherits that) the heartbeat's interrupt did nothing and the command slept on."""
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import faulthandler, signal, sys, time
        faulthandler.register(signal.SIGUSR2, all_threads=True)  # the test's view of a hung command
        from raysub import cli
        from raysub.lock import run_lock
        from raysub.storage import RunDir

        def dispatch(ns):
            with run_lock(RunDir({str(run_dir)!r}), "raysub run --resume"):
                print("locked", flush=True)
                time.sleep(30)
                RunDir({str(run_dir)!r}).write_text("late.txt", "written after the takeover")
            return 0

        cli._dispatch = dispatch
        sys.exit(cli.main(["run", "--resume"]))
    """)
    import raysub

    # the raysub under test (this checkout's, or the one PYTHONPATH names)
    env = {**os.environ, "RAYSUB_LOCK_STALE_S": "0.4", "PYTHONPATH": os.path.dirname(os.path.dirname(raysub.__file__))}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))  # inherited through exec
    try:
        assert proc.stdout.readline().strip() == "locked"
        (run_dir / "theirs.txt").write_text("the new owner's")
        # A heartbeat that read the record just before the unlink writes it back (the read-then-write window the
        # module docstring of raysub/lock.py names; a loaded machine widens it): remove it again. One that re-creates
        # a lock it found missing keeps doing so, and fails below.
        (run_dir / LOCK).unlink()
        before = tree_hash(run_dir)
        for _ in range(20):
            time.sleep(0.3)  # three heartbeats (stale_s / 4 = 0.1 s)
            if not (run_dir / LOCK).exists() or proc.poll() is not None:
                break
            (run_dir / LOCK).unlink(missing_ok=True)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # still running: fail with its threads' stacks and signal state
            status = open(f"/proc/{proc.pid}/status").read()
            proc.send_signal(signal.SIGUSR2)
            time.sleep(1)
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the command still runs 20 s after its lock was taken over:\n{err}\n"
                        + "".join(line for line in status.splitlines(True) if line.startswith("Sig")))
    finally:
        proc.kill()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith(f"raysub: error: the lock of {run_dir} was taken over by "
                                                   f"another command (it has finished and released the lock)")
    assert "stops without committing" in err and "Traceback" not in err
    assert tree_hash(run_dir) == before  # no lock re-created, no late write, no logs/error-*.log
