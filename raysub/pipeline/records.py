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
import os
import platform
import re
import subprocess
from typing import Any, Dict, List, Optional, Sequence, Tuple

from raysub.config import Config
from raysub.errors import ConfigError, StorageError
from raysub.storage import RunDir, block_bounds

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


def stored_config(run: RunDir) -> Optional[Dict[str, Any]]:
    """The run's resolved config as a dict (the manifest's; ``config.yaml`` for a run without one), or None."""
    if run.exists("manifest.json"):
        manifest = run.read_json("manifest.json")
        if "config" in manifest:
            return manifest["config"]
    if run.exists("config.yaml"):
        from raysub.config import load_yaml

        data = load_yaml(run.read_text("config.yaml"))
        return Config.from_dict(data).to_dict()
    return None


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
    manifest = run.read_json("manifest.json") if run.exists("manifest.json") else {}
    blocks = len(manifest.get("blocks", []))
    if blocks and not manifest.get("stages", {}).get("sample", {}).get("complete") \
            and cfg.cluster.num_workers != blocks:
        raise ConfigError(f"--resume: the unfinished sampling of {run.uri} is sharded over {blocks} workers: resume "
                          f"it with cluster.num_workers={blocks} (it may change once sampling is complete)")
    diffs = config_diff(Config.from_dict(stored).to_dict(), cfg.to_dict(), RESUME_SAFE + tuple(also_safe))
    if diffs:
        raise ConfigError(f"--resume: this config differs from the run's ({run.arg('config.yaml')}) in "
                          f"{diff_text(diffs)}; resuming would mix two runs: resume with the run's config (raysub "
                          f"... {run.arg('config.yaml')} --resume; only cluster.* may change) or start a new run "
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


def new_manifest(cfg: Config, info: Dict[str, Any]) -> Dict[str, Any]:
    import pyarrow
    import ray
    import torch

    import raysub

    return {
        "raysub_version": raysub.__version__,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                     "pyarrow": pyarrow.__version__},
        "git_revision": _git_revision(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "world_size": cfg.cluster.num_workers,
        "device": "cuda" if cfg.cluster.use_gpu else "cpu",
        "num_params": info["num_params"],  # trainable: the flat vector every stage sees
        "num_params_total": info.get("num_params_total", info["num_params"]),  # frozen ones (UV's W0) too
        **({"init_from": info["init_from"]} if info.get("init_from") else {}),  # the base weights' run and sha256
        **({"theta0_from": info["theta0_from"]} if info.get("theta0_from") else {}),  # the basis run's θ0
        **({"uv_layers": info["uv"]["layers"]} if info.get("uv") else {}),
        "layout": info["layout"],
        "blocks": [{"block": b, "start": s, "stop": e}
                   for b, (s, e) in enumerate(block_bounds(info["num_params"], cfg.cluster.num_workers))],
        "stages": {},
        "shards": {},
        "config": cfg.to_dict(),
        "summary": {"results": {}, "timings": {}},
    }


def _config_text(run: RunDir, config: Dict[str, Any]) -> str:
    """``config.yaml``'s text. Its run_dir is the directory the file is written in, the same one its header's
    rerun line names: a moved or copied run's copy never points at the run it came from."""
    cfg = Config.from_dict(config)
    cfg.run_dir = run.uri
    return cfg.to_yaml(f"# resolved config of this run; rerun: raysub run {run.arg('config.yaml')} --overwrite\n")


def commit(run: RunDir, manifest: Dict[str, Any]) -> None:
    """Commit ``manifest`` (one atomic rename), then write its copies ``config.yaml`` and ``summary.json``.

    Raises:
        RunLocked: another command took this one's lock over, or the lock's record is gone (read from storage,
            not only this process's memory: a paused process learns it here first): nothing is committed.
    """
    from raysub.lock import fence

    fence(run)
    run.write_json("manifest.json", manifest)
    sync_copies(run, manifest)


def sync_copies(run: RunDir, manifest: Dict[str, Any]) -> None:
    """Make ``config.yaml`` and ``summary.json`` copies of the committed manifest's (a kill between a commit and
    its copies leaves them one commit behind: the next command that gets past its checks calls `settle`).
    A copy already equal to what it would be written as is left alone."""
    import json

    from raysub.storage import strict_json

    if "config" in manifest:
        text = _config_text(run, manifest["config"])
        if not run.exists("config.yaml") or run.read_text("config.yaml") != text:
            run.write_text("config.yaml", text)
    if "summary" in manifest:
        want = json.loads(json.dumps(strict_json(manifest["summary"])))
        try:
            same = run.exists("summary.json") and run.read_json("summary.json") == want
        except StorageError:  # an unreadable copy: rewritten
            same = False
        if not same:
            run.write_json("summary.json", manifest["summary"])


def open_manifest(run: RunDir) -> Dict[str, Any]:
    """The committed manifest; raises StorageError when there is none. Writes nothing: a command refused after
    reading it leaves the run as it was (`settle` re-syncs the copies once the command is past its checks)."""
    if not run.exists("manifest.json"):
        raise StorageError(f"{run.uri} is not a raysub run directory (no manifest.json): run 'raysub sample' first")
    manifest = run.read_json("manifest.json")
    if not isinstance(manifest, dict) or "shards" not in manifest or "stages" not in manifest:
        raise StorageError(f"{run.path('manifest.json')} is not a raysub manifest: start the run again with "
                           f"--overwrite")
    if "config" not in manifest or "summary" not in manifest:  # a run written before the manifest held them
        manifest.setdefault("config", stored_config(run))
        manifest.setdefault("summary", run.read_json("summary.json") if run.exists("summary.json")
                            else {"results": {}, "timings": {}})
    return manifest


# what `RunDir.write_bytes`/`open_writer` leave of a write killed before its rename
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{8}$")


def remove_temporaries(run: RunDir) -> List[str]:
    """Delete the temporary files killed writes left anywhere in the run (``NAME.tmp-XXXXXXXX``); returns their
    paths relative to the run. One recursive listing, so object storage is asked once. Call under the run's
    lock: a running command's own writes are in flight under such names (and so may be another command's
    attempt to take the lock, whose temporaries are left alone)."""
    import pyarrow.fs as pafs

    from raysub.storage import LOCK

    if not run.exists():
        return []
    root = run.path().rstrip("/") + "/"
    found = [info.path for info in run.fs.get_file_info(pafs.FileSelector(run.path(), recursive=True))
             if info.type == pafs.FileType.File and _TEMPORARY.search(info.path)
             and not info.path.startswith(root + LOCK)]
    for path in found:
        run.fs.delete_file(path)
    return [p[len(root):] if p.startswith(root) else p for p in found]


def settle(run: RunDir, manifest: Dict[str, Any]) -> None:
    """What a command does to the run once it is past its checks, before its own work: re-sync ``config.yaml``
    and ``summary.json`` with the committed ``manifest`` and remove the temporary files of killed writes. A
    refused command never gets here, so it writes nothing."""
    sync_copies(run, manifest)
    remove_temporaries(run)

def read_summary(run: RunDir) -> Dict[str, Any]:
    """The run's committed summary (the manifest's), ``summary.json`` for a run without one, or an empty one."""
    if run.exists("manifest.json"):
        manifest = run.read_json("manifest.json")
        if "summary" in manifest:
            return manifest["summary"]
    return run.read_json("summary.json") if run.exists("summary.json") else {"results": {}, "timings": {}}


# what a run directory may hold before its first commit (a run killed while it was being created)
_UNCOMMITTED = {"config.yaml", "theta0.pt", "logs"}


def init_run(cfg: Config, info: Dict[str, Any], resuming: bool, overwrite: bool) -> Dict[str, Any]:
    """Create (or reopen, when ``resuming``) the run directory: the seeded ``theta0.pt`` and the manifest that
    commits it with its sha256, the config and an empty summary. Returns the manifest. Call under the run's lock,
    after `plan` and `prepare_run_dir`.

    A new run always writes its own θ0; a resumed one verifies the stored θ0 against the manifest.
    """
    from raysub.engine.flat import flatten_params

    run = RunDir(cfg.run_dir)
    if resuming and run.exists("manifest.json"):
        manifest = open_manifest(run)
        run.read_theta0()  # verified: a resumed run goes on from its own θ0
        settle(run, manifest)
        return manifest
    if resuming:  # a run killed before its first commit: only its own uncommitted files may be there
        others = [n for n in run.listdir() if n not in _UNCOMMITTED and ".tmp-" not in n and n != "raysub.lock"]
        if others:
            raise StorageError(f"{run.uri} has no manifest.json but holds {', '.join(others[:5])}: not a raysub "
                               f"run; pass --overwrite to replace it, or choose another run_dir")
    if run.exists():
        run.clear()
    run.makedirs()
    model = info["model"]
    manifest = new_manifest(cfg, info)
    manifest["shards"]["theta0.pt"] = run.write_torch("theta0.pt", model.state_dict())
    manifest["theta0_norm"] = float(flatten_params(model).norm())
    commit(run, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------
# θ0 of a training in another run's basis

def basis_run_theta0(cfg: Config, model: Any = None) -> Optional[Dict[str, Any]]:
    """The θ0 a training in another run's basis starts from: ``train.basis_run``'s ``theta0.pt``, verified
    against that run's manifest, when ``train.projection`` reads a basis run (None otherwise). The basis spans
    the directions the trajectory took from that θ0, so a training around any other point is another model:
    `raysub train CONFIG`, ``raysub l2o meta-train`` and ``l2o tune`` use it as their θ0, as ``raysub sweep``
    does, whatever their ``seed``.

    With ``model`` (the planned model): the state must be one of that model (same keys and shapes) and, where
    ``train.init_from`` set the model's weights, equal to them; it is then loaded into ``model``, so the run
    writes it as its own ``theta0.pt``.

    Raises:
        StorageError: the basis run's theta0.pt is missing, has no checksum in its manifest, or is corrupted.
        ConfigError: it is another model's θ0, or train.init_from names other weights.
    """
    from raysub.projections import PROJECTIONS

    name, uri = cfg.train.projection, cfg.train.basis_run
    if not uri or name not in PROJECTIONS or not PROJECTIONS.meta(name).get("needs_basis_run"):
        return None
    source = RunDir(uri)
    state = source.read_theta0()
    if model is None:
        return state
    mine = model.state_dict()
    if set(mine) != set(state) or any(tuple(mine[k].shape) != tuple(state[k].shape) for k in mine):
        raise ConfigError(f"train.basis_run={uri} holds the θ0 of another model ({source.path('theta0.pt')}): use "
                          f"the model and data of that run, or sample a new run for this model")
    if cfg.train.init_from and not same_state(mine, state):
        raise ConfigError(f"train.init_from={cfg.train.init_from} sets θ0 to other weights than the θ0 the basis of "
                          f"train.basis_run={uri} was sampled from: drop train.init_from (the training then starts "
                          f"from that run's θ0), or build the basis from a run sampled with this train.init_from")
    model.load_state_dict(state)
    return state


def same_state(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two state_dicts hold the same tensors."""
    import torch

    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
