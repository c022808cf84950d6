"""The DLDR pipeline and its stages, driver side: plan (validate everything), sample, basis, train, report.

Nothing is written before every check has passed: config problems, dataset paths, model options, the
snapshot count against ``basis.dim``, the run directory's state (``--resume`` / ``--overwrite``) and, on
``--resume``, that the config is the run's own. Every command holds the run directory's lock (`raysub.lock`).

Commits: ``manifest.json`` is a run's one commit record. It holds the checksums of every file (θ0, shards,
indices, the basis), the stages done, the resolved config and the summary; ``config.yaml`` and
``summary.json`` are copies written right after it (and re-synced by the next command if a kill came between).
A stage writes its files first — a basis into a new ``basis/GEN/`` directory — and commits them by rewriting the
manifest (an atomic rename), so a kill at any point leaves the old state or the new one, never a mix.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from raysub.config import Config, merge, parse_overrides
from raysub.pipeline.plan import check, plan
from raysub.errors import ConfigError, DivergedError, StorageError
from raysub.lock import run_lock
from raysub.storage import RunDir, block_bounds, sha256

Printer = Callable[[str], None]

STAGE_SECTIONS = {"basis": ("basis", "cluster"), "train": ("train", "cluster")}
# keys a resumed run may change: where and how wide it runs, not what it computes (a moved run directory too)
RESUME_SAFE = ("cluster.", "data.num_workers", "run_dir", "sweep.max_concurrent")
# sections a resumed `raysub run`/`sample` (and `train CONFIG`) may change because their stages check them
# themselves: a basis of another dim is rebuilt, and a training compares its own train.* settings
STAGE_CHECKED = ("basis.", "train.")


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
    if run.fs.get_file_info(run.root).type.name == "File":
        raise ConfigError(f"run_dir={run.uri} is a file, not a directory: choose another run_dir")
    if run.is_nonempty():
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
            if a.get(k) != b.get(k) and not any(k == s or k.startswith(s) for s in safe)]


def _diff_text(diffs: Sequence[Tuple[str, Any, Any]]) -> str:
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
        raise ConfigError(f"--resume: this config differs from the run's ({run.uri}/config.yaml) in "
                          f"{_diff_text(diffs)}; resuming would mix two runs: resume with the run's config (raysub "
                          f"... {run.uri}/config.yaml --resume; only cluster.* may change) or start a new run "
                          f"(--overwrite, or run_dir=NEW_DIR)")


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
        "num_params": info["num_params"],
        "layout": info["layout"],
        "blocks": [{"block": b, "start": s, "stop": e}
                   for b, (s, e) in enumerate(block_bounds(info["num_params"], cfg.cluster.num_workers))],
        "stages": {},
        "shards": {},
        "config": cfg.to_dict(),
        "summary": {"results": {}, "timings": {}},
    }


def _config_text(run: RunDir, config: Dict[str, Any]) -> str:
    return Config.from_dict(config).to_yaml(f"# resolved config of this run; rerun: raysub run {run.uri}/config.yaml "
                                            f"--overwrite\n")


def commit(run: RunDir, manifest: Dict[str, Any]) -> None:
    """Commit ``manifest`` (one atomic rename), then write its copies ``config.yaml`` and ``summary.json``.

    Raises:
        RunLocked: another command took this one's lock over: nothing is committed.
    """
    from raysub.lock import check_held

    check_held(run)
    run.write_json("manifest.json", manifest)
    sync_copies(run, manifest)


def sync_copies(run: RunDir, manifest: Dict[str, Any]) -> None:
    """Make ``config.yaml`` and ``summary.json`` copies of the committed manifest's (a kill between a commit and
    its copies leaves them one commit behind; the next command calls this)."""
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
    """The committed manifest (its copies re-synced); raises StorageError when there is none."""
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
    sync_copies(run, manifest)
    return manifest


def _loss_curve(run: RunDir, label: str, step_losses) -> Dict[str, Any]:
    """Write the per-step training losses to curves/LABEL.json; return the convergence step (SL2O §4.1)."""
    from raysub.metrics import convergence_step

    run.write_json(f"curves/{label}.json", {"train_loss": step_losses})
    return {"convergence_step": convergence_step(step_losses), "steps": len(step_losses),
            "min_train_loss": min(step_losses) if step_losses else None}


def read_summary(run: RunDir) -> Dict[str, Any]:
    """The run's committed summary (the manifest's), ``summary.json`` for a run without one, or an empty one."""
    if run.exists("manifest.json"):
        manifest = run.read_json("manifest.json")
        if "summary" in manifest:
            return manifest["summary"]
    return run.read_json("summary.json") if run.exists("summary.json") else {"results": {}, "timings": {}}


# ---------------------------------------------------------------------------------------------------------
# stages

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


def stage_sample(cfg: Config, resume: bool = False, overwrite: bool = False, say: Printer = print,
                 info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Validate, then sample the trajectory (and train the SGD baseline) into ``cfg.run_dir``."""

    from raysub.engine.cluster import ensure_ray
    from raysub.pipeline.sample import run_sample

    info = info or plan(cfg)
    run = RunDir(cfg.run_dir)
    cfg.run_dir = run.uri  # workers run in other directories: pass an absolute path or URI
    with run_lock(run, say=say):
        resuming = prepare_run_dir(run, resume, overwrite, cfg, STAGE_CHECKED)
        if resuming and run.exists("manifest.json"):
            manifest = open_manifest(run)
            if manifest["stages"].get("sample", {}).get("complete"):
                say(f"[sample] already complete in {run.uri}; skipping")
                return manifest
        ensure_ray(cfg)
        manifest = init_run(cfg, info, resuming, overwrite)
        say(f"[sample] {cfg.model.name} on {cfg.data.name}: {info['num_params']:,} parameters, "
            f"{cfg.cluster.num_workers} workers, {info['num_snapshots']} snapshots over {cfg.sample.epochs} epochs, "
            f"SGD for {cfg.sgd.epochs} epochs")
        out = run_sample(cfg, run, lambda r: say(format_progress(r)))
        manifest["shards"].update(out["shards"])
        manifest["num_snapshots"] = out["num_snapshots"]
        manifest["stages"]["sample"] = {"complete": True, "wall_s": out["wall_s"], "window_s": out["window_s"],
                                        "num_snapshots": out["num_snapshots"]}
        summary = manifest["summary"]
        hist = out["history"]
        window = [h for h in hist if h["epoch"] == cfg.sample.epochs][0]
        summary.update({"dataset": cfg.data.name, "model": cfg.model.name, "num_params": info["num_params"],
                        "num_snapshots": out["num_snapshots"], "world_size": cfg.cluster.num_workers})
        summary["results"]["sgd"] = {"test_acc": hist[-1]["test_acc"], "epochs": hist[-1]["epoch"],
                                     "wall_s": hist[-1]["elapsed_s"], "dim": info["num_params"],
                                     **_loss_curve(run, "sgd", out["step_losses"]), "history": hist}
        summary["results"]["sgd@sample"] = {"test_acc": window["test_acc"], "epochs": window["epoch"],
                                            "wall_s": out["window_s"], "dim": info["num_params"]}
        summary["timings"]["sample_s"] = out["window_s"]
        summary["timings"]["sample_stage_s"] = out["wall_s"]
        commit(run, manifest)
        return manifest


