"""The one way a workflow opens its run directory: `open_run`.

Every command that writes a run (``raysub sample``/``run``/``train CONFIG``, ``sweep``, ``l2o meta-train``,
``l2o tune``, the benchmarks) goes through the same sequence, in this order, so a refused command writes nothing
and Ray starts only once every check has passed: path or URI → the run's lock → fresh/resume/overwrite against
the stored config → the workflow's own checks → Ray (with the shared-storage probe) → θ0 and the manifest commit.
A stage of an existing run (``raysub basis RUN``, ``raysub train RUN``) opens it the same way (``existing=``):
the run → its lock → its committed manifest → the stage's checks → settle → Ray.

Ray is the caller's to start (``start_ray``): this service sits below the engine (`raysub.engine.cluster`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

from raysub.config import Config
from raysub.lock import run_lock
from raysub.runs import layout
from raysub.runs.manifest import Manifest
from raysub.runs.records import existing_run, init_run, open_manifest, prepare_run_dir, settle
from raysub.storage import RunDir


@dataclass
class OpenRun:
    """What `open_run` yields: the run, whether this command resumes it, and its manifest (None when θ0 is off:
    the workflow writes its own records). ``done``: the workflow's ``done`` test said the resumed run already
    holds its result (nothing was started: the caller returns the manifest)."""
    run: RunDir
    resuming: bool
    manifest: Optional[Manifest] = None
    done: bool = False


def absolute_uris(cfg: Config, keys: Sequence[str] = ("init_from",)) -> RunDir:
    """Make ``cfg.run_dir`` and the ``train.KEY`` run references in ``keys`` absolute paths or URIs (workers and
    trials run in other directories; a resume from another directory names the same runs); returns the run."""
    run = RunDir(cfg.run_dir)
    cfg.run_dir = run.uri
    for key in keys:
        if getattr(cfg.train, key):
            setattr(cfg.train, key, RunDir(getattr(cfg.train, key)).uri)
    return run


@contextlib.contextmanager
def open_run(cfg: Config, *, resume: bool = False, overwrite: bool = False, say: Callable[[str], None] = print,
             also_safe: Sequence[str] = (), info: Optional[Dict[str, Any]] = None,
             uris: Sequence[str] = ("init_from",), start_ray: Optional[Callable[[], None]] = None,
             checks: Optional[Callable[[RunDir, Any], None]] = None,
             done: Optional[Callable[[Manifest], bool]] = None,
             announce: Optional[Callable[[], str]] = None,
             existing: Optional[RunDir] = None) -> Iterator[OpenRun]:
    """Open ``cfg.run_dir`` for a workflow and hold its lock for the block.

    Args:
        resume, overwrite: the command's flags (`raysub.runs.records.prepare_run_dir`; ``also_safe``: the
            config keys a resume may change besides `RESUME_SAFE`).
        existing: the run a stage works on (``raysub basis``/``train RUN``), instead of ``cfg.run_dir``: it must
            exist and hold a committed manifest; no fresh/resume/overwrite of the run (``resume``/``overwrite``,
            ``info``, ``uris``, ``announce`` are not used: a stage's own flags are its own). ``checks`` is called
            as ``checks(run, manifest)``; the run is settled after the checks (and ``done``), before Ray, and
            yielded with its manifest (``resuming`` True).
        info: the plan's (model, size, layout): θ0 is written (or, on resume, verified) and the manifest
            committed (`init_run`). None: the workflow has no θ0 of its own (a sweep, an l2o tune) and writes its
            own records.
        uris: the ``train.*`` run references made absolute (`absolute_uris`).
        start_ray: starts or joins Ray (``lambda: ensure_ray(cfg)``), after every check; None: no Ray here.
        checks: the workflow's own checks, ``checks(run, resuming)``, under the lock, before Ray.
        done: on resume, whether the committed manifest already holds the workflow's result: then the run is
            settled and yielded with ``done=True``, without Ray.
        announce: the line said once Ray is up, for a new run (not a resumed one).

    Raises:
        ConfigError/StorageError/RunLocked: the lock, the run's state or the workflow's checks refuse it (nothing
            written).
    """
    if existing is not None:
        with _open_existing(existing, say, start_ray, checks, done) as opened:
            yield opened
        return
    run = absolute_uris(cfg, uris)
    with run_lock(run, say=say):
        resuming = prepare_run_dir(run, resume, overwrite, cfg, also_safe)
        if done is not None and resuming and run.exists(layout.MANIFEST):
            manifest = open_manifest(run)
            if done(manifest):
                settle(run, manifest)
                yield OpenRun(run, resuming, manifest, done=True)
                return
        if checks is not None:
            checks(run, resuming)
        if start_ray is not None:
            start_ray()
        if announce is not None and not resuming:
            say(announce())
        manifest = init_run(cfg, info, resuming, overwrite) if info is not None else None
        yield OpenRun(run, resuming, manifest)


@contextlib.contextmanager
def _open_existing(run: RunDir, say: Callable[[str], None], start_ray: Optional[Callable[[], None]],
                   checks: Optional[Callable[[RunDir, Manifest], None]],
                   done: Optional[Callable[[Manifest], bool]]) -> Iterator[OpenRun]:
    """`open_run`'s ``existing`` mode: the run (a directory) → its lock → its committed manifest (`Manifest.read`)
    → ``checks`` → ``done`` → settle → Ray. Nothing is written before the checks have passed."""
    run = existing_run(run)
    with run_lock(run, say=say):
        manifest = open_manifest(run)
        if checks is not None:
            checks(run, manifest)
        if done is not None and done(manifest):
            settle(run, manifest)
            yield OpenRun(run, True, manifest, done=True)
            return
        settle(run, manifest)
        if start_ray is not None:
            start_ray()
        yield OpenRun(run, True, manifest)
