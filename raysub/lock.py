"""One command at a time per run directory: a lock file with its owner and a heartbeat.

``RUN/raysub.lock`` holds the owner's user, host, pid, command, a random token and a heartbeat time that a
background thread refreshes every ``stale_s / 4`` seconds while the command runs. A second command on the
directory is refused with one line naming the owner. A lock is *stale* — and taken over, with a message — when
its owner is gone: the same host no longer runs its pid (checked against the process start time, so a reused pid
does not count), or no heartbeat came for ``stale_s`` seconds (``RAYSUB_LOCK_STALE_S``, default 60; the only
test across hosts).

The protocol needs no atomic create-if-absent, so it works on object storage as on a local disk: write the
record, wait ``settle_s``, read it back; whoever's token is there holds the lock (two racers that both wrote see
the same last writer). On a local disk the first write is also an exclusive create, so a race is decided at once.

Locks are re-entrant within a process: a stage called by ``raysub run`` runs under the run's lock.

Fencing: a command whose lock was taken over (its process tree paused past ``stale_s``, e.g. a stopped VM) must
never write into the directory again. The heartbeat reads the record before every refresh and writes only while
the record still holds this command's token: a missing record (the new owner finished and released it) or a
foreign one marks the lock *lost* — it is never re-created — and the main thread is interrupted (SIGINT), so the
command stops and the CLI says so in one line. Every writer checks too, on storage, before it writes: the driver
before each commit (`fence`, called by `raysub.runs.records.commit`), the Train workers before each snapshot,
checkpoint and model file (`fence(run, token)` with the token the driver passed down, `token_of`). A lease whose
own heartbeat is older than ``stale_s / 2`` (this process was paused) is renewed — or found lost — before any
write. Without an atomic compare-and-swap on object storage a pause landing exactly between the heartbeat's read
and its write remains possible; the renewal's age check makes that window microseconds wide.
"""
from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import os
import platform
import signal
import sys
import threading
import time
import uuid
from typing import Any, Dict, Iterator, Optional, Tuple

import pyarrow.fs as pafs

from raysub import credentials
from raysub.errors import ConfigError, RaysubError, StorageError
from raysub.storage import LOCK, RunDir

_held: Dict[str, "RunLock"] = {}  # uri -> the lock this process holds on it
_lost: Dict[str, str] = {}  # uri -> why this process's lock on it was lost (read by the CLI after the command)


