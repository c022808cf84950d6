"""Fault injection for the tests: the hooks the training loops call, inert unless their variables are set.

The loops call `started` when a worker starts, `after_epoch` after each epoch's report (its checkpoint taken) and
`node_view` for a path the driver wrote; each does nothing unless its variable is set:

- ``RAYSUB_FAIL_AFTER_EPOCH=k``: every worker raises once, after epoch k's checkpoint (a marker file in the run
  directory makes it fire once, so Ray Train's restart or ``--resume`` goes on);
- ``RAYSUB_FAIL_AT_STEP=k``: every sampling worker raises once, after global SGD step k (mid-epoch: the run
  resumes from the epoch's start);
- ``RAYSUB_PID_DIR=DIR``: every worker writes ``DIR/rankR.json`` (its pid, host, node, the epochs it has done and
  the time) when it starts and after each epoch, and appends it to ``DIR/rankR.log``, so a test can ``kill -9`` a
  live Train worker;
- ``RAYSUB_PAUSE_AFTER_EPOCH=k`` (with ``RAYSUB_PID_DIR``): every worker then waits 60 s after epoch k, once per
  DIR, so the kill lands mid-run at a known epoch rather than racing the last step;
- ``RAYSUB_TEST_NODE_FS_ROOT=ROOT`` (set on a simulated node of ``ray.cluster_utils.Cluster``): the node sees the
  filesystem under ROOT, as a node whose disk is not the driver's would.

Ray's worker processes do not inherit the driver's environment, so all but the last travel in the loop's config:
`snapshot` on the driver, `install` in the worker (`raysub.engine.loop.worker_context` does it). The fourth is
the node's own environment, read where it is used.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional
import json
import socket

FAIL_AFTER_EPOCH = "RAYSUB_FAIL_AFTER_EPOCH"
PID_DIR = "RAYSUB_PID_DIR"
PAUSE_AFTER_EPOCH = "RAYSUB_PAUSE_AFTER_EPOCH"
FAIL_AT_STEP = "RAYSUB_FAIL_AT_STEP"
NODE_FS_ROOT = "RAYSUB_TEST_NODE_FS_ROOT"
CARRIED = (FAIL_AFTER_EPOCH, PID_DIR, PAUSE_AFTER_EPOCH, FAIL_AT_STEP)  # what a worker gets from the driver's environment

MARKER = "failure_injected"  # in the run directory: the injected failure has fired

_installed: Dict[str, str] = {}  # this worker's hooks (`install`)


def snapshot() -> Dict[str, str]:
    """Driver side: the hooks set in this process's environment, for a loop's config (empty when none is)."""
    return {k: os.environ[k] for k in CARRIED if os.environ.get(k)}


def install(hooks: Optional[Dict[str, str]]) -> None:
    """Worker side: make ``hooks`` (a driver's `snapshot`, or None) this process's hooks, replacing any before."""
    _installed.clear()
    _installed.update(hooks or {})


def started(epoch: int) -> None:
    """A worker starts (fresh, or restored at ``epoch``): publish its pid (``RAYSUB_PID_DIR``)."""
    _publish_pid(epoch, pause=False)


def after_epoch(run, epoch: int) -> None:
    """Epoch ``epoch`` (1-based) is reported: the injected failure (``RAYSUB_FAIL_AFTER_EPOCH``), then the pid and
    the pause (``RAYSUB_PID_DIR``, ``RAYSUB_PAUSE_AFTER_EPOCH``). ``run``: the run's `raysub.storage.RunDir`."""
    _inject_failure(run, epoch)
    _publish_pid(epoch, pause=True)


def at_step(run, step: int) -> None:
    """Global SGD step ``step`` is done: the injected mid-epoch failure (``RAYSUB_FAIL_AT_STEP``)."""
    k = _installed.get(FAIL_AT_STEP)
    if k is not None and int(k) == step:
        _fail_once(run, f"{FAIL_AT_STEP}={k}: injected failure after step {step}", f"step {step}\n")


def node_view(path: str) -> str:
    """``path`` as this node sees it (``RAYSUB_TEST_NODE_FS_ROOT`` prefixed, when set)."""
    root = os.environ.get(NODE_FS_ROOT)
    return root + path if root else path


def _rank_world():
    # torch.distributed only once a hook is on: the driver that snapshots the hooks need not import torch
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    return (dist.get_rank() if ready else 0), ready, dist


def _inject_failure(run, epoch: int) -> None:
    k = _installed.get(FAIL_AFTER_EPOCH)
    if k is not None and int(k) == epoch:
        _fail_once(run, f"{FAIL_AFTER_EPOCH}={k}: injected failure after epoch {epoch}", f"epoch {epoch}\n")


def _fail_once(run, message: str, marker_text: str) -> None:
    if run.exists(MARKER):
        return
    rank, ready, dist = _rank_world()
    if ready:
        dist.barrier()
    if rank == 0:
        run.write_text(MARKER, marker_text)
    if ready:
        dist.barrier()
    raise RuntimeError(message)


def _publish_pid(epoch: int, pause: bool) -> None:
    pid_dir = _installed.get(PID_DIR)
    if not pid_dir:
        return

    import ray  # only with the hook on, in a Ray worker (it is imported there already)

    rank, _, _ = _rank_world()
    record = {"pid": os.getpid(), "host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(),
              "epoch": epoch, "time": time.time()}
    tmp = os.path.join(pid_dir, f".rank{rank}.json.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(pid_dir, f"rank{rank}.json"))
    with open(os.path.join(pid_dir, f"rank{rank}.log"), "a") as f:  # the history: who ran when (recovery times)
        f.write(json.dumps(record) + "\n")
    marker = os.path.join(pid_dir, f"paused-rank{rank}")
    k = _installed.get(PAUSE_AFTER_EPOCH)
    if pause and k is not None and int(k) == epoch and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(60)
