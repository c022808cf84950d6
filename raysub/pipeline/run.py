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

from raysub.config import Config, merge, parse_overrides
from raysub.pipeline.plan import check, plan
from raysub.errors import ConfigError, StorageError
from raysub.storage import RunDir, block_bounds, sha256

Printer = Callable[[str], None]

STAGE_SECTIONS = {"basis": ("basis", "cluster"), "train": ("train", "cluster")}


# ---------------------------------------------------------------------------------------------------------
# the run directory

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

def init_run(cfg: Config, info: Dict[str, Any], resuming: bool, overwrite: bool) -> Dict[str, Any]:
    """Create (or reopen, when ``resuming``) the run directory: config.yaml, the seeded ``theta0.pt`` with its
    sha256, the manifest. Returns the manifest. Call after `plan` and `prepare_run_dir`."""
    from raysub.engine.flat import flatten_params

    run = RunDir(cfg.run_dir)
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
    return manifest


def stage_sample(cfg: Config, resume: bool = False, overwrite: bool = False, say: Printer = print,
                 info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Validate, then sample the trajectory (and train the SGD baseline) into ``cfg.run_dir``."""

    from raysub.engine.cluster import ensure_ray
    from raysub.pipeline.sample import run_sample

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
    manifest = init_run(cfg, info, resuming, overwrite)
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
    from raysub.pipeline.basis import build_basis
    from raysub.engine.cluster import ensure_ray

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
    from raysub.pipeline.sample import collect_trajectory

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
    """Train z from θ0 in the run's subspace; records ``results[train.label]`` in summary.json."""
    from raysub.engine.cluster import ensure_ray
    from raysub.pipeline.train import run_subspace

    run = RunDir(run_uri)
    cfg = cfg or _stage_config(run, overrides, "train")
    from raysub.engine.task import subspace_dim

    num_params = run.read_json("manifest.json")["num_params"]
    check_train_projection(cfg, num_params, run)
    dim = subspace_dim(cfg, num_params)
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
    say(f"[{label}] {cfg.train.optimizer} in a {dim:,}-dim {cfg.train.projection} subspace, "
        f"{cfg.cluster.num_workers} workers, {cfg.train.epochs} epochs"
        + (f"; all-reduce {dim + 1:,} floats per step (z's gradient and the loss)"
           if cfg.cluster.num_workers > 1 else ""))
    out = run_subspace(cfg, run, lambda r: say(format_progress(r)))
    hist = out["history"]
    summary = read_summary(run)
    summary["results"][label] = {"test_acc": hist[-1]["test_acc"], "epochs": hist[-1]["epoch"],
                                 "wall_s": hist[-1]["elapsed_s"], "dim": dim,
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
    resuming = prepare_run_dir(run, resume, overwrite)
    # before Ray starts; a new run has no basis of its own, so a family that reads one needs train.basis_run
    check_train_projection(cfg, info["num_params"], run, own_basis=False)
    ensure_ray(cfg)
    init_run(cfg, info, resuming, overwrite)
    return stage_train(run.uri, resume=resuming, overwrite=overwrite, say=say, cfg=cfg)


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
