"""The DLDR pipeline and its stages, driver side: plan (validate everything), sample, basis, train, report.

Nothing is written before every check has passed: config problems, dataset paths, model options, the
snapshot count against ``basis.dim``, the run directory's state (``--resume`` / ``--overwrite``) and, on
``--resume``, that the config is the run's own. Every command holds the run directory's lock (`raysub.lock`).

Each stage writes its files first — a basis into a new ``basis/GEN/`` directory — and then commits them in the
run's manifest (`raysub.runs.records`), so a kill at any point leaves the old state or the new one.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from raysub.config import Config, merge, parse_overrides
from raysub.engine import cluster  # ensure_ray looked up when called: tests replace it
from raysub.errors import ConfigError, DivergedError, RaysubError, StorageError
from raysub.lock import RunLocked
from raysub.metrics import convergence_step
from raysub.pipeline.basis import basis_dir, build_basis
from raysub.pipeline.plan import (check, check_foreign_basis_theta0, check_train_projection, describe_params, plan,
                                  sharding_plan, subspace_run_checks)
from raysub.pipeline.stream_gram import read_streamed_gram
from raysub.report.plots import plot_accuracy, plot_explained_variance, plot_stop_signal
from raysub.report.tables import format_progress, results_table
from raysub.runs import layout
from raysub.runs.manifest import Manifest
from raysub.runs.open import open_run
from raysub.runs.records import (STAGE_CHECKED, commit, config_diff, diff_text, existing_run, open_manifest,
                                 stored_config)
from raysub.storage import RunDir

Printer = Callable[[str], None]

STAGE_SECTIONS = {"basis": ("basis", "cluster"), "train": ("train", "cluster")}


def _loss_curve(run: RunDir, label: str, step_losses) -> Dict[str, Any]:
    """Write the per-step training losses to curves/LABEL.json; return the convergence step (SL2O §4.1)."""
    run.write_json(layout.curve(label), {"train_loss": step_losses})
    return {"convergence_step": convergence_step(step_losses), "steps": len(step_losses),
            "min_train_loss": min(step_losses) if step_losses else None}

# ---------------------------------------------------------------------------------------------------------
# stages
def stage_sample(cfg: Config, resume: bool = False, overwrite: bool = False, say: Printer = print,
                 info: Optional[Dict[str, Any]] = None) -> Manifest:
    """Validate, then sample the trajectory (and train the SGD baseline) into ``cfg.run_dir``; returns the
    committed manifest."""

    # heavy: torch (imported by raysub.pipeline.sample) loads here, not when this module is imported
    from raysub.pipeline.sample import run_sample

    info = info or plan(cfg)

    def sampled(manifest: Manifest) -> bool:  # a resumed run whose sampling is complete: nothing to do
        return bool(manifest.stages.get("sample", {}).get("complete"))

    with open_run(cfg, resume=resume, overwrite=overwrite, say=say, also_safe=STAGE_CHECKED, info=info,
                  start_ray=lambda: cluster.ensure_ray(cfg), done=sampled) as opened:
        run, manifest = opened.run, opened.manifest
        if opened.done:
            say(f"[sample] already complete in {run.uri}; skipping")
            return manifest
        say(f"[sample] {cfg.model.name} on {cfg.data.name}: {describe_params(cfg, info)}, "
            f"{workers_text(cfg)}, {info['num_snapshots']} snapshots over {cfg.sample.epochs} epochs, "
            f"SGD for {cfg.sgd.epochs} epochs")
        out = run_sample(cfg, run, lambda r: say(format_progress(r)), num_params=info["num_params"],
                         num_snaps=info["num_snapshots"], basis_prefix=layout.new_basis_prefix())
        manifest.shards.update(out["shards"])
        manifest.num_snapshots = out["num_snapshots"]
        manifest.stages["sample"] = {"complete": True, "wall_s": out["wall_s"], "window_s": out["window_s"],
                                     "window_epochs": out["window_epochs"], "stop": cfg.sample.stop,
                                     "num_snapshots": out["num_snapshots"], "stream_gram": out["stream_gram"],
                                     "stream_gram_off": out["stream_off"], "stop_signal": out["signals"]}
        summary = manifest.summary
        hist = out["history"]
        window = [h for h in hist if h["epoch"] == out["window_epochs"]][0]
        if out["signals"]:
            plot_stop_signal(run, out["signals"], cfg.sample.stop_threshold if cfg.sample.stop == "adaptive" else None)
        if cfg.sample.stop == "adaptive":
            say(f"[sample] adaptive window ended after {out['window_epochs']} of at most {cfg.sample.epochs} epochs "
                f"({out['num_snapshots']} snapshots)")
        summary.update({"dataset": cfg.data.name, "model": cfg.model.name, "num_params": info["num_params"],
                        "num_snapshots": out["num_snapshots"], "world_size": cfg.ranks})
        summary["results"]["sgd"] = {"test_acc": hist[-1]["test_acc"], "epochs": hist[-1]["epoch"],
                                     "wall_s": hist[-1]["elapsed_s"], "dim": info["num_params"],
                                     **_loss_curve(run, "sgd", out["step_losses"]), "history": hist}
        summary["results"]["sgd@sample"] = {"test_acc": window["test_acc"], "epochs": window["epoch"],
                                            "wall_s": out["window_s"], "dim": info["num_params"]}
        summary["timings"]["sample_s"] = out["window_s"]
        summary["timings"]["sample_stage_s"] = out["wall_s"]
        commit(run, manifest)
        if out["basis"] is not None:  # the ranks wrote the basis at the window's end
            gen, record = out["basis"]
            say(f"[basis] written by the {cfg.ranks} sampling ranks at the window's end (no read of the "
                f"trajectory)")
            _commit_basis(run, manifest, cfg, gen, record, record["timings"]["total_s"], say)
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
    if cfg.train.init_from != base.get("train", {}).get("init_from"):
        raise ConfigError(f"train.init_from sets a run's θ0, and {run.uri} already has its own "
                          f"({base.get('train', {}).get('init_from') or 'seeded'}): start a new run to train from "
                          f"other weights")
    cfg.run_dir = run.uri
    check(cfg, check_data=(stage == "train"))
    return cfg


def stage_basis(run_uri: str, overrides: Sequence[str] = (), overwrite: bool = False, say: Printer = print,
                cfg: Optional[Config] = None) -> Dict[str, Any]:
    """Build the DLDR basis of a sampled run into a new ``basis/GEN/`` and commit it (the previous basis stays in
    force until the commit, and is deleted after it)."""
    # heavy: torch (imported by raysub.pipeline.sample) loads here, not when this module is imported
    from raysub.pipeline.sample import collect_trajectory

    run = existing_run(RunDir(run_uri))
    cfg = cfg or _stage_config(run, overrides, "basis")
    found: Dict[str, Any] = {}

    def checks(run: RunDir, manifest: Manifest) -> None:
        if not manifest.stages.get("sample", {}).get("complete"):
            raise StorageError(f"{run.uri} has no complete trajectory: run 'raysub sample' (or --resume it) first")
        t = manifest.num_snapshots
        if not 0 < cfg.basis.dim < t:
            raise ConfigError(f"basis.dim={cfg.basis.dim} must be in [1, {t - 1}] for the {t} snapshots of "
                              f"{run.uri}: lower it, or sample more")
        committed = basis_dir(run)
        if committed is not None and not overwrite:
            if not run.exists(committed):  # e.g. deleted by hand: the manifest still commits it
                raise ConfigError(f"{run.path(committed)}, the basis the manifest commits, is missing: pass "
                                  f"--overwrite to rebuild it")
            raise ConfigError(f"{run.path(committed)} already holds a basis: pass --overwrite to rebuild it")
        # the blocks the manifest lists, every one present, before anything is written or dropped
        found["blocks"], _ = collect_trajectory(run, manifest.shards, manifest.blocks)
        found["streamed"] = read_streamed_gram(run, manifest) if cfg.basis.gram == "auto" else None

    with open_run(cfg, existing=run, say=say, checks=checks, start_ray=lambda: cluster.ensure_ray(cfg)) as opened:
        run, manifest = opened.run, opened.manifest
        blocks, streamed, t = found["blocks"], found["streamed"], manifest.num_snapshots
        how = "the sampler's streamed Gram, one read" if streamed is not None else "a Gram pass and a write pass"
        say(f"[basis] {len(blocks)} block actors, {t} snapshots, d={cfg.basis.dim}: {how}")
        t0 = time.perf_counter()
        gen = layout.new_basis_prefix()
        record = build_basis(run, cfg.basis.dim, blocks, manifest.shards, prefix=gen, streamed_gram=streamed)
        wall = time.perf_counter() - t0
        _commit_basis(run, manifest, cfg, gen, record, wall, say)
        return record


def _commit_basis(run: RunDir, manifest: Manifest, cfg: Config, gen: str, record: Dict[str, Any],
                  wall: float, say: Printer) -> None:
    """Commit the basis written into ``gen`` (its spectrum ``record``) as the run's basis stage; then delete the
    other generations and the trainings done in the previous basis, and plot the explained variance."""
    manifest.shards = {k: v for k, v in manifest.shards.items() if not k.startswith(layout.BASIS + "/")}
    for b in record["blocks"]:
        manifest.shards[b["path"]] = b["sha256"]
    manifest.shards[layout.spectrum(gen)] = record["sha256"]
    manifest.stages["basis"] = {"complete": True, "dir": gen, "wall_s": wall, "dim": cfg.basis.dim,
                                   "gram_source": record["gram_source"], **record["timings"]}
    stale = _drop_own_basis_trainings(manifest)
    manifest.config = cfg.to_dict()
    summary = manifest.summary
    summary["dim"] = cfg.basis.dim
    summary["explained_variance_ratio"] = record["explained_variance_ratio"]
    summary["explained_variance_top_dim"] = record["explained_variance_top_dim"]
    summary["timings"]["basis_s"] = wall
    commit(run, manifest)
    for name in run.listdir(layout.BASIS):  # earlier generations (and a killed rebuild's) are no longer referenced
        if f"{layout.BASIS}/{name}" != gen:
            run.delete(layout.BASIS, name)
    for label in stale:
        run.child(layout.CHECKPOINTS).delete(layout.train_checkpoint(label))
    if stale:
        say(f"[basis] dropped the results of {', '.join(stale)}: trained in the previous basis (retrain them)")
    plot_explained_variance(run, record["explained_variance_ratio"], cfg.basis.dim)
    say(f"[basis] top {cfg.basis.dim} components explain {100 * record['explained_variance_top_dim']:.2f}% of "
        f"the trajectory variance ({record['gram_source']} Gram, {wall:.1f}s)")


def _drop_own_basis_trainings(manifest: Manifest) -> List[str]:
    """Remove from ``manifest`` every training in the run's own basis (a new basis makes them another model's);
    returns their labels."""
    # heavy: torch (imported by raysub.projections) loads here, not when this module is imported
    from raysub.projections import PROJECTIONS

    labels = []
    for key, stage in list(manifest.stages.items()):
        train = stage.get("train") if key.startswith("train.") else None
        if train and not train.get("basis_run") and PROJECTIONS.meta(train["projection"]).get("needs_basis_run"):
            label = key[len("train."):]
            labels.append(label)
            del manifest.stages[key]
            manifest.summary["results"].pop(label, None)
            manifest.shards.pop(layout.train_z(label), None)
    return labels


def _size(nbytes: float) -> str:
    """Bytes as GB (two decimals) from 1 GB up, else MB."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def workers_text(cfg: Config) -> str:
    """``2 workers``, or Ray Train's local mode (``cluster.num_workers=0``) said as such."""
    if not cfg.local_mode:
        return f"{cfg.cluster.num_workers} workers"
    # Ray Train runs no callbacks in local mode: TensorBoard/MLflow stay silent, and that is said here
    tracked = cfg.tracking.tensorboard or cfg.tracking.mlflow
    return "local mode (one rank in this process" + (", not tracked)" if tracked else ")")


