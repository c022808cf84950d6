"""Intrinsic-dimension sweeps on Ray Tune: projection family × dimension d × seed (Li et al., 2018).

What a trial trains, how finished trials are scored and how d_int is found (`plan_sweep`, `points`,
`intrinsic_dim`, `refinement`) live in `raysub.pipeline.sweep_plan` — pure logic, no Ray —
and are re-exported here. This module runs the search's two phases as Ray Tune experiments (the coarse grid
plus the baseline, then the refinement) and writes the results.

Trials: with ``sweep.workers_per_trial`` = 1 (default) a trial runs the subspace loop inside its Tune actor
(``cluster.cpus_per_worker`` CPUs, no Ray Train start-up per trial); with more, a trial is a Tune function
that runs a Ray Train `TorchTrainer` (DDP) — Train V2 does not accept a trainer as a Tune trainable — whose
metrics reach Tune through `TuneReportCallback`; the trial itself reserves no CPU, so the Train workers can
always be placed (no Train-inside-Tune deadlock). ``max_concurrent_trials`` is what the cluster fits.

Resume: each phase is a Tune experiment under ``RUN_DIR/tune/``; ``--resume`` restores it with
`Tuner.restore` (finished trials are kept, unfinished ones continue from their last epoch checkpoint). Ctrl-C
stops Tune gracefully, with the experiment state saved (`raysub.engine.tune_runner.fit_tuner`), then raises `KeyboardInterrupt`, which the CLI
turns into the resume command and exit status 130.

Outputs in the sweep directory: ``results.json`` (every trial, every point, d_int per family),
``trials.csv``, ``plots/accuracy_vs_dim.png``, and the table on the console.
"""
from __future__ import annotations

import io
import os
import posixpath
import re
import time
from typing import Any, Dict, List, Optional

import torch

from raysub import faults
from raysub.config import Config
from raysub.engine import cluster  # ensure_ray looked up when called: tests replace it
from raysub.engine.tune_runner import DRIVER_RESOURCES, fit_tuner
from raysub.errors import ConfigError, DivergedError, StorageError
from raysub.pipeline.train import subspace_loop
# the planning and scoring half: used below, and re-exported so `from raysub.pipeline.sweep import X` still works
from raysub.pipeline.sweep_plan import (
    BASELINE,
    Trial,
    _csv,
    intrinsic_dim,
    plan_sweep,
    points,
    refinement,
    trial_config,
)
from raysub.projections import PROJECTIONS
from raysub.report.plots import plot_sweep
from raysub.report.tables import sweep_table
from raysub.runs import layout
from raysub.runs.open import open_run
from raysub.runs.records import remove_temporaries
from raysub.storage import RunDir, join_uri
from raysub.tracking import tune_callbacks



# ---------------------------------------------------------------------------------------------------------
# cluster: how many trials run at once

