"""A run directory's records: its state checks (``--resume`` / ``--overwrite``, a resumed config against the
stored one), the manifest — the run's one commit record — and its copies, and the run's creation (θ0).

``manifest.json`` holds the checksums of every file (θ0, shards, indices, the basis, trained z's), the stages
done, the resolved config and the summary; ``config.yaml`` and ``summary.json`` are copies written right after
each commit (and re-synced by the next command that gets past its checks if a kill came between: a refused
command writes nothing). A stage writes its files first and commits them by rewriting the manifest (an atomic
rename), so a kill at any point leaves the old state or the new one, never a mix.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow
import pyarrow.fs as pafs

from raysub.config import Config
from raysub.errors import ConfigError, StorageError
from raysub.lock import fence
from raysub.runs import layout
from raysub.runs.manifest import Manifest, stored_config
from raysub.storage import LOCK, RunDir, block_bounds, strict_json

# keys a resumed run may change: where and how wide it runs, not what it computes (a moved run directory too)
RESUME_SAFE = ("cluster.", "data.num_workers", "run_dir", "sweep.max_concurrent", "tracking.")
# sections a resumed `raysub run`/`sample` (and `train CONFIG`) may change because their stages check them
# themselves: a basis of another dim is rebuilt, and a training compares its own train.* settings
STAGE_CHECKED = ("basis.", "train.")
# keys never safe to change on resume, even inside a safe prefix: train.init_from made the run's θ0
NEVER_SAFE = ("train.init_from",)

# ---------------------------------------------------------------------------------------------------------
# the run directory

def prepare_run_dir(run: RunDir, resume: bool, overwrite: bool, cfg: Optional[Config] = None,
                    also_safe: Sequence[str] = ()) -> bool:
    """Check the run directory's state; returns True when an existing run is resumed (``--resume`` on a missing
    or empty directory starts a new run). On resume, ``cfg`` must match the stored config but for `RESUME_SAFE`
    and ``also_safe`` keys (`check_resume`).

    Raises:
        ConfigError: the directory holds a run and neither flag was given, or both were; it is a file; or the
            resumed config differs from the run's in a key that changes results.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: pick one")
    if run.is_nonempty():  # (a run_dir that is a file was refused by the lock, taken first)
        if overwrite:
            return False
        if resume:
            if cfg is not None:
                check_resume(run, cfg, also_safe)
            return True
        raise ConfigError(f"run directory {run.uri} already exists: pass --resume to continue it or --overwrite to "
                          f"replace it (or set run_dir=NEW_DIR)")
    return False  # --resume of a run that never started starts it, so a retried job needs no other flag


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: Dict[str, Any], new: Dict[str, Any], safe: Sequence[str] = RESUME_SAFE
                ) -> List[Tuple[str, Any, Any]]:
    """(dotted key, old, new) for every key whose value differs, except the ``safe`` ones (prefixes)."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and (k in NEVER_SAFE or not any(k == s or k.startswith(s) for s in safe))]


def diff_text(diffs: Sequence[Tuple[str, Any, Any]]) -> str:
    shown = ", ".join(f"{k} ({old!r} in the run, {new!r} now)" for k, old, new in diffs[:6])
    return shown + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else "")


def check_resume(run: RunDir, cfg: Config, also_safe: Sequence[str] = ()) -> None:
    """A resumed run must compute what it started computing: refuse a config that differs from the stored one
    in anything but `RESUME_SAFE` (e.g. ``cluster.*``) and ``also_safe`` keys — and an unfinished sampling on
    another number of workers (its trajectory is sharded one block per worker).

    Raises:
        ConfigError: naming the differing keys with both values.
    """
    stored = stored_config(run)
    if stored is None:
        return
    manifest = Manifest.peek(run)
    blocks = len(manifest.blocks or [])
    if blocks and not manifest.stages.get("sample", {}).get("complete") \
            and cfg.ranks != blocks:
        raise ConfigError(f"--resume: the unfinished sampling of {run.uri} is sharded over {blocks} workers: resume "
                          f"it with cluster.num_workers={blocks} (it may change once sampling is complete)")
    diffs = config_diff(Config.from_dict(stored).to_dict(), cfg.to_dict(), RESUME_SAFE + tuple(also_safe))
    if diffs:
        raise ConfigError(f"--resume: this config differs from the run's ({run.arg(layout.CONFIG)}) in "
                          f"{diff_text(diffs)}; resuming would mix two runs: resume with the run's config (raysub "
                          f"... {run.arg(layout.CONFIG)} --resume; only cluster.* may change) or start a new run "
                          f"(--overwrite, or run_dir=NEW_DIR)")


def existing_run(run: RunDir) -> RunDir:
    """``run`` when it is a directory (one-line errors for a file or a missing path)."""
    kind = run.probe().type.name
    if kind == "File":
        raise ConfigError(f"{run.uri} is a file, not a run directory: pass the run directory (run_dir of 'raysub "
                          f"sample')")
    if kind == "NotFound":
        raise StorageError(f"{run.uri} does not exist: pass the run directory of a 'raysub sample' or 'raysub run'")
    return run


# ---------------------------------------------------------------------------------------------------------
# records

def _git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def new_manifest(cfg: Config, info: Dict[str, Any]) -> Manifest:
    """A new run's manifest (nothing committed yet): versions, host, the model's size and layout, the blocks."""
    import ray  # the version only: imported where a run is created, not by everything that reads one
    import torch  # heavy: torch loads here (its version), not when this module is imported

    import raysub

    return Manifest(
        raysub_version=raysub.__version__,
        versions={"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                  "pyarrow": pyarrow.__version__},
        git_revision=_git_revision(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(),
        world_size=cfg.ranks,
        device="cuda" if cfg.cluster.use_gpu else "cpu",
        num_params=info["num_params"],  # trainable: the flat vector every stage sees
        num_params_total=info.get("num_params_total", info["num_params"]),  # frozen ones (UV's W0) too
        init_from=info.get("init_from") or None,  # the base weights' run and sha256
        theta0_from=info.get("theta0_from") or None,  # the basis run's θ0
        uv_layers=info["uv"]["layers"] if info.get("uv") else None,
        layout=info["layout"],
        blocks=[{"block": b, "start": s, "stop": e}
                for b, (s, e) in enumerate(block_bounds(info["num_params"], cfg.ranks))],
        stages={},
        shards={},
        config=cfg.to_dict(),
        summary={"results": {}, "timings": {}},
    )


def _config_text(run: RunDir, config: Dict[str, Any]) -> str:
    """``config.yaml``'s text. Its run_dir is the directory the file is written in, the same one its header's
    rerun line names: a moved or copied run's copy never points at the run it came from."""
    cfg = Config.from_dict(config)
    cfg.run_dir = run.uri
    return cfg.to_yaml(f"# resolved config of this run; rerun: raysub run {run.arg(layout.CONFIG)} --overwrite\n")


