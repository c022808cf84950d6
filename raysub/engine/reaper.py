"""The reaper of a local Ray cluster: a process that outlives its driver and kills what Ray leaves behind.

`raysub.engine.cluster.ensure_ray` starts it when raysub starts the cluster itself (Linux only: it reads /proc).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List
import subprocess
import signal


def start_reaper() -> None:
    """Start a process that, once this driver is gone (an exit, or a ``kill -9``), kills what is left of the local
    Ray cluster it started: the node's own processes and everything under them (the raylet's dashboard and
    runtime-env agents, workers). Ray's kernel fate-sharing kills the node's processes with the driver, but the two
    agents, the raylet's children, only notice the raylet's death and then wait ~60 s on the dead GCS to report it
    before they exit. Linux only (it reads /proc); elsewhere nothing is started."""

    # heavy: ray loads here, not when this module is imported
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not os.path.isdir("/proc/self"):
        return
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos
             if info.process is not None and info.process.poll() is None]
    # noted here, not only by the reaper: a driver killed before the reaper's first look still has them reaped
    known = _descendants({pid: _started(pid) for pid in roots})
    args = [f"{pid}:{start}" for pid, start in {os.getpid(): _started(os.getpid()), **known}.items() if start]
    code = "import sys; from raysub.engine.reaper import _reap; _reap(sys.argv[1:])"
    # a session of its own: a terminal's Ctrl-C, or a kill of the driver's process group, must not end it first
    subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def _proc_stat(pid: int):
    """(parent pid, start time in clock ticks since boot) of a running process; None once it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def _started(pid: int):
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _descendants(known: Dict[int, Any]) -> Dict[int, Any]:
    """``known`` ({pid: start time}) with every running process under its running ones added."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                table[int(entry)] = stat
    known = dict(known)
    frontier = [pid for pid, start in known.items() if pid in table and table[pid][1] == start]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent and pid not in known:
                known[pid] = start
                frontier.append(pid)
    return known


def _reap(args: List[str], interval: float = 1.0) -> None:
    """`start_reaper`'s process. ``args``: "PID:START" of the driver, then of the node's processes. Every
    ``interval`` seconds it notes the processes under the node's; once the driver is gone, it SIGKILLs every noted
    one still running (a pid is matched with its start time, so a reused pid is never hit)."""

    (driver, born), *nodes = [tuple(int(x) for x in a.split(":")) for a in args]
    known = dict(nodes)
    while _started(driver) == born:
        known = _descendants(known)
        time.sleep(interval)
    for pid, start in known.items():
        if _started(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