def stage_train(run_uri: str, overrides: Sequence[str] = (), overwrite: bool = False, resume: bool = False,
                say: Printer = print, cfg: Optional[Config] = None) -> Dict[str, Any]:
    """Train z from θ0 in the run's subspace; commits ``results[train.label]`` (and the stage) in the manifest.

    Raises:
        DivergedError: the training diverged; its result is recorded as diverged (no accuracy, no z saved).
    """
    # heavy: torch (imported by raysub.engine.task, raysub.pipeline.train) loads here, not when this module is
    # imported; and run_subspace is looked up when called: tests replace it
    from raysub.engine.task import subspace_dim
    from raysub.pipeline.train import divergence_line, read_trained, run_subspace

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: pick one")
    run = existing_run(RunDir(run_uri))
    cfg = cfg or _stage_config(run, overrides, "train")
    label = cfg.train_label
    stage_key = f"train.{label}"
    found: Dict[str, Any] = {}

    def checks(run: RunDir, manifest: Manifest) -> None:
        num_params = manifest.num_params
        check_train_projection(cfg, num_params, run)
        check_foreign_basis_theta0(cfg, run)
        found["dim"] = subspace_dim(cfg, num_params)
        stage = manifest.stages.get(stage_key, {})
        results = manifest.summary["results"]
        if stage.get("complete") or label in results:
            if not (overwrite or resume):
                raise ConfigError(f"{run.uri} already has results for '{label}': pass --overwrite to retrain, or "
                                  f"set train.label=NAME")
            if resume:
                _check_train_resume(run, cfg, stage)
                if results.get(label, {}).get("diverged"):
                    raise DivergedError(divergence_line(cfg, results[label]["diverged"]))
                read_trained(run, label)  # "complete" only while its z is the one committed
                return
        if stage and not (resume or overwrite):
            raise ConfigError(f"'{label}' was interrupted in {run.uri}: pass --resume to continue it or --overwrite "
                              f"to restart it, or set train.label=NAME")
        if resume and stage:
            _check_train_resume(run, cfg, stage)

    def complete(manifest: Manifest) -> bool:  # resumed, and its result is committed (checked above): skip
        return resume and bool(manifest.stages.get(stage_key, {}).get("complete")
                               or label in manifest.summary["results"])

    with open_run(cfg, existing=run, say=say, checks=checks, done=complete,
                  start_ray=lambda: cluster.ensure_ray(cfg)) as opened:
        run, manifest, dim = opened.run, opened.manifest, found["dim"]
        results = manifest.summary["results"]
        if opened.done:
            say(f"[{label}] already complete; skipping")
            return results[label]
        stage = manifest.stages.get(stage_key, {})
        ckpt_dir = run.child(layout.CHECKPOINTS)
        ckpt_name = layout.train_checkpoint(label)
        resumed = resume and bool(stage)
        if not resumed:  # a fresh training must not pick up an old one's checkpoints or result
            if ckpt_dir.exists(ckpt_name):
                ckpt_dir.delete(ckpt_name)
            results.pop(label, None)
            manifest.shards.pop(layout.train_z(label), None)
            manifest.stages[stage_key] = {"complete": False, "train": cfg.to_dict()["train"]}
            commit(run, manifest)
        shard = sharding_plan(cfg, manifest.num_params, dim, cluster.node_count())
        say(f"[{label}] {cfg.train.optimizer} in a {dim:,}-dim {cfg.train.projection} subspace, "
            f"{workers_text(cfg)}, {cfg.train.epochs} epochs"
            + (f"; all-reduce {dim + 1:,} floats per step (z's gradient and the loss; an optimizer's same-batch "
               f"re-evaluations add theirs)" if cfg.ranks > 1 else "")
            + (f"; P {shard['mode']}" + (" (auto)" if shard["requested"] == "auto" else "")
               + f": {_size(shard['per_worker'])} per worker of {_size(shard['p_bytes'])}, budget "
               f"{_size(shard['budget'])}" if shard["p_bytes"] else ""))
        try:
            out = run_subspace(cfg, run, lambda r: say(format_progress(r)), shard["mode"])
        except RaysubError as exc:
            # a bad input (or storage, divergence) found by the workers: nothing of this new training is kept (a lost lock: nothing touched)
            if not resumed and not isinstance(exc, RunLocked):
                if ckpt_dir.exists(ckpt_name):
                    ckpt_dir.delete(ckpt_name)
                manifest.stages.pop(stage_key, None)
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
            # where P lived (the workers' own account) next to what the plan chose
            record.update({k: hist[-1][k] for k in ("projection_sharding", "p_bytes_per_worker",
                                                    "group_floats_per_step") if k in hist[-1]},
                          projection_budget=shard["budget"], projection_sharding_requested=shard["requested"])
            trained = out.get("written", {}).get(layout.train_z(label))  # rank 0's digest of its write, not a re-read
            if trained is None:
                raise StorageError(f"the training reported no checksum for {run.path(layout.train_z(label))}: retrain "
                                   f"'{label}' with --overwrite")
            manifest.shards[layout.train_z(label)] = trained
        summary = manifest.summary
        summary["results"][label] = record
        summary["timings"]["train_s"] = record["wall_s"]
        summary["timings"][f"train_stage_s.{label}"] = out["wall_s"]
        manifest.stages[stage_key] = {"complete": True, "wall_s": out["wall_s"], "train": cfg.to_dict()["train"],
                                         **({"diverged": True} if out.get("diverged") else {})}
        commit(run, manifest)
        plot_accuracy(run, summary)
        if out.get("diverged"):
            raise DivergedError(divergence_line(cfg, out["diverged"]))
        return record