def commit(run: RunDir, manifest: Manifest) -> None:
    """Commit ``manifest`` (one atomic rename), then write its copies ``config.yaml`` and ``summary.json``.

    Raises:
        RunLocked: another command took this one's lock over, or the lock's record is gone (read from storage,
            not only this process's memory: a paused process learns it here first): nothing is committed.
    """
    fence(run)
    manifest.write(run)
    sync_copies(run, manifest)


def sync_copies(run: RunDir, manifest: Manifest) -> None:
    """Make ``config.yaml`` and ``summary.json`` copies of the committed manifest's (a kill between a commit and
    its copies leaves them one commit behind: the next command that gets past its checks calls `settle`).
    A copy already equal to what it would be written as is left alone."""
    if manifest.config is not None:
        text = _config_text(run, manifest.config)
        if not run.exists(layout.CONFIG) or run.read_text(layout.CONFIG) != text:
            run.write_text(layout.CONFIG, text)
    if manifest.summary is not None:
        want = json.loads(json.dumps(strict_json(manifest.summary)))
        try:
            same = run.exists(layout.SUMMARY) and run.read_json(layout.SUMMARY) == want
        except StorageError:  # an unreadable copy: rewritten
            same = False
        if not same:
            run.write_json(layout.SUMMARY, manifest.summary)