def concurrency(cfg: Config) -> int:
    """Trials the cluster runs at once.

    Raises:
        ConfigError: one trial needs more CPUs or GPUs than the whole cluster has.
    """
    # heavy: ray loads here, not when this module is imported
    import ray

    total = ray.cluster_resources()
    w, c = cfg.sweep.workers_per_trial, cfg.cluster.cpus_per_worker
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    problems = []
    if w * c > cpus:
        problems.append(f"one trial needs sweep.workers_per_trial={w} × cluster.cpus_per_worker={c:g} = {w * c:g} "
                        f"CPUs but the Ray cluster has {cpus:g}: lower them or add nodes")
    if cfg.cluster.use_gpu and w > gpus:
        problems.append(f"one trial needs {w} GPUs (cluster.use_gpu=true) but the Ray cluster has {gpus:g}: lower "
                        f"sweep.workers_per_trial or set cluster.use_gpu=false")
    if problems:
        raise ConfigError(problems)
    fit = int(cpus / (w * c) + 1e-9)
    if cfg.cluster.use_gpu:
        fit = min(fit, int(gpus // w))
    return max(1, min(fit, cfg.sweep.max_concurrent or fit))


# ---------------------------------------------------------------------------------------------------------
# trials

def _trial(config: Dict[str, Any], base: Dict[str, Any], hooks: Optional[Dict[str, str]] = None) -> None:
    """The Tune function trainable: one subspace training run (``hooks``: the driver's `raysub.faults.snapshot`)."""

    spec = config["trial"]
    cfg = trial_config(base, spec["family"], spec["dim"], spec["seed"])
    loop_config = {"cfg": cfg, "progress": None, "sweep": True, "faults": hooks}
    if base["sweep"]["workers_per_trial"] == 1:
        subspace_loop({**loop_config, "session": "tune"})
        return
    # heavy: ray loads here, not when this module is imported
    from ray.tune.integration.ray_train import TuneReportCallback

    # imported per call, not at the top: tests monkeypatch these names on the module they come from
    from raysub.engine.cluster import torch_trainer

    name = f"{spec['family']}-d{spec['dim']}-s{spec['seed']}"
    storage = RunDir(base["run_dir"]).ray_storage("tune/train")
    trainer = torch_trainer(subspace_loop, loop_config, Config.from_dict(cfg), name, storage,
                            callbacks=[TuneReportCallback()])
    trainer.fit()


def prune_checkpoints(experiment: RunDir) -> int:
    """Keep each trial's latest ``checkpoint_*`` of a finished phase; returns how many were deleted."""
    deleted = 0
    for trial in experiment.listdir():
        if experiment.fs.get_file_info(experiment.path(trial)).type.name != "Directory":
            continue
        # Tune numbers them checkpoint_000000, checkpoint_000001, ...: the name orders them
        old = sorted(c for c in experiment.listdir(trial) if c.startswith("checkpoint_"))[:-1]
        for c in old:
            experiment.delete(trial, c)
        deleted += len(old)
    return deleted


def _run_phase(name: str, trials: List[Trial], cfg: Config, run: RunDir, max_concurrent: int, resume: bool,
               say) -> List[Dict[str, Any]]:
    """Run ``trials`` as the Tune experiment ``tune/NAME`` (restored when resuming); one row per trial."""
    # heavy: ray loads here, not when this module is imported
    from ray import tune


    storage, fs = run.ray_storage("tune")  # the filesystem object, so a URI's endpoint reaches Tune
    path = posixpath.join(storage, name)
    base = cfg.to_dict()
    trainable = tune.with_parameters(_trial, base=base, hooks=faults.snapshot())  # the tests' hooks (raysub.faults)
    if cfg.sweep.workers_per_trial == 1:
        res = {"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if cfg.cluster.use_gpu else {})}
    else:
        res = DRIVER_RESOURCES  # the Train workers reserve the CPUs/GPUs
    trainable = tune.with_resources(trainable, res)
    if resume and tune.Tuner.can_restore(path, storage_filesystem=fs):
        say(f"[sweep] {name}: restoring {join_uri(run.uri, 'tune', name)}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        scheduler = None
        if cfg.sweep.asha:
            # heavy: ray loads here, not when this module is imported
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(max_t=cfg.train.epochs, time_attr="epoch",
                                      grace_period=min(cfg.sweep.grace_period, cfg.train.epochs))
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([{"family": f, "dim": d, "seed": s} for f, d, s in trials])},
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", max_concurrent_trials=max_concurrent,
                                        scheduler=scheduler, trial_dirname_creator=_dirname,
                                        trial_name_creator=_dirname),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, storage_filesystem=fs, verbose=1,  # Tune's status table, not every result
                # every checkpoint while the phase runs: Tune saves its experiment state every few seconds, and with
                # num_to_keep=1 a driver killed between two saves left a state naming a checkpoint Tune had already
                # deleted — `--resume` then failed ("does not exist on storage anymore"). Pruned when it ends.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                failure_config=tune.FailureConfig(max_failures=cfg.cluster.max_failures),
                callbacks=tune_callbacks(cfg, run, f"sweep/{name}"),  # MLflow when asked (raysub.tracking)
            ),
        )
    say(f"[sweep] {name}: {len(trials)} trials, {max_concurrent} at a time")
    grid = fit_tuner(tuner)
    prune_checkpoints(run.child("tune", name))
    rows = []
    for result in grid:
        row = {"phase": name, **trial_spec(result)}
        df = result.metrics_dataframe
        if result.error is not None or df is None or "val_acc" not in df or df["val_acc"].isna().all():
            row["error"] = str(result.error).strip().splitlines()[-1] if result.error else "no epochs reported"
            rows.append(row)
            continue
        if "diverged" in df and (df["diverged"] == 1).any():  # its last row: scored 0, see subspace_loop
            epoch = int(df["epoch"].iloc[-1])
            row.update(val_acc=0.0, test_acc=0.0, diverged=epoch, epochs_run=epoch - 1, final_val_acc=0.0,
                       train_s=float(df["elapsed_s"].max()))
            rows.append(row)
            continue
        best = df.loc[df["val_acc"].idxmax()]
        row.update(val_acc=float(best["val_acc"]), test_acc=float(best["test_acc"]), best_epoch=int(best["epoch"]),
                   epochs_run=int(df["epoch"].max()), final_val_acc=float(df["val_acc"].iloc[-1]),
                   train_s=float(df["elapsed_s"].max()))
        rows.append(row)
    unfinished = [r for r in rows if "error" in r or (not cfg.sweep.asha and "diverged" not in r
                                                       and r["epochs_run"] < cfg.train.epochs)]
    if unfinished:
        first = unfinished[0]
        why = first.get("error") or f"stopped at epoch {first['epochs_run']} of {cfg.train.epochs}"
        raise ConfigError(f"{len(unfinished)} of {len(rows)} trials of the {name} phase did not finish (first: "
                          f"{first['family']} d={first['dim']} seed {first['seed']}: {why}); fix the cause and "
                          f"continue with: raysub sweep {run.arg(layout.CONFIG)} --resume")
    return rows


