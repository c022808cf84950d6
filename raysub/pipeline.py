"""The DLDR pipeline and its stages, driver side: plan (validate everything), sample, basis, train, report.

Nothing is written before every check has passed: config problems, dataset paths, model options, the
snapshot count against ``basis.dim``, and the run directory's state (``--resume`` / ``--overwrite``).
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from raysub.config import Config, check, merge, num_snapshots, open_dataset, parse_overrides
from raysub.errors import ConfigError, StorageError
from raysub.storage import RunDir, block_bounds, sha256

Printer = Callable[[str], None]

STAGE_SECTIONS = {"basis": ("basis", "cluster"), "train": ("train", "cluster")}


# ---------------------------------------------------------------------------------------------------------
# planning

def plan(cfg: Config) -> Dict[str, Any]:
    """Validate ``cfg`` fully without starting Ray or writing anything.

    Returns:
        {"num_params", "num_snapshots", "steps_per_epoch", "layout", "num_classes"}.
    Raises:
        ConfigError: every problem found, in one message.
    """
    import torch

    from raysub.flat import layout_to_json, param_layout
    from raysub.models import build_model

    check(cfg)
    data = open_dataset(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, data.num_classes, data.input_shape, **cfg.model.options)
    layout = param_layout(model)
    n = sum(e.numel for e in layout)
    steps = data.size("train") // cfg.data.batch_size
    problems = []
    if steps == 0:
        problems.append(f"data.batch_size={cfg.data.batch_size} exceeds the {data.size('train')} training examples: "
                        "lower it")
    t = num_snapshots(cfg, max(steps, 1))
    if cfg.basis.dim >= t:
        problems.append(f"basis.dim={cfg.basis.dim} must be < the {t} snapshots sampled: lower basis.dim or sample "
                        f"more (sample.epochs, sample.snapshots_per_epoch, sample.snapshot_every_steps)")
    if cfg.basis.dim >= n:
        problems.append(f"basis.dim={cfg.basis.dim} must be < the model's {n} parameters: lower it")
    if cfg.cluster.num_workers > n:
        problems.append(f"cluster.num_workers={cfg.cluster.num_workers} exceeds the {n} parameters to shard")
    if problems:
        raise ConfigError(problems)
    return {"num_params": n, "num_snapshots": t, "steps_per_epoch": steps, "layout": layout_to_json(layout),
            "num_classes": data.num_classes, "model": model}


def prepare_run_dir(run: RunDir, resume: bool, overwrite: bool) -> bool:
    """Check the run directory's state; returns True when an existing run is resumed (``--resume`` on a missing
    or empty directory starts a new run).

    Raises:
        ConfigError: the directory holds a run and neither flag was given, or both were.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: pick one")
    if run.is_nonempty():
        if overwrite:
            return False
        if resume:
            return True
        raise ConfigError(f"run directory {run.uri} already exists: pass --resume to continue it or --overwrite to "
                          f"replace it (or set run_dir=NEW_DIR)")
    return False  # --resume of a run that never started starts it, so a retried job needs no other flag


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
    }


def _loss_curve(run: RunDir, label: str, step_losses) -> Dict[str, Any]:
    """Write the per-step training losses to curves/LABEL.json; return the convergence step (SL2O §4.1)."""
    from raysub.metrics import convergence_step

    run.write_json(f"curves/{label}.json", {"train_loss": step_losses})
    return {"convergence_step": convergence_step(step_losses), "steps": len(step_losses),
            "min_train_loss": min(step_losses) if step_losses else None}


def read_summary(run: RunDir) -> Dict[str, Any]:
    return run.read_json("summary.json") if run.exists("summary.json") else {"results": {}, "timings": {}}


def _write_config(run: RunDir, cfg: Config) -> None:
    run.write_text("config.yaml", cfg.to_yaml(f"# resolved config of this run; rerun: raysub run {run.uri}/config.yaml "
                                              f"--overwrite\n"))


# ---------------------------------------------------------------------------------------------------------
# stages

