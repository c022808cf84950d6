"""Real process kills (``kill -9`` of a Ray Train worker during sampling, of a basis actor; a sweep's driver is
killed in tests/test_sweep_interrupt.py), and several nodes (``ray.cluster_utils.Cluster``, in a subprocess:
tests/multinode_cluster.py).

The sampler's workers publish their pids (the ``RAYSUB_PID_DIR`` testing hook, `raysub.faults`)
and wait after epoch 1 (``RAYSUB_PAUSE_AFTER_EPOCH``), so the kill lands mid-run at a known point. What each test
would catch:

* with ``cluster.max_failures=1``: a restart that replays snapshots already written (a snapshot twice in a block's
  index), skips the ones between the checkpoint and the kill, or resumes from another state than the checkpoint's
  (the trajectory and the basis then differ from an uninterrupted run's — compared bit for bit);
* with ``max_failures=0``: a killed worker that surfaces as a traceback, or whose message does not say how to go on
  (``--resume``), and a resume that does not reproduce the uninterrupted trajectory;
"""
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from raysub import pipeline
from raysub.pipeline.basis import load_basis
from raysub.pipeline.sample import collect_trajectory
from raysub.storage import RunDir

from helpers import trajectory  # tests/helpers.py
from conftest import SAMPLED  # tests/conftest.py: the session's sampled run

pytestmark = pytest.mark.system  # real kill -9s of workers, actors and drivers; a multi-node cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = SAMPLED + ["cluster.num_workers=2"]  # the session's sampled 2-worker run (tests/conftest.py)


def quiet(_line):
    pass


@pytest.fixture
def reference(sampled_basis):
    """The uninterrupted run (the session's, tests/conftest.py): its trajectory and basis."""
    return {"trajectory": trajectory(sampled_basis), "basis": load_basis(RunDir(sampled_basis)),
            "run_dir": sampled_basis}


def _kill_when_paused(pid_dir: str, ckpt_dir: str, rank: int, box: dict, timeout: float = 300) -> None:
    """Background thread: once rank ``rank`` has published epoch 1 (and pauses there), kill -9 its process."""
    deadline = time.time() + timeout
    path = os.path.join(pid_dir, f"rank{rank}.json")
    while time.time() < deadline:
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = None
        marker = os.path.join(pid_dir, f"paused-rank{rank}")
        # epoch 1's checkpoint is in storage, and 3 s into the pause Ray Train's controller (polling every 0.2 s)
        # has registered it
        if (record and record["epoch"] == 1 and os.path.exists(marker) and time.time() > os.path.getmtime(marker) + 3
                and glob.glob(os.path.join(ckpt_dir, "checkpoint_*", "state.pt"))):
            box["pid"], box["t_kill"] = record["pid"], time.time()
            os.kill(record["pid"], signal.SIGKILL)
            return
        time.sleep(0.02)
    box["error"] = f"rank {rank} never published epoch 1"


def _records(pid_dir: str, rank: int):
    with open(os.path.join(pid_dir, f"rank{rank}.log")) as f:
        return [json.loads(line) for line in f]


def _sample_with_a_kill(tmp_path, monkeypatch, capsys, max_failures: int):
    from raysub.cli import main

    pid_dir = str(tmp_path / "pids")
    os.makedirs(pid_dir)
    monkeypatch.setenv("RAYSUB_PID_DIR", pid_dir)
    monkeypatch.setenv("RAYSUB_PAUSE_AFTER_EPOCH", "1")
    run_dir = str(tmp_path / "r")
    args = ["sample", *BASE, f"cluster.max_failures={max_failures}", f"run_dir={run_dir}"]
    box: dict = {}
    killer = threading.Thread(target=_kill_when_paused, args=(pid_dir, f"{run_dir}/checkpoints/sample", 1, box),
                              daemon=True)
    killer.start()
    rc = main(args)  # in the main thread: the CLI installs its signal handlers
    killer.join(timeout=5)
    assert "error" not in box and "pid" in box, box
    return rc, run_dir, pid_dir, box, args


def test_kill9_of_a_train_worker_is_restarted_and_loses_no_snapshot(reference, tmp_path, monkeypatch, capsys):
    rc, run_dir, pid_dir, box, _ = _sample_with_a_kill(tmp_path, monkeypatch, capsys, max_failures=1)
    assert rc == 0, capsys.readouterr().err
    after = [r for r in _records(pid_dir, 1) if r["pid"] != box["pid"]]
    assert after and after[0]["epoch"] == 1  # the restarted rank 1 went on from epoch 1's checkpoint
    up = after[0]["time"] - box["t_kill"]
    next_epoch = next(r["time"] for r in after if r["epoch"] == 2) - box["t_kill"]
    print(f"\nkill -9 of rank 1 → restarted worker up after {up:.1f} s, epoch 2 done {next_epoch:.1f} s after the "
          f"kill; load {os.getloadavg()[0]:.2f}")
    np.testing.assert_array_equal(trajectory(run_dir), reference["trajectory"])  # every snapshot once, the same
    pipeline.stage_basis(run_dir, say=quiet)
    np.testing.assert_array_equal(load_basis(RunDir(run_dir)), reference["basis"])