def _stage_config(run: RunDir, overrides: Sequence[str], stage: str) -> Config:
    """The run's config with ``overrides``, which may only touch the sections ``stage`` uses."""
    base = stored_config(run)
    if base is None:
        raise StorageError(f"{run.uri} is not a raysub run directory (no config.yaml): run 'raysub sample' first")
    update = parse_overrides(overrides)
    bad = [k for k in update if k not in STAGE_SECTIONS[stage]]
    if bad:
        allowed = ", ".join(f"{s}.*" for s in STAGE_SECTIONS[stage])
        raise ConfigError(f"raysub {stage} only takes {allowed} overrides, not {', '.join(bad)}: start a new run "
                          f"for other changes")
    cfg = Config.from_dict(merge(base, update))
    cfg.run_dir = run.uri
    check(cfg, check_data=(stage == "train"))
    return cfg


def _existing_run(run: RunDir) -> RunDir:
    """``run`` when it is a directory (one-line errors for a file or a missing path)."""
    kind = run.fs.get_file_info(run.root).type.name
    if kind == "File":
        raise ConfigError(f"{run.uri} is a file, not a run directory: pass the run directory (run_dir of 'raysub "
                          f"sample')")
    if kind == "NotFound":
        raise StorageError(f"{run.uri} does not exist: pass the run directory of a 'raysub sample' or 'raysub run'")
    return run