def _check_train_resume(run: RunDir, cfg: Config, stage: Dict[str, Any]) -> None:
    """A resumed training must be the one that started (its ``train`` section); ``cluster.*`` may change."""
    if "train" not in stage:
        return
    # where P lives changes no result (z and the optimizer state are replicated): a resume may change it
    free = ("projection_sharding", "projection_budget_gb", "projection_groups")
    diffs = config_diff({"train": {k: v for k, v in stage["train"].items() if k not in free}},
                        {"train": {k: v for k, v in cfg.to_dict()["train"].items() if k not in free}})
    if diffs:
        raise ConfigError(f"--resume: '{cfg.train_label}' was started with other settings: {diff_text(diffs)}; "
                          f"resuming would mix two trainings: resume with the same train.* settings, retrain with "
                          f"--overwrite, or set train.label=NAME")


def train_from_config(cfg: Config, resume: bool = False, overwrite: bool = False, say: Printer = print
                      ) -> Dict[str, Any]:
    """A subspace training that needs no sampled trajectory (a random or full-parameter family, or a basis
    from ``train.basis_run``): create the run directory (θ0, config, manifest), then `stage_train`."""
    with new_subspace_run(cfg, plan(cfg), resume, overwrite, STAGE_CHECKED, say) as (run, resuming, _):
        return stage_train(run.uri, resume=resuming, overwrite=overwrite, say=say, cfg=cfg)