def test_kill9_without_restarts_names_resume_and_resume_finishes(reference, tmp_path, monkeypatch, capsys):
    from raysub.cli import main

    rc, run_dir, pid_dir, box, args = _sample_with_a_kill(tmp_path, monkeypatch, capsys, max_failures=0)
    assert rc == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(f"run_dir={run_dir} --resume"), lines[0]
    assert "Traceback" not in lines[0]
    monkeypatch.delenv("RAYSUB_PAUSE_AFTER_EPOCH")
    assert main(args + ["--resume"]) == 0
    np.testing.assert_array_equal(trajectory(run_dir), reference["trajectory"])


def test_a_killed_basis_actor_is_restarted_and_rereads_its_block(reference):
    """kill -9 of a block actor between the Gram pass and the write pass: the actor class the basis stage uses
    restarts it, the retried write rereads the block from storage, and U_b is byte-identical to an unkilled
    actor's. Catches block actors without restarts (the stage then dies with ActorDiedError) and a restarted
    actor that writes from its empty (never reloaded) block."""
    import ray

    from raysub.pipeline.basis import block_actor_class, solve_spectrum

    run = RunDir(reference["run_dir"])
    blocks, shards = collect_trajectory(run)
    b = blocks[1]
    entries = [(s["path"], s["sha256"]) for s in b["snapshots"]]
    Actor = block_actor_class(0.5)
    options = Actor._default_options
    assert options["scheduling_strategy"] == "SPREAD" and options["max_restarts"] >= 1  # over nodes; restartable
    assert options["max_task_retries"] >= 1  # the call that met the dead actor is retried on the restarted one
    killed, kept = (Actor.remote(run.uri, b["block"], entries, b["stop"] - b["start"]) for _ in range(2))
    gram = ray.get(killed.gram.remote())["gram"]
    np.testing.assert_array_equal(gram, ray.get(kept.gram.remote())["gram"])
    spec = solve_spectrum(gram, 3)
    proj_TD = spec["V"] / spec["singular_values"][:3]
    pid = ray.get(killed.where.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    try:
        out = ray.get(killed.write_basis.remote(proj_TD, "float32", "killed"), timeout=120)
        ref = ray.get(kept.write_basis.remote(proj_TD, "float32", "kept"), timeout=120)
        assert ray.get(killed.where.remote())["pid"] != pid  # a new process did the write
    finally:
        for a in (killed, kept):
            ray.kill(a)
    assert out["sha256"] == ref["sha256"]
    assert run.read_bytes(out["path"], out["sha256"]) == run.read_bytes(ref["path"], ref["sha256"])
    for prefix in ("killed", "kept"):
        run.delete(prefix)


# -- several nodes ---------------------------------------------------------------------------------------------
def test_multinode_sampling_and_basis_spread_over_nodes_and_a_blind_node_is_refused(reference, tmp_path):
    """tests/multinode_cluster.py in a subprocess (its own ray.cluster_utils.Cluster: a 0-CPU head, two 1-CPU
    nodes). Catches: workers packed on one node (the DDP run would not cross nodes), a trajectory the two nodes'
    workers wrote inconsistently (compared bit for bit with the single-node run of the same config), block actors
    all on one node, and a run on a local path that a node cannot see started anyway (half its shards on a disk
    the driver never reads) instead of refused in one line with nothing written."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "multinode_cluster.py"), str(tmp_path),
                             json.dumps(BASE)], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of its cluster that outlived it
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["sample_rc"] == 0 and out["basis_rc"] == 0, out
    assert sorted(out["worker_nodes"]) == ["rank0", "rank1"]
    assert len(set(out["worker_nodes"].values())) == 2, out["worker_nodes"]  # one Train worker per node
    assert len(set(out["basis_nodes"])) == 2, out["basis_nodes"]  # SPREAD: one block actor per node
    np.testing.assert_array_equal(trajectory(out["shared"]), reference["trajectory"])
    np.testing.assert_array_equal(load_basis(RunDir(out["shared"])), reference["basis"])
    assert out["refused_rc"] == 2 and out["refused_err"].count("\n") == 1, out["refused_err"]
    assert "is not visible from node 127.0.0.1" in out["refused_err"] and "s3://" in out["refused_err"]
    assert not out["refused_exists"]  # nothing half-written: not even the directory the lock made