def stage_basis(run_uri: str, overrides: Sequence[str] = (), overwrite: bool = False, say: Printer = print,
                cfg: Optional[Config] = None) -> Dict[str, Any]:
    """Build the DLDR basis of a sampled run into a new ``basis/GEN/`` and commit it (the previous basis stays in
    force until the commit, and is deleted after it)."""
    import uuid

    from raysub.engine.cluster import ensure_ray
    from raysub.pipeline.basis import basis_dir, build_basis
    from raysub.pipeline.sample import collect_trajectory

    run = _existing_run(RunDir(run_uri))
    cfg = cfg or _stage_config(run, overrides, "basis")
    with run_lock(run, say=say):
        manifest = open_manifest(run)
        if not manifest["stages"].get("sample", {}).get("complete"):
            raise StorageError(f"{run.uri} has no complete trajectory: run 'raysub sample' (or --resume it) first")
        t = manifest["num_snapshots"]
        if not 0 < cfg.basis.dim < t:
            raise ConfigError(f"basis.dim={cfg.basis.dim} must be in [1, {t - 1}] for the {t} snapshots of "
                              f"{run.uri}: lower it, or sample more")
        if basis_dir(run) is not None and not overwrite:
            raise ConfigError(f"{run.path('basis')} already holds a basis: pass --overwrite to rebuild it")
        blocks, _ = collect_trajectory(run, manifest["shards"])
        ensure_ray(cfg)
        say(f"[basis] {len(blocks)} block actors, {t} snapshots, d={cfg.basis.dim}")
        t0 = time.perf_counter()
        gen = f"basis/{uuid.uuid4().hex[:12]}"
        record = build_basis(run, cfg.basis.dim, blocks, manifest["shards"], prefix=gen)
        wall = time.perf_counter() - t0
        manifest["shards"] = {k: v for k, v in manifest["shards"].items() if not k.startswith("basis/")}
        for b in record["blocks"]:
            manifest["shards"][b["path"]] = b["sha256"]
        manifest["shards"][f"{gen}/spectrum.json"] = record["sha256"]
        manifest["stages"]["basis"] = {"complete": True, "dir": gen, "wall_s": wall, "dim": cfg.basis.dim,
                                       **record["timings"]}
        stale = _drop_own_basis_trainings(manifest)
        manifest["config"] = cfg.to_dict()
        summary = manifest["summary"]
        summary["dim"] = cfg.basis.dim
        summary["explained_variance_ratio"] = record["explained_variance_ratio"]
        summary["explained_variance_top_dim"] = record["explained_variance_top_dim"]
        summary["timings"]["basis_s"] = wall
        commit(run, manifest)
        for name in run.listdir("basis"):  # earlier generations (and a killed rebuild's) are no longer referenced
            if f"basis/{name}" != gen:
                run.delete("basis", name)
        for label in stale:
            RunDir(run.storage_path).delete(f"train-{label}")
        if stale:
            say(f"[basis] dropped the results of {', '.join(stale)}: trained in the previous basis (retrain them)")
        from raysub.plots import plot_explained_variance

        plot_explained_variance(run, record["explained_variance_ratio"], cfg.basis.dim)
        say(f"[basis] top {cfg.basis.dim} components explain {100 * record['explained_variance_top_dim']:.2f}% of "
            f"the trajectory variance ({wall:.1f}s)")
        return record


def _drop_own_basis_trainings(manifest: Dict[str, Any]) -> List[str]:
    """Remove from ``manifest`` every training in the run's own basis (a new basis makes them another model's);
    returns their labels."""
    from raysub.projections import PROJECTIONS

    labels = []
    for key, stage in list(manifest["stages"].items()):
        train = stage.get("train") if key.startswith("train.") else None
        if train and not train.get("basis_run") and PROJECTIONS.meta(train["projection"]).get("needs_basis_run"):
            label = key[len("train."):]
            labels.append(label)
            del manifest["stages"][key]
            manifest["summary"]["results"].pop(label, None)
            manifest["shards"].pop(f"train/{label}.pt", None)
    return labels


def check_train_projection(cfg: Config, num_params: int, run: RunDir, own_basis: bool = True) -> None:
    """The projection family's own checks for this training (d against N, its options, its basis run —
    ``train.basis_run``, else this run's own when ``own_basis``), before Ray starts.

    Raises:
        ConfigError: every problem, in one message.
    """
    from raysub.engine.task import subspace_dim
    from raysub.projections import check_projection

    name = cfg.train.projection
    dim = subspace_dim(cfg, num_params)
    problems = check_projection(name, num_params, dim, cfg.train.projection_options,
                                cfg.train.basis_run or (run.uri if own_basis else None))
    if problems:
        raise ConfigError(problems)