class RunLocked(RaysubError):
    """The run directory is in use by another command (exit 2, as a bad input: choose another or wait)."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def _process_started(pid: int) -> Optional[float]:
    """The start time (clock ticks since boot, from /proc) of process ``pid`` on this host; None when no such
    process runs; 0.0 when it runs but its start time cannot be read."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: it exists
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return float(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
    except (OSError, IndexError, ValueError):
        return 0.0


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _machine() -> Dict[str, Optional[str]]:
    """What makes a pid comparable: the same boot of the same machine, and the same pid namespace (two containers
    may share a hostname)."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry (e.g. a container's runAsUser)
        return str(os.getuid())


def describe(record: Dict[str, Any]) -> str:
    """The owner of a lock record, for messages: ``'raysub run seed=1' (pid 123 on host, user alice)``."""
    return (f"'{record.get('command', '?')}' (pid {record.get('pid', '?')} on {record.get('host', '?')}, "
            f"user {record.get('user', '?')}, since {record.get('started', '?')})")


class RunLock:
    """The lock of one run directory, held by this process.

    Args:
        run: The run directory.
        command: What the owner runs (shown to a refused second command).
        stale_s: Seconds without a heartbeat after which another host may take the lock over.
        settle_s: Seconds between writing the record and reading it back (None: 0.05 on a local disk, 1.0 on
            object storage).
        interrupt: Interrupt the main thread (SIGINT) when the lock is found lost (`run_lock` sets it for a lock
            taken on the main thread).
    """

    def __init__(self, run: RunDir, command: str, stale_s: Optional[float] = None, settle_s: Optional[float] = None,
                 interrupt: bool = False):
        self.run = run
        self.command = command
        self.stale_s = float(os.environ.get("RAYSUB_LOCK_STALE_S", 60)) if stale_s is None else stale_s
        local = isinstance(run.fs, pafs.LocalFileSystem)
        self.settle_s = (0.05 if local else 1.0) if settle_s is None else settle_s
        self.exclusive_create = local
        self.token = uuid.uuid4().hex
        self.created_dir = False
        self._created: list = []  # the directories acquire created, deepest first (removed again if left empty)
        self.interrupt = interrupt
        self.lost: Optional[Dict[str, Any]] = None  # the record of whoever took the lock from us, if anyone did
        self.renewed = 0.0  # when our record was last written (the lease's age)
        self._mutex = threading.Lock()  # the heartbeat thread and a writer's `check` renew one at a time
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        pid = os.getpid()
        self.record = {"user": _user(), "host": platform.node(), **_machine(), "pid": pid,
                       "pid_started": _process_started(pid), "command": command, "token": self.token,
                       "started": _iso(_now()), "heartbeat": _now()}

    # -- the record ---------------------------------------------------------------------------------------
    def _read(self) -> Optional[Dict[str, Any]]:
        try:
            record = json.loads(self.run.read_bytes(LOCK).to_pybytes())
            if isinstance(record, dict):
                return record
        except StorageError:  # missing (read_bytes says so with a StorageError)
            return None
        except ValueError:
            pass
        # garbage: someone else's, alive while the file is younger than stale_s (a write in progress), then stale
        mtime = self.run.fs.get_file_info(self.run.path(LOCK)).mtime
        return {"token": "unreadable", "command": "? (an unreadable lock file)",
                "heartbeat": mtime.timestamp() if mtime is not None else _now()}

    def _write(self) -> None:
        self.record["heartbeat"] = _now()
        self.run.write_bytes(LOCK, json.dumps(self.record).encode())
        self.renewed = self.record["heartbeat"]

    def _create_exclusive(self) -> bool:
        """Create the lock file only if absent (local disks): a complete temporary file hard-linked to the lock's
        name, so no reader ever sees it empty. False when someone else's is there."""
        self.record["heartbeat"] = _now()
        tmp = f"{self.run.path(LOCK)}.tmp-{self.token[:8]}"
        with open(tmp, "w") as f:
            f.write(json.dumps(self.record))
        try:
            os.link(tmp, self.run.path(LOCK))
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: an exclusive create (a reader may see it empty)
            try:
                fd = os.open(self.run.path(LOCK), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record))
            return True
        finally:
            os.unlink(tmp)

    def stale(self, record: Dict[str, Any]) -> Tuple[bool, str]:
        """Whether ``record``'s owner is gone, and why."""
        if record.get("token") is None:
            return False, ""
        mine = _machine()
        comparable = all(record.get(k) == mine[k] for k in mine if record.get(k) and mine[k])
        if record.get("host") == platform.node() and comparable and isinstance(record.get("pid"), int):
            started = _process_started(record["pid"])
            if started is None:
                return True, f"pid {record['pid']} no longer runs on {record['host']}"
            if started and record.get("pid_started") and started != record["pid_started"]:
                return True, f"pid {record['pid']} on {record['host']} is now another process"
            return False, ""
        age = _now() - float(record.get("heartbeat", 0))
        if age > self.stale_s:
            return True, f"no heartbeat for {age:.0f}s (stale after {self.stale_s:g}s, RAYSUB_LOCK_STALE_S)"
        return False, ""

    def _refuse(self, record: Dict[str, Any]) -> RunLocked:
        return RunLocked(f"run directory {self.run.uri} is in use by {describe(record)}: wait for it to finish, or "
                         f"use another run_dir (a lock whose owner is gone is taken over automatically)")

    # -- acquire / release --------------------------------------------------------------------------------
    def acquire(self, say=print) -> None:
        """Take the lock, or raise `RunLocked` naming the owner.

        Raises:
            RunLocked: another live command holds it.
            ConfigError: the run directory is a file, or cannot be created.
        """
        info = self.run.probe()  # unreachable storage or refused credentials: one line, before Ray starts
        if info.type == pafs.FileType.File:
            raise ConfigError(f"run_dir={self.run.uri} is a file, not a directory: choose another run_dir")
        if info.type == pafs.FileType.NotFound:
            self._created = self._missing_dirs()
            try:
                self.run.makedirs()
            except OSError as exc:
                raise ConfigError(f"run_dir={self.run.uri} cannot be created ({exc.strerror or exc}): choose a "
                                  f"writable run_dir") from None
            self.created_dir = True
        existing = self._read()
        if existing is not None:
            gone, why = self.stale(existing)
            if not gone:
                raise self._refuse(existing)
            say(f"raysub: taking over the lock of {self.run.uri} from {describe(existing)}: {why}")
            self._write()
        else:
            try:
                if not self.exclusive_create:
                    self._write()
                elif not self._create_exclusive():
                    raise self._refuse(self._read() or {})
            except OSError as exc:
                raise ConfigError(f"run_dir={self.run.uri} is not writable ({exc}): choose a writable run_dir") from None
        time.sleep(self.settle_s)
        winner = self._read()
        if winner is None or winner.get("token") != self.token:
            raise self._refuse(winner or {})
        self.renewed = float(self.record["heartbeat"])
        self._thread = threading.Thread(target=self._heartbeat, name="raysub-lock-heartbeat", daemon=True)
        self._thread.start()

    def _missing_dirs(self) -> list:
        """The run directory and those of its parents that do not exist yet, deepest first: what ``makedirs``
        creates, and a refused command removes again."""
        missing, path = [], self.run.root
        local = isinstance(self.run.fs, pafs.LocalFileSystem)
        while path and self.run.fs.get_file_info(path).type == pafs.FileType.NotFound:
            if not local and "/" not in path.strip("/"):
                break  # a bucket is never ours to remove
            missing.append(path)
            parent = os.path.dirname(path.rstrip("/"))
            if parent == path:
                break
            path = parent
        return missing

    def _lose(self, record: Optional[Dict[str, Any]]) -> None:
        """Mark the lock lost to ``record``'s owner (None: the record is gone — the new owner finished)."""
        self.lost = record if record is not None else {}
        _lost[self.run.uri] = lost_message(self.run, self.lost)

    def _renew(self) -> None:
        """One heartbeat: read the record and refresh it only while it still holds our token (a read, a compare,
        then a write — never a blind write); a missing or foreign record marks the lock lost, never re-created."""
        current = self._read()
        if current is None or current.get("token") != self.token:
            self._lose(current)
            return
        self._write()

    def check(self) -> None:
        """Before a write by this process: raise `RunLocked` unless the lock record on storage still holds our
        token. A lease not renewed for ``stale_s / 2`` (this process was paused) is renewed first, or found lost."""
        with self._mutex:
            if self.lost is None:
                if _now() - self.renewed > self.stale_s / 2:
                    self._renew()
                else:
                    current = self._read()
                    if current is None or current.get("token") != self.token:
                        self._lose(current)
        if self.lost is not None:
            raise RunLocked(lost_message(self.run, self.lost))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_s / 4):
            try:
                with self._mutex:
                    if self.lost is None:
                        self._renew()
            except Exception as exc:  # a storage hiccup: try again at the next beat
                print(f"raysub: warning: could not refresh the lock of {self.run.uri} ({exc})", file=sys.stderr,
                      flush=True)
                continue
            if self.lost is not None:
                if self.interrupt and not self._stop.is_set():
                    # a real signal, so a blocking wait (ray.get, sleep) returns too; the CLI says why in one line
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                else:
                    print(f"raysub: warning: {lost_message(self.run, self.lost)}", file=sys.stderr, flush=True)
                return

    def release(self) -> None:
        """Stop the heartbeat; remove the lock if it is still ours, and the directories acquire created (the run
        directory and its parents) where nothing else was left in them. A lost lock touches nothing: the
        directory is the new owner's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost is not None:
            return
        current = self._read()
        if current is not None and current.get("token") == self.token:
            self.run.delete(LOCK)
        local = isinstance(self.run.fs, pafs.LocalFileSystem)
        for path in self._created:
            info = self.run.fs.get_file_info(path)
            if info.type != pafs.FileType.Directory or self.run.fs.get_file_info(
                    pafs.FileSelector(path, recursive=False)):
                break  # not empty any more: someone else's now (and so are its parents)
            if local:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            else:
                self.run.fs.delete_dir(path)  # object storage: a "directory" is only a prefix marker


@contextlib.contextmanager
def run_lock(run: RunDir, command: Optional[str] = None, say=print) -> Iterator[Optional[RunLock]]:
    """Hold ``run``'s lock for the block (re-entrant: an inner stage of the same process reuses it)."""
    if run.uri in _held:
        yield _held[run.uri]
        return
    main = threading.current_thread() is threading.main_thread()
    lock = RunLock(run, command or _command(), interrupt=main)
    if not _held:
        _lost.clear()  # a new command: an earlier one's loss (tests run several in one process) is not its own
    # A command started in the background of a script (`raysub run ... &`) inherits SIGINT ignored: the heartbeat's
    # interrupt would then do nothing and a command whose lock was lost run on to its next write. While it holds
    # the lock it takes SIGINT as Python does by default.
    ignored = main and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        lock.acquire(say)
    except BaseException:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise
    _held[run.uri] = lock
    try:
        yield lock
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        del _held[run.uri]
        try:
            lock.release()
        except Exception as exc:  # e.g. storage unreachable: never replace the command's own outcome
            print(f"raysub: warning: could not release the lock of {run.uri} ({exc}); the next command takes it "
                  f"over once it is stale", file=sys.stderr, flush=True)