def open_manifest(run: RunDir) -> Manifest:
    """The committed manifest (`Manifest.read`); raises StorageError when there is none. Writes nothing: a
    command refused after reading it leaves the run as it was (`settle` re-syncs the copies once the command is
    past its checks)."""
    return Manifest.read(run)


# what `RunDir.write_bytes`/`open_writer` leave of a write killed before its rename
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{8}$")


def remove_temporaries(run: RunDir) -> List[str]:
    """Delete the temporary files killed writes left anywhere in the run (``NAME.tmp-XXXXXXXX``); returns their
    paths relative to the run. One recursive listing, so object storage is asked once. Call under the run's
    lock: a running command's own writes are in flight under such names (and so may be another command's
    attempt to take the lock, whose temporaries are left alone)."""
    if not run.exists():
        return []
    root = run.path().rstrip("/") + "/"
    found = [info.path for info in run.fs.get_file_info(pafs.FileSelector(run.path(), recursive=True))
             if info.type == pafs.FileType.File and _TEMPORARY.search(info.path)
             and not info.path.startswith(root + LOCK)]
    for path in found:
        run.fs.delete_file(path)
    return [p[len(root):] if p.startswith(root) else p for p in found]


def settle(run: RunDir, manifest: Manifest) -> None:
    """What a command does to the run once it is past its checks, before its own work: re-sync ``config.yaml``
    and ``summary.json`` with the committed ``manifest`` and remove the temporary files of killed writes. A
    refused command never gets here, so it writes nothing."""
    sync_copies(run, manifest)
    remove_temporaries(run)


def read_summary(run: RunDir) -> Dict[str, Any]:
    """The run's committed summary (the manifest's), ``summary.json`` for a run without one, or an empty one."""
    summary = Manifest.peek(run).summary
    if summary is not None:
        return summary
    return run.read_json(layout.SUMMARY) if run.exists(layout.SUMMARY) else {"results": {}, "timings": {}}


# what a run directory may hold before its first commit (a run killed while it was being created)
_UNCOMMITTED = {layout.CONFIG, layout.THETA0, layout.LOGS}


def init_run(cfg: Config, info: Dict[str, Any], resuming: bool, overwrite: bool) -> Manifest:
    """Create (or reopen, when ``resuming``) the run directory: the seeded ``theta0.pt`` and the manifest that
    commits it with its sha256, the config and an empty summary. Returns the manifest. Call under the run's lock,
    after `plan` and `prepare_run_dir`.

    A new run always writes its own θ0; a resumed one verifies the stored θ0 against the manifest.
    """
    # heavy: torch loads here, not when this module is imported
    import torch

    run = RunDir(cfg.run_dir)
    if resuming and run.exists(layout.MANIFEST):
        manifest = open_manifest(run)
        run.read_theta0()  # verified: a resumed run goes on from its own θ0
        settle(run, manifest)
        return manifest
    if resuming:  # a run killed before its first commit: only its own uncommitted files may be there
        others = [n for n in run.listdir() if n not in _UNCOMMITTED and layout.TEMPORARY_INFIX not in n and n != layout.LOCK]
        if others:
            raise StorageError(f"{run.uri} has no manifest.json but holds {', '.join(others[:5])}: not a raysub "
                               f"run; pass --overwrite to replace it, or choose another run_dir")
    if run.exists():
        run.clear()
    run.makedirs()
    model = info["model"]
    manifest = new_manifest(cfg, info)
    manifest.shards[layout.THETA0] = run.write_torch(layout.THETA0, model.state_dict())
    # the trainable parameters as one vector (`raysub.engine.flat.flatten_params`, which is a layer above)
    manifest.theta0_norm = float(torch.cat([p.detach().reshape(-1) for p in model.parameters()
                                            if p.requires_grad]).norm())
    commit(run, manifest)
    return manifest


def same_state(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two state_dicts hold the same tensors."""
    # heavy: torch loads here, not when this module is imported
    import torch

    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