def _dirname(trial) -> str:
    spec = trial.config["trial"]
    return f"{spec['family']}-d{spec['dim']}-s{spec['seed']}-{trial.trial_id}"


def trial_spec(result) -> Dict[str, Any]:
    """A Tune result's {"family", "dim", "seed"}: from its config, or — for a trial that never reported, whose
    result has no config — from the directory name `_dirname` gave it."""
    if result.config is not None:
        spec = result.config["trial"]
        return {"family": spec["family"], "dim": spec["dim"], "seed": spec["seed"]}
    m = re.fullmatch(r"(?P<family>.+)-d(?P<dim>\d+)-s(?P<seed>-?\d+)-[^-/]+", os.path.basename(result.path.rstrip("/")))
    assert m is not None, result.path  # every trial directory is named by _dirname
    return {"family": m["family"], "dim": int(m["dim"]), "seed": int(m["seed"])}


# ---------------------------------------------------------------------------------------------------------
# driver

def run_sweep(cfg: Config, resume: bool = False, overwrite: bool = False, say=print) -> Dict[str, Any]:
    """Plan, then run the coarse and refinement phases on Ray Tune under the sweep directory's lock; write and
    print the results."""
    info = plan_sweep(cfg)

    def start_ray() -> None:  # one worker's probe: each trial asks for its own resources
        probe = Config.from_dict({**cfg.to_dict(), "cluster": {**cfg.to_dict()["cluster"], "num_workers": 1}})
        cluster.ensure_ray(probe, grow=False)

    # trials run in Tune's own working directories: train.basis_run and init_from as absolute paths or URIs; no θ0
    # of the run's own (the sweep writes the basis run's, or the seeded model's, with its own manifest)
    with open_run(cfg, resume=resume, overwrite=overwrite, say=say, uris=("basis_run", "init_from"),
                  start_ray=start_ray) as opened:
        return _sweep(cfg, info, opened.run, opened.resuming, say)


def _sweep_theta0(cfg: Config, info: Dict[str, Any]):
    """The bytes of the sweep's θ0: the basis run's ``theta0.pt`` when a family reads one (every family starts
    where the trajectory basis was sampled; verified against that run's manifest), else the seeded model's."""



    if any(PROJECTIONS.meta(f).get("needs_basis_run") for f in cfg.sweep.families):
        source = RunDir(cfg.train.basis_run)
        checksum = source.manifest_checksum(layout.THETA0)
        if checksum is None:
            raise StorageError(f"{source.path(layout.THETA0)} has no checksum in {source.path(layout.MANIFEST)} "
                               f"(train.basis_run): rerun that run with --overwrite, or pick another basis run")
        return source.read_bytes(layout.THETA0, checksum)
    bio = io.BytesIO()
    torch.save(info["model"].state_dict(), bio)
    return bio.getvalue()


def _write_theta0(run: RunDir, theta0, num_params: int) -> None:
    """Write the sweep's θ0 (its bytes) and the manifest that records its sha256."""
    checksum = run.write_bytes(layout.THETA0, theta0)
    run.write_json(layout.MANIFEST, {"kind": "sweep", "num_params": num_params, "stages": {},
                                     "shards": {layout.THETA0: checksum}})