def stage_train(run_uri: str, overrides: Sequence[str] = (), overwrite: bool = False, resume: bool = False,
                say: Printer = print, cfg: Optional[Config] = None) -> Dict[str, Any]:
    """Train z from θ0 in the run's subspace; commits ``results[train.label]`` (and the stage) in the manifest.

    Raises:
        DivergedError: the training diverged; its result is recorded as diverged (no accuracy, no z saved).
    """
    from raysub.engine.cluster import ensure_ray
    from raysub.engine.task import subspace_dim
    from raysub.pipeline.train import divergence_line, run_subspace

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: pick one")
    run = _existing_run(RunDir(run_uri))
    cfg = cfg or _stage_config(run, overrides, "train")
    with run_lock(run, say=say):
        manifest = open_manifest(run)
        num_params = manifest["num_params"]
        check_train_projection(cfg, num_params, run)
        dim = subspace_dim(cfg, num_params)
        label = cfg.train_label
        stage_key = f"train.{label}"
        stage = manifest["stages"].get(stage_key, {})
        results = manifest["summary"]["results"]
        if stage.get("complete") or label in results:
            if not (overwrite or resume):
                raise ConfigError(f"{run.uri} already has results for '{label}': pass --overwrite to retrain, or "
                                  f"set train.label=NAME")
            if resume:
                _check_train_resume(run, cfg, stage)
                if results.get(label, {}).get("diverged"):
                    raise DivergedError(divergence_line(cfg, results[label]["diverged"]))
                say(f"[{label}] already complete; skipping")
                return results[label]
        ckpt_dir = RunDir(run.storage_path)
        ckpt_name = f"train-{label}"
        if stage and not (resume or overwrite):
            raise ConfigError(f"'{label}' was interrupted in {run.uri}: pass --resume to continue it or --overwrite "
                              f"to restart it, or set train.label=NAME")
        resumed = resume and bool(stage)
        if resumed:
            _check_train_resume(run, cfg, stage)
        ensure_ray(cfg)
        if not resumed:  # a fresh training must not pick up an old one's checkpoints or result
            if ckpt_dir.exists(ckpt_name):
                ckpt_dir.delete(ckpt_name)
            results.pop(label, None)
            manifest["shards"].pop(f"train/{label}.pt", None)
            manifest["stages"][stage_key] = {"complete": False, "train": cfg.to_dict()["train"]}
            commit(run, manifest)
        say(f"[{label}] {cfg.train.optimizer} in a {dim:,}-dim {cfg.train.projection} subspace, "
            f"{cfg.cluster.num_workers} workers, {cfg.train.epochs} epochs"
            + (f"; all-reduce {dim + 1:,} floats per step (z's gradient and the loss; an optimizer's same-batch "
               f"re-evaluations add theirs)" if cfg.cluster.num_workers > 1 else ""))
        try:
            out = run_subspace(cfg, run, lambda r: say(format_progress(r)))
        except ConfigError:
            if not resumed:  # a bad input found by the workers: nothing of this new training is kept
                if ckpt_dir.exists(ckpt_name):
                    ckpt_dir.delete(ckpt_name)
                manifest["stages"].pop(stage_key, None)
                commit(run, manifest)
            raise
        hist = out["history"]
        record: Dict[str, Any] = {"dim": dim, "optimizer": cfg.train.optimizer, "projection": cfg.train.projection,
                                  **_loss_curve(run, label, out["step_losses"]), "history": hist}
        if out.get("diverged"):
            record.update(test_acc=None, diverged=out["diverged"], epochs=out["diverged"].get("epoch"),
                          wall_s=hist[-1]["elapsed_s"] if hist else 0.0)
        else:
            record.update(test_acc=hist[-1]["test_acc"], epochs=hist[-1]["epoch"], wall_s=hist[-1]["elapsed_s"],
                          allreduce_floats_per_step=hist[-1]["allreduce_floats_per_step"])
            manifest["shards"][f"train/{label}.pt"] = sha256(run.read_bytes(f"train/{label}.pt"))
        summary = manifest["summary"]
        summary["results"][label] = record
        summary["timings"]["train_s"] = record["wall_s"]
        summary["timings"][f"train_stage_s.{label}"] = out["wall_s"]
        manifest["stages"][stage_key] = {"complete": True, "wall_s": out["wall_s"], "train": cfg.to_dict()["train"],
                                         **({"diverged": True} if out.get("diverged") else {})}
        commit(run, manifest)
        from raysub.plots import plot_accuracy

        plot_accuracy(run, summary)
        if out.get("diverged"):
            raise DivergedError(divergence_line(cfg, out["diverged"]))
        return record