def lost_message(run: RunDir, record: Optional[Dict[str, Any]]) -> str:
    """The one line of a command whose lock on ``run`` was taken over by ``record``'s owner (None or empty: the
    record is gone, its new owner has finished and released it)."""
    who = (f"by {describe(record)}" if record else
           "by another command (it has finished and released the lock)")
    return (f"the lock of {run.uri} was taken over {who} while this command ran: it stops without committing or "
            f"writing more, so the two do not mix; rerun it once the other command has finished")


def lost_lock() -> Optional[str]:
    """Why a lock this process held was lost (`lost_message`), or None: the CLI's one line for a command that the
    heartbeat interrupted. Reading it forgets it."""
    lost = next(iter(_lost.values()), None)
    _lost.clear()
    return lost


def token_of(run: RunDir) -> Optional[str]:
    """The token of the lock this process holds on ``run`` (None: none held): pass it to the workers that write
    into the run, for their `fence` calls."""
    lock = _held.get(run.uri)
    return lock.token if lock is not None else None


def fence(run: RunDir, token: Optional[str] = None) -> None:
    """Call before writing into ``run``: refuse unless the lock record on storage still holds this command's token
    (one small read). In the driver ``token`` is the lock this process holds (no lock held: nothing to check); in
    a worker, pass the token the driver handed down (`token_of`), since a remote worker shares no memory or
    environment with the driver.

    Raises:
        RunLocked: the lock was taken over (its record is foreign) or is gone; the line names the new owner.
    """
    if token is None:
        lock = _held.get(run.uri)
        if lock is not None:
            lock.check()
        return
    try:
        record = json.loads(run.read_bytes(LOCK).to_pybytes())
    except StorageError:  # missing: the new owner has finished and released it
        record = None
    except ValueError:
        record = {"command": "? (an unreadable lock file)"}
    if not isinstance(record, dict) or record.get("token") != token:
        raise RunLocked(lost_message(run, record if isinstance(record, dict) else None))


def check_held(run: RunDir) -> None:
    """Before a commit: `fence` with this process's lock (reads the record on storage).

    Raises:
        RunLocked: naming the new owner.
    """
    fence(run)


def _command() -> str:
    """This process's command line, as the user typed it."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return credentials.strip(" ".join(["raysub" if prog in ("raysub", "cli.py") else prog, *sys.argv[1:]]))