def _sweep(cfg: Config, info: Dict[str, Any], run: RunDir, resuming: bool, say) -> Dict[str, Any]:

    max_concurrent = concurrency(cfg)  # raises before anything is written
    own = resuming and run.exists(layout.MANIFEST)
    # read (and verified) before anything is written: a resumed sweep goes on from its own θ0
    theta0 = run.read_theta0() if own else _sweep_theta0(cfg, info)
    t0 = time.perf_counter()
    if not resuming:
        run.clear()
    else:
        remove_temporaries(run)  # what writes killed in the interrupted sweep left
    run.makedirs()
    # run_dir is where this file is, the directory its rerun line names (a moved sweep's is rewritten)
    run.write_text(layout.CONFIG, cfg.to_yaml(f"# resolved config of this sweep; rerun: raysub sweep "
                                              f"{run.arg(layout.CONFIG)} --overwrite\n"))
    if not own:
        _write_theta0(run, theta0, info["num_params"])
    n, seeds = info["num_params"], cfg.sweep.seeds
    say(f"[sweep] {cfg.model.name} on {cfg.data.name}: {n:,} parameters; families {', '.join(cfg.sweep.families)}; "
        f"seeds {seeds}; {cfg.train.epochs} epochs per trial; validation {cfg.data.val_fraction:.0%} of train")
    coarse: List[Trial] = [] if cfg.sweep.baseline is not None else [(BASELINE, n, s) for s in seeds]
    coarse += [(f, d, s) for f, dims in info["grid"].items() for d in sorted(set(dims)) for s in seeds]
    rows = _run_phase("coarse", coarse, cfg, run, max_concurrent, resuming, say)

    base_rows = [r for r in rows if r["family"] == BASELINE and "diverged" not in r]  # _run_phase: none failed
    if cfg.sweep.baseline is not None:
        baseline = {"val_acc": cfg.sweep.baseline, "given": True, "trials": 0}
    elif not base_rows:
        first = next(r for r in rows if r["family"] == BASELINE)
        raise DivergedError(f"every full-training baseline trial diverged (first: seed {first['seed']} at epoch "
                            f"{first['diverged']}): lower sgd.lr (now {cfg.sgd.lr:g}) and rerun with --overwrite")
    else:
        baseline = {"val_acc": sum(r["val_acc"] for r in base_rows) / len(base_rows),
                    "test_acc": sum(r["test_acc"] for r in base_rows) / len(base_rows),
                    "trials": len(base_rows), "train_s": sum(r["train_s"] for r in base_rows), "given": False}
    target = cfg.sweep.threshold * baseline["val_acc"]
    pts = points([r for r in rows if r["family"] != BASELINE])
    extra = [(f, d, s) for f in cfg.sweep.families for d in refinement(pts, f, target, cfg.sweep.refine)
             for s in seeds]
    if extra:
        rows += _run_phase("refine", extra, cfg, run, max_concurrent, resuming, say)
        pts = points([r for r in rows if r["family"] != BASELINE])

    families = {}
    for f in cfg.sweep.families:
        hit = intrinsic_dim(pts, f, target)
        mine = [r for r in rows if r["family"] == f]
        families[f] = {"d_int": hit["dim"] if hit else None, "val_acc": hit["val_acc"] if hit else None,
                       "test_acc": hit["test_acc"] if hit else None, "trials": len(mine),
                       "diverged": sum(1 for r in mine if "diverged" in r),
                       "train_s": sum(r.get("train_s", 0.0) for r in mine),
                       "max_dim": max(p["dim"] for p in pts if p["family"] == f) if any(
                           p["family"] == f for p in pts) else max(info["grid"][f])}
    summary = {"dataset": cfg.data.name, "model": cfg.model.name, "num_params": n, "seeds": seeds,
               "threshold": cfg.sweep.threshold, "baseline": baseline, "target": target, "families": families,
               "points": pts, "trials": rows, "max_concurrent": max_concurrent,
               "wall_s": time.perf_counter() - t0}
    run.write_json(layout.SWEEP_RESULTS, summary)
    run.write_text(layout.SWEEP_TRIALS, _csv(rows))
    plot_sweep(run, pts, baseline["val_acc"], target, cfg.sweep.threshold,
               title=f"intrinsic dimension: {cfg.model.name} ({n:,} parameters) on {cfg.data.name}")
    say(sweep_table(summary))
    say(f"sweep directory: {run.uri} (results.json, trials.csv, plots/accuracy_vs_dim.png)")
    return summary