def stage_sample(cfg: Config, resume: bool = False, overwrite: bool = False, say: Printer = print,
                 info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Validate, then sample the trajectory (and train the SGD baseline) into ``cfg.run_dir``."""

    from raysub.cluster import ensure_ray
    from raysub.flat import flatten_params
    from raysub.sample import run_sample

    info = info or plan(cfg)
    run = RunDir(cfg.run_dir)
    cfg.run_dir = run.uri  # workers run in other directories: pass an absolute path or URI
    resuming = prepare_run_dir(run, resume, overwrite)
    if resuming and run.exists("manifest.json"):
        manifest = run.read_json("manifest.json")
        if manifest.get("stages", {}).get("sample", {}).get("complete"):
            say(f"[sample] already complete in {run.uri}; skipping")
            return manifest
    ensure_ray(cfg)
    if overwrite and run.exists():
        run.delete()
    run.makedirs()
    manifest = run.read_json("manifest.json") if resuming and run.exists("manifest.json") else new_manifest(cfg, info)
    _write_config(run, cfg)
    if not run.exists("theta0.pt"):
        model = info["model"]
        manifest["shards"]["theta0.pt"] = run.write_torch("theta0.pt", model.state_dict())
        manifest["theta0_norm"] = float(flatten_params(model).norm())
    run.write_json("manifest.json", manifest)
    say(f"[sample] {cfg.model.name} on {cfg.data.name}: {info['num_params']:,} parameters, "
        f"{cfg.cluster.num_workers} workers, {info['num_snapshots']} snapshots over {cfg.sample.epochs} epochs, "
        f"SGD for {cfg.sgd.epochs} epochs")
    out = run_sample(cfg, run, lambda r: say(format_progress(r)))
    manifest["shards"].update(out["shards"])
    manifest["num_snapshots"] = out["num_snapshots"]
    manifest["stages"]["sample"] = {"complete": True, "wall_s": out["wall_s"], "window_s": out["window_s"],
                                    "num_snapshots": out["num_snapshots"]}
    run.write_json("manifest.json", manifest)
    summary = read_summary(run)
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
    run.write_json("summary.json", summary)
    return manifest


def _stage_config(run: RunDir, overrides: Sequence[str], stage: str) -> Config:
    """The run's config with ``overrides``, which may only touch the sections ``stage`` uses."""
    if not run.exists("config.yaml"):
        raise StorageError(f"{run.uri} is not a raysub run directory (no config.yaml): run 'raysub sample' first")
    import yaml

    base = yaml.safe_load(run.read_text("config.yaml"))
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


def stage_basis(run_uri: str, overrides: Sequence[str] = (), overwrite: bool = False, say: Printer = print,
                cfg: Optional[Config] = None) -> Dict[str, Any]:
    """Build the DLDR basis of a sampled run."""
    from raysub.basis import build_basis
    from raysub.cluster import ensure_ray

    run = RunDir(run_uri)
    cfg = cfg or _stage_config(run, overrides, "basis")
    manifest = run.read_json("manifest.json") if run.exists("manifest.json") else {}
    if not manifest.get("stages", {}).get("sample", {}).get("complete"):
        raise StorageError(f"{run.uri} has no complete trajectory: run 'raysub sample' (or --resume it) first")
    t = manifest["num_snapshots"]
    if not 0 < cfg.basis.dim < t:
        raise ConfigError(f"basis.dim={cfg.basis.dim} must be in [1, {t - 1}] for the {t} snapshots of {run.uri}: "
                          f"lower it, or sample more")
    if run.exists("basis/spectrum.json") and not overwrite:
        raise ConfigError(f"{run.path('basis')} already holds a basis: pass --overwrite to rebuild it")
    from raysub.sample import collect_trajectory

    blocks, _ = collect_trajectory(run)
    for b in blocks:
        for s in b["snapshots"]:
            if s["path"] not in manifest["shards"]:
                raise StorageError(f"snapshot {s['path']} is missing from the manifest: resample with --overwrite")
    ensure_ray(cfg)
    say(f"[basis] {len(blocks)} block actors, {t} snapshots, d={cfg.basis.dim}")
    t0 = time.perf_counter()
    record = build_basis(run, cfg.basis.dim, blocks, manifest["shards"])
    wall = time.perf_counter() - t0
    for b in record["blocks"]:
        manifest["shards"][b["path"]] = b["sha256"]
    manifest["shards"]["basis/spectrum.json"] = record["sha256"]
    manifest["stages"]["basis"] = {"complete": True, "wall_s": wall, "dim": cfg.basis.dim, **record["timings"]}
    run.write_json("manifest.json", manifest)
    _write_config(run, cfg)
    summary = read_summary(run)
    summary["dim"] = cfg.basis.dim
    summary["explained_variance_ratio"] = record["explained_variance_ratio"]
    summary["explained_variance_top_dim"] = record["explained_variance_top_dim"]
    summary["timings"]["basis_s"] = wall
    run.write_json("summary.json", summary)
    from raysub.plots import plot_explained_variance

    plot_explained_variance(run, record["explained_variance_ratio"], cfg.basis.dim)
    say(f"[basis] top {cfg.basis.dim} components explain {100 * record['explained_variance_top_dim']:.2f}% of the "
        f"trajectory variance ({wall:.1f}s)")
    return record


def stage_train(run_uri: str, overrides: Sequence[str] = (), overwrite: bool = False, resume: bool = False,
                say: Printer = print, cfg: Optional[Config] = None) -> Dict[str, Any]:
    """Train z from θ0 in the run's subspace; records ``results[train.label]`` in summary.json."""
    from raysub.cluster import ensure_ray
    from raysub.subspace import run_subspace

    run = RunDir(run_uri)
    cfg = cfg or _stage_config(run, overrides, "train")
    if cfg.train.projection == "dldr" and not run.exists("basis/spectrum.json"):
        raise StorageError(f"{run.path('basis')} has no basis: run 'raysub basis {run.uri}' first")
    if cfg.train.projection == "dldr":
        stored = run.read_json("basis/spectrum.json")["dim"]
        if cfg.train_dim > stored:
            raise ConfigError(f"train.dim={cfg.train_dim} exceeds the {stored} components of the stored basis: "
                              f"rebuild it with 'raysub basis {run.uri} basis.dim={cfg.train_dim} --overwrite'")
    summary = read_summary(run)
    label = cfg.train_label
    ckpt_name = f"train-{label}"
    if label in summary["results"] and not (overwrite or resume):
        raise ConfigError(f"{run.uri} already has results for '{label}': pass --overwrite to retrain, or set "
                          f"train.label=NAME")
    if label in summary["results"] and resume:
        say(f"[{label}] already complete; skipping")
        return summary["results"][label]
    ensure_ray(cfg)
    ckpt_dir = RunDir(run.storage_path)
    if not resume and ckpt_dir.exists(ckpt_name):
        ckpt_dir.delete(ckpt_name)  # a fresh run must not pick up an old run's checkpoints
    say(f"[{label}] {cfg.train.optimizer} in a {cfg.train_dim}-dim {cfg.train.projection} subspace, "
        f"{cfg.cluster.num_workers} workers, {cfg.train.epochs} epochs; all-reduce {cfg.train_dim} floats per step"
        + (" (+1: the loss, for the line search)" if cfg.train.optimizer == "pbfgs" else ""))
    out = run_subspace(cfg, run, lambda r: say(format_progress(r)))
    hist = out["history"]
    summary = read_summary(run)
    summary["results"][label] = {"test_acc": hist[-1]["test_acc"], "epochs": hist[-1]["epoch"],
                                 "wall_s": hist[-1]["elapsed_s"], "dim": cfg.train_dim,
                                 "optimizer": cfg.train.optimizer, "projection": cfg.train.projection,
                                 "allreduce_floats_per_step": hist[-1]["allreduce_floats_per_step"],
                                 **_loss_curve(run, label, out["step_losses"]), "history": hist}
    summary["timings"]["train_s"] = hist[-1]["elapsed_s"]
    summary["timings"][f"train_stage_s.{label}"] = out["wall_s"]
    run.write_json("summary.json", summary)
    manifest = run.read_json("manifest.json")
    manifest["stages"][f"train.{label}"] = {"complete": True, "wall_s": out["wall_s"]}
    manifest["shards"][f"train/{label}.pt"] = sha256(run.read_bytes(f"train/{label}.pt"))
    run.write_json("manifest.json", manifest)
    from raysub.plots import plot_accuracy

    plot_accuracy(run, summary)
    return summary["results"][label]


def run_pipeline(cfg: Config, resume: bool = False, overwrite: bool = False, say: Printer = print) -> Dict[str, Any]:
    """sample → basis → train, then print the results table. Returns the summary."""
    t0 = time.perf_counter()
    info = plan(cfg)
    run = RunDir(cfg.run_dir)
    cfg.run_dir = run.uri
    prepare_run_dir(run, resume, overwrite)  # fail before starting Ray
    stage_sample(cfg, resume=resume, overwrite=overwrite, say=say, info=info)
    if not (resume and run.exists("basis/spectrum.json")
            and run.read_json("basis/spectrum.json")["dim"] == cfg.basis.dim):
        stage_basis(cfg.run_dir, overwrite=True, say=say, cfg=cfg)
    stage_train(cfg.run_dir, resume=resume, overwrite=overwrite, say=say, cfg=cfg)
    summary = read_summary(run)
    summary["timings"]["total_s"] = time.perf_counter() - t0
    run.write_json("summary.json", summary)
    say(results_table(summary))
    say(f"run directory: {run.uri} (summary.json, plots/)")
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
    rows = [("method", "dim", "test acc", "epochs", "wall s")]
    for name, r in summary["results"].items():
        rows.append((name, f"{r['dim']:,}", f"{100 * r['test_acc']:.2f}%", str(r["epochs"]), f"{r['wall_s']:.1f}"))
    lines = format_table(rows)
    t = summary.get("timings", {})
    lines.append(f"timings: sample {t.get('sample_s', 0):.1f}s (snapshot window)  basis {t.get('basis_s', 0):.1f}s  "
                 f"train {t.get('train_s', 0):.1f}s" + (f"  total {t['total_s']:.1f}s" if "total_s" in t else ""))
    return "\n".join(lines)