@contextlib.contextmanager
def new_subspace_run(cfg: Config, info: Dict[str, Any], resume: bool, overwrite: bool, resume_safe: Sequence[str],
                     say: Printer = print):
    """Open a run directory whose training reads no trajectory of its own (``raysub train CONFIG``; ``raysub l2o
    meta-train`` opens its run the same way) with `open_run`: run_dir, train.basis_run and init_from as URIs,
    resume/overwrite against the stored config (``resume_safe``: the keys that may change), the training's checks
    before Ray starts (`subspace_run_checks`), Ray, then θ0 — the basis run's for a family reading a basis
    (``info["model"]`` is loaded with it), else the seeded model's — the config and the manifest.

    Yields:
        (the RunDir, whether this resumes, the manifest of `init_run`).
    """
    with open_run(cfg, resume=resume, overwrite=overwrite, say=say, also_safe=resume_safe, info=info,
                  uris=("basis_run", "init_from"), checks=subspace_run_checks(cfg, info),
                  start_ray=lambda: cluster.ensure_ray(cfg),
                  announce=lambda: f"{cfg.model.name} on {cfg.data.name}: {describe_params(cfg, info)}") as opened:
        yield opened.run, opened.resuming, opened.manifest


def run_pipeline(cfg: Config, resume: bool = False, overwrite: bool = False, say: Printer = print) -> Dict[str, Any]:
    """sample → basis → train, then print the results table. Returns the summary.

    Raises:
        DivergedError: sampling or the subspace training diverged (the table is printed first for the latter).
    """
    t0 = time.perf_counter()
    info = plan(cfg)
    # the checks only (fail before starting Ray); each stage opens the run again under this lock
    with open_run(cfg, resume=resume, overwrite=overwrite, say=say, also_safe=STAGE_CHECKED) as opened:
        run = opened.run
        stage_sample(cfg, resume=resume, overwrite=overwrite, say=say, info=info)
        basis = open_manifest(run).stages.get("basis", {})
        by_sampler = basis.get("gram_source") == "sampler"
        if not ((resume or by_sampler) and basis.get("complete") and basis.get("dim") == cfg.basis.dim):
            stage_basis(cfg.run_dir, overwrite=True, say=say, cfg=cfg)
        diverged = None
        try:
            stage_train(cfg.run_dir, resume=resume, overwrite=overwrite, say=say, cfg=cfg)
        except DivergedError as exc:
            diverged = exc
        manifest = open_manifest(run)
        manifest.summary["timings"]["total_s"] = time.perf_counter() - t0
        commit(run, manifest)
        summary = manifest.summary
        say(results_table(summary))
        say(f"run directory: {run.uri} (summary.json, plots/)")
        if diverged is not None:
            raise diverged
        return summary