def _check_train_resume(run: RunDir, cfg: Config, stage: Dict[str, Any]) -> None:
    """A resumed training must be the one that started (its ``train`` section); ``cluster.*`` may change."""
    if "train" not in stage:
        return
    diffs = config_diff({"train": stage["train"]}, {"train": cfg.to_dict()["train"]})
    if diffs:
        raise ConfigError(f"--resume: '{cfg.train_label}' was started with other settings: {_diff_text(diffs)}; "
                          f"resuming would mix two trainings: resume with the same train.* settings, retrain with "
                          f"--overwrite, or set train.label=NAME")


def train_from_config(cfg: Config, resume: bool = False, overwrite: bool = False, say: Printer = print
                      ) -> Dict[str, Any]:
    """A subspace training that needs no sampled trajectory (a random or full-parameter family, or a basis
    from ``train.basis_run``): create the run directory (θ0, config, manifest), then `stage_train`."""
    from raysub.engine.cluster import ensure_ray

    info = plan(cfg)
    run = RunDir(cfg.run_dir)
    cfg.run_dir = run.uri
    if cfg.train.basis_run:
        cfg.train.basis_run = RunDir(cfg.train.basis_run).uri
    with run_lock(run, say=say):
        resuming = prepare_run_dir(run, resume, overwrite, cfg, STAGE_CHECKED)
        # before Ray starts; a new run has no basis of its own, so a family that reads one needs train.basis_run
        check_train_projection(cfg, info["num_params"], run, own_basis=False)
        ensure_ray(cfg)
        init_run(cfg, info, resuming, overwrite)
        return stage_train(run.uri, resume=resuming, overwrite=overwrite, say=say, cfg=cfg)


def run_pipeline(cfg: Config, resume: bool = False, overwrite: bool = False, say: Printer = print) -> Dict[str, Any]:
    """sample → basis → train, then print the results table. Returns the summary.

    Raises:
        DivergedError: sampling or the subspace training diverged (the table is printed first for the latter).
    """
    t0 = time.perf_counter()
    info = plan(cfg)
    run = RunDir(cfg.run_dir)
    cfg.run_dir = run.uri
    with run_lock(run, say=say):
        prepare_run_dir(run, resume, overwrite, cfg, STAGE_CHECKED)  # fail before starting Ray
        stage_sample(cfg, resume=resume, overwrite=overwrite, say=say, info=info)
        basis = open_manifest(run)["stages"].get("basis", {})
        if not (resume and basis.get("complete") and basis.get("dim") == cfg.basis.dim):
            stage_basis(cfg.run_dir, overwrite=True, say=say, cfg=cfg)
        diverged = None
        try:
            stage_train(cfg.run_dir, resume=resume, overwrite=overwrite, say=say, cfg=cfg)
        except DivergedError as exc:
            diverged = exc
        manifest = open_manifest(run)
        manifest["summary"]["timings"]["total_s"] = time.perf_counter() - t0
        commit(run, manifest)
        summary = manifest["summary"]
        say(results_table(summary))
        say(f"run directory: {run.uri} (summary.json, plots/)")
        if diverged is not None:
            raise diverged
        return summary


# ---------------------------------------------------------------------------------------------------------
# console

def format_progress(r: Dict[str, Any]) -> str:
    extra = f"  snapshots {r['num_snapshots']}" if "num_snapshots" in r else ""
    width = len(str(r["epochs"]))
    return (f"[{r['stage']}] epoch {r['epoch']:>{width}}/{r['epochs']}  train loss {r['train_loss']:.4f}  "
            f"test loss {r['test_loss']:.4f}  test acc {100 * r['test_acc']:.2f}%{extra}  {r['elapsed_s']:.1f}s")


def format_table(rows: Sequence[Sequence[str]]) -> List[str]:
    """Console table lines: the first row is the header, the first column left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def results_table(summary: Dict[str, Any]) -> str:
    """The console table of a run's results; a diverged training shows as ``diverged (epoch E)``, never as an
    accuracy."""
    rows = [("method", "dim", "test acc", "epochs", "wall s")]
    for name, r in summary["results"].items():
        acc = (f"diverged (epoch {r['diverged'].get('epoch')})" if r.get("diverged")
               else f"{100 * r['test_acc']:.2f}%")
        rows.append((name, f"{r['dim']:,}", acc, str(r["epochs"]), f"{r['wall_s']:.1f}"))
    lines = format_table(rows)
    t = summary.get("timings", {})
    lines.append(f"timings: sample {t.get('sample_s', 0):.1f}s (snapshot window)  basis {t.get('basis_s', 0):.1f}s  "
                 f"train {t.get('train_s', 0):.1f}s" + (f"  total {t['total_s']:.1f}s" if "total_s" in t else ""))
    return "\n".join(lines)
