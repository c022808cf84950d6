"""Meta-testing of a learned optimizer φ against tuned baselines, in one process (``jobs/l2o_meta_test.py``).

The protocol (`meta_test`):

- **Task**: the config's ``train`` section (`build_task`: model, θ0, projection, data; batch
  ``train.batch_size``). θ0 is the basis run's ``theta0.pt`` when ``train.basis_run`` is set (the θ0 a DLDR basis
  was computed around), else ``cfg.run_dir``'s, else the model seeded with ``cfg.seed``. Every optimizer runs on
  this one task: same basis, same θ0.
- **Optimizees**: a data-order seed and z0 ~ N(0, σ²) drawn from it, exactly as meta-training's (`Optimizee`):
  seed = ``l2o.seed`` · stride + serial. Meta-test serials start at `METATEST_SERIAL` (never meta-trained on, never
  meta-validated on); learning rates are picked on the meta-validation serials (`VALIDATION_SERIAL` + j, the
  optimizees φ itself was selected on).
- **A run** (`run_optimizee`): the per-step semantics of a 1-worker ``raysub train`` — `train_step` on the
  batches of `epoch_batches` for the optimizee's seed, the optimizer built by `build_optimizer` from the registry
  (``l2o`` with ``weights``, or a baseline at lr) behind the one protocol ``opt.step(z, g, loss, closure)`` —
  at a constant lr (no schedule: φ was meta-trained at a constant one, and so the baselines are tuned).
- **Learning rates** (`pick_lr`): each baseline's lr is the grid point with the best mean validation accuracy
  after N steps on the validation optimizees (ties: lower mean final training loss); test is never read.
- **Meta-test runs**: every optimizer on the meta-test optimizees for max(horizons)·N steps, evaluated on val and
  test at every horizon h·N; "accuracy after the full run" is the one at the last step.
- **Metrics**: SL2O §4.1's convergence step (`raysub.metrics.convergence_step`) over the full run, and VeLO's
  speedup (`speedup`) of φ over Momentum† at each horizon, per optimizee, then mean ± std over optimizees.

The curve metrics (`smoothed`, a trailing mean of the last 20 losses, `steps_to_reach`, `speedup`, `summarize`,
`mean_std`) are `raysub.metrics`'; the record's tables (`meta_test_table`, `transfer_table`) are
`raysub.report.tables`' and its plot `raysub.report.plots.plot_meta_test`.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence
import os

import torch

from raysub.errors import ConfigError, StorageError
from raysub.l2o.seeds import VALIDATION_SERIAL, optimizee_seed
from raysub.metrics import SMOOTH_WINDOW, convergence_step, final_loss, mean_std, smoothed, speedup, summarize
from raysub.report.tables import task_label
from raysub.runs import layout
from raysub.optim import build_optimizer, OPTIMIZERS
from raysub.l2o.weights import weights_problems
from raysub.data import open_dataset
from raysub.engine.task import build_task
from raysub.pipeline.plan import check_train_projection, plan
from raysub.storage import RunDir
from raysub.config import load_config

METATEST_SERIAL = 900_000  # meta-test optimizees: serials from here on (training: 0…, validation: 500 000…)
LABELS = {"l2o": "L2O", "psgd": "Momentum†", "adam": "Adam†", "sgd": "SGD†", "rmsprop": "RMSprop†"}
# grids around each baseline's usual lr on a DLDR subspace (DLDR's P-SGD: lr 1, momentum 0.9)
DEFAULT_GRIDS: Dict[str, List[float]] = {"psgd": [0.1, 0.3, 1.0, 3.0], "sgd": [0.3, 1.0, 3.0, 10.0],
                                         "adam": [0.01, 0.03, 0.1, 0.3]}


# ---------------------------------------------------------------------------------------------------------
# the lr pick

def pick_lr(grid: Sequence[float], runner: Callable[[float, int], Dict[str, Any]], seeds: Sequence[int]
            ) -> Dict[str, Any]:
    """The lr of ``grid`` with the best mean validation accuracy over ``seeds``; ties: lower mean final loss.

    Args:
        runner: ``runner(lr, seed)`` -> a run's {"val_acc", "losses", "diverged"} (a diverged run scores 0).
            Only "val_acc" and the training losses are read, whatever else it returns.

    Returns:
        {"lr", "rows": per lr {"lr", "val_acc", "final_loss", "diverged"}, "at_edge": the pick is the grid's
        smallest or largest lr (widen the grid)}.
    """
    if not grid:
        raise ValueError("pick_lr: empty lr grid")
    rows = []
    for lr in grid:
        runs = [runner(lr, s) for s in seeds]
        rows.append({"lr": lr, "val_acc": sum(r["val_acc"] for r in runs) / len(runs),
                     "final_loss": sum(final_loss(r["losses"]) for r in runs) / len(runs),
                     "diverged": sum(bool(r["diverged"]) for r in runs)})
    best = max(rows, key=lambda r: (r["val_acc"], -r["final_loss"]))
    return {"lr": best["lr"], "rows": rows,
            "at_edge": len(grid) > 1 and best["lr"] in (min(grid), max(grid))}


# ---------------------------------------------------------------------------------------------------------
# one run

def batch_stream(task, cfg, seed: int):
    """The training batches of data-order ``seed``, epoch after epoch, as a 1-worker ``raysub train`` (and
    meta-training's `Optimizee.next_batches`) cuts them; endless."""
    # imported per call, not at the top: tests monkeypatch these names on the module they come from
    from raysub.engine.loop import epoch_batches, mix_seed

    data, batch = task.data, cfg.train.batch_size or cfg.data.batch_size
    epoch = 0
    while True:
        order = epoch_batches(data.size("train"), batch, seed, epoch, 0, 1)
        if not order:
            raise ConfigError(f"train.batch_size={batch} exceeds the {data.size('train')} training examples: "
                              f"lower it")
        yield from data.batches("train", order, augment=cfg.data.augment, seed=mix_seed(seed, epoch))
        epoch += 1


def start_z(task, seed: int, z0_std: float) -> torch.Tensor:
    """z0 ~ N(0, z0_std²) drawn from ``seed`` (meta-training's `Optimizee` draws it the same way)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(task.dim, generator=gen) * z0_std).to(task.theta0_N.device)


def run_optimizee(cfg, task, optimizer_name: str, lr: float, options: Dict[str, Any], seed: int, z0_std: float,
                  steps: int, eval_at: Sequence[int] = (), splits: Sequence[str] = ("val", "test"),
                  say: Optional[Callable[[str], None]] = None, progress_every: int = 0) -> Dict[str, Any]:
    """``steps`` steps of one optimizee (data-order ``seed``, z0 from it) with a registry optimizer, at constant lr.

    Args:
        cfg: The config whose ``train`` section is the task (its momentum, weight decay; its batch).
        task: `build_task(cfg)`; its model buffers are put back as they were afterwards.
        optimizer_name, lr, options: The registered optimizer, its lr (``l2o``: the reference lr0, so any value
            gives the meta-trained step) and its ``train.optimizer_options``.
        eval_at: Steps after which to evaluate (the last step always is).
        splits: The splits evaluated (`pick_lr`'s runs: ``("val",)`` only).
        say, progress_every: A progress line every ``progress_every`` steps (0: none).

    Returns:
        {"optimizer", "lr", "seed", "steps", "losses" (the batch loss of each step taken, at z before it),
        "diverged", "diverged_at" (1-based step or None), "evals": {step: {"val_acc", "val_loss", …}},
        "val_acc"/"test_acc" (after the last step; 0 when diverged), "convergence_step", "z", "wall_s"}.
        A non-finite loss or z stops the run: every later evaluation scores accuracy 0.
    """
    # imported per call, not at the top: tests monkeypatch these names on the module they come from
    from raysub.engine.task import evaluate_task, train_step

    t0 = time.perf_counter()
    train = replace(cfg.train, optimizer=optimizer_name, lr=float(lr), optimizer_options=dict(options))
    z_D = start_z(task, seed, z0_std)
    opt = build_optimizer(optimizer_name, z_D, train)
    checkpoints = sorted({int(s) for s in eval_at if 0 < s <= steps} | {steps})
    buffers = {k: v.clone() for k, v in task.model.named_buffers()}
    losses: List[float] = []
    evals: Dict[str, Dict[str, float]] = {}  # by step, as a string (JSON's keys)
    diverged_at = None
    stream = batch_stream(task, cfg, seed)
    try:
        task.model.train()
        for step in range(1, steps + 1):
            x, y = next(stream)
            x, y = x.to(task.device), y.to(task.device)
            loss, _ = train_step(task, z_D, opt, x, y)
            losses.append(float(loss))
            if not (math.isfinite(losses[-1]) and bool(torch.isfinite(z_D).all())):
                diverged_at = step
                break
            if step in checkpoints:
                evals[str(step)] = {f"{s}_{k}": v for s in splits for k, v in evaluate_task(task, z_D, s).items()}
            if say and progress_every and step % progress_every == 0:
                say(f"  {optimizer_name} lr {lr:g} seed {seed}: step {step}/{steps}  "
                    f"loss (mean of last {SMOOTH_WINDOW}) {smoothed(losses)[-1]:.4f}")
    finally:
        with torch.no_grad():
            for k, v in task.model.named_buffers():
                v.copy_(buffers[k])
    for s in map(str, checkpoints):
        if s not in evals:  # after the divergence
            evals[s] = {**{f"{sp}_acc": 0.0 for sp in splits}, **{f"{sp}_loss": math.nan for sp in splits}}
    last = evals[str(steps)]
    return {"optimizer": optimizer_name, "lr": lr, "seed": seed, "steps": steps, "losses": losses,
            "diverged": diverged_at is not None, "diverged_at": diverged_at, "evals": evals,
            **{f"{s}_acc": last[f"{s}_acc"] for s in splits},
            "convergence_step": None if diverged_at else convergence_step(losses),
            "z": z_D.detach().cpu(), "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------
# the protocol

def check_meta_test(cfg, weights: Optional[str], steps: int, horizons: Sequence[int], seeds: int,
                    val_seeds: int, grids: Dict[str, Sequence[float]]) -> None:
    """Every problem of a meta-test's inputs, in one `ConfigError`, before anything runs.

    Raises:
        ConfigError: bad steps/horizons/seeds/grids, no Momentum† grid, no validation split, weights that do
            not load.
    """

    problems = []
    if steps < 1:
        problems.append(f"--steps {steps}: N must be ≥ 1 (the meta-training horizon, l2o.steps)")
    if not horizons or any(h < 1 for h in horizons):
        problems.append(f"--horizons {list(horizons)}: give positive multiples of N, e.g. 1,2,5")
    if seeds < 1 or val_seeds < 1:
        problems.append(f"--seeds {seeds} / --val-seeds {val_seeds}: need ≥ 1 optimizee each (the issue asks ≥ 3 "
                        f"meta-test seeds)")
    if cfg.data.val_fraction <= 0:
        problems.append("data.val_fraction=0: the baselines' lrs are picked on a held-out validation split, never "
                        "on test; set data.val_fraction (e.g. 0.1, as in meta-training)")
    if "psgd" not in grids:
        problems.append("--baselines: Momentum† (psgd) is the reference of the speedups and the accuracy gap: "
                        "include it")
    for name, grid in grids.items():
        if name not in OPTIMIZERS or name == "l2o":
            problems.append(f"--lr-grid {name}: not a baseline; choose from "
                            f"{', '.join(n for n in OPTIMIZERS.names() if n != 'l2o')}")
        elif not grid or any(not (isinstance(v, (int, float)) and v > 0) for v in grid):
            problems.append(f"--lr-grid {name}={list(grid)}: give one or more lrs > 0")
    if weights is not None:
        problems += [f"--weights: {p}" for p in weights_problems(weights)]
    if problems:
        raise ConfigError(problems)


def meta_test(cfg, weights: str, steps: int, horizons: Sequence[int] = (1, 2, 5), seeds: int = 3,
              val_seeds: Optional[int] = None, grids: Optional[Dict[str, Sequence[float]]] = None,
              z0_std: Optional[float] = None, say: Callable[[str], None] = print,
              progress_every: int = 0) -> Dict[str, Any]:
    """φ (``weights``) against the baselines of ``grids`` (lrs picked on validation) on the task of ``cfg``.

    Args:
        cfg: A config whose ``train`` section is the task (``data.val_fraction`` > 0); ``l2o.seed`` and
            ``l2o.z0_std`` give the optimizees as meta-training does.
        weights: φ's weights.pt (or a directory holding it).
        steps: N, the meta-training horizon: lrs are picked after N steps; speedups are taken at h·N.
        horizons: The multiples h of N; every meta-test run is max(h)·N steps long.
        seeds: Meta-test optimizees (serials `METATEST_SERIAL` + j).
        val_seeds: Validation optimizees for the lr pick (default ``l2o.validation_optimizees``).
        grids: Baseline name → lr grid (default `DEFAULT_GRIDS`); must include ``psgd`` (Momentum†) for the
            speedups.

    Returns:
        The record (`RunDir.write_json` writes it, non-finite values as null): task, weights, seeds, lr
        selection, per-optimizer runs (losses, evaluations, convergence step) and summaries, per-horizon
        speedups and the headline ``metrics``.
    """

    grids = dict(DEFAULT_GRIDS if grids is None else grids)
    horizons = sorted({int(h) for h in horizons})
    val_seeds = cfg.l2o.validation_optimizees if val_seeds is None else val_seeds
    z0_std = cfg.l2o.z0_std if z0_std is None else z0_std
    check_meta_test(cfg, weights, steps, horizons, seeds, val_seeds, grids)
    info = plan(cfg)
    check_train_projection(cfg, info["num_params"], RunDir(cfg.run_dir), own_basis=False)

    theta0_run = RunDir(cfg.train.basis_run) if cfg.train.basis_run else RunDir(cfg.run_dir)
    task = build_task(cfg, run=theta0_run, data=open_dataset(cfg))
    theta0_same = same_theta0(task, weights)
    if theta0_same is False:
        say(f"meta-test: note: θ0 ({theta0_run.uri}) is not the θ0 of φ's meta-training run "
            f"({meta_training_run(weights)}): expected for transfer to another model, not for the same task")
    total = max(horizons) * steps
    val_list = [optimizee_seed(cfg, VALIDATION_SERIAL + j) for j in range(val_seeds)]
    test_list = [optimizee_seed(cfg, METATEST_SERIAL + j) for j in range(seeds)]
    assert not set(val_list) & set(test_list), "validation and meta-test optimizees must differ"
    say(f"meta-test: {cfg.data.name} {cfg.model.name}, {cfg.train.projection} d={task.dim}, batch "
        f"{cfg.train.batch_size or cfg.data.batch_size}; N={steps}, runs of {total} steps; "
        f"{seeds} meta-test optimizees, lrs picked on {val_seeds} validation optimizees; z0 std {z0_std:g}")

    selection = {}
    for name, grid in grids.items():
        t0 = time.perf_counter()

        def runner(lr, seed, name=name):
            return run_optimizee(cfg, task, name, lr, {}, seed, z0_std, steps, splits=("val",))

        selection[name] = pick_lr(list(grid), runner, val_list)
        rows = "  ".join(f"{r['lr']:g}: {100 * r['val_acc']:.2f}%" + (f" ({r['diverged']} diverged)"
                                                                        if r["diverged"] else "")
                         for r in selection[name]["rows"])
        say(f"lr pick {LABELS.get(name, name)} (val acc after N={steps}): {rows}  → lr "
            f"{selection[name]['lr']:g}{'  (at the grid edge: widen it)' if selection[name]['at_edge'] else ''}"
            f"  {time.perf_counter() - t0:.1f}s")

    arms = [("l2o", 1.0, {"weights": weights})] + [(n, selection[n]["lr"], {}) for n in grids]
    checkpoints = [h * steps for h in horizons]
    optimizers: Dict[str, Any] = {}
    for name, lr, options in arms:
        runs = []
        for seed in test_list:
            r = run_optimizee(cfg, task, name, lr, options, seed, z0_std, total, eval_at=checkpoints, say=say,
                              progress_every=progress_every)
            r.pop("z")
            early = r["diverged_at"] is not None and r["diverged_at"] <= steps
            r["convergence_step_at_n"] = None if early else convergence_step(r["losses"][:steps])
            runs.append(r)
            cs = r["convergence_step"]
            say(f"{LABELS.get(name, name)} seed {seed}: test acc {100 * r['test_acc']:.2f}%  conv step "
                f"{'-' if cs is None else cs}  final loss {final_loss(r['losses']):.4f}"
                f"{'  DIVERGED at step ' + str(r['diverged_at']) if r['diverged'] else ''}  {r['wall_s']:.1f}s")
        optimizers[name] = {"label": LABELS.get(name, name), "lr": None if name == "l2o" else lr,
                            "runs": runs, "summary": summarize(runs)}

    speedups = {}
    for h in horizons:
        per_seed = [speedup(a["losses"], b["losses"], h * steps)
                    for a, b in zip(optimizers["l2o"]["runs"], optimizers["psgd"]["runs"])]
        speedups[f"{h}n"] = {"h": h, "n": h * steps, "per_seed": per_seed,
                             **mean_std([s["value"] for s in per_seed]),
                             "lower_bound": any(s["lower_bound"] for s in per_seed)}
    l2o_s, mom_s = optimizers["l2o"]["summary"], optimizers["psgd"]["summary"]
    metrics = {
        "l2o_over_momentum_steps": l2o_s["convergence_step"]["mean"] / mom_s["convergence_step"]["mean"],
        "l2o_over_momentum_steps_censored": bool(l2o_s["not_converged"] or mom_s["not_converged"]),
        "acc_gap_pts": 100 * (mom_s["test_acc"]["mean"] - l2o_s["test_acc"]["mean"]),
        "acc_gap_pts_at_n": 100 * (_mean_acc_at(optimizers["psgd"]["runs"], steps)
                                   - _mean_acc_at(optimizers["l2o"]["runs"], steps)),
        "seeds": seeds,
    }
    for h in horizons:
        key = "l2o_speedup_over_momentum" + ("" if h == 1 else f"_{h}n")
        metrics[key] = speedups[f"{h}n"]["mean"]
        metrics[key + "_lower_bound"] = speedups[f"{h}n"]["lower_bound"]
    return {"task": {"data": cfg.data.name, "model": cfg.model.name, "projection": cfg.train.projection,
                     "dim": task.dim, "batch_size": cfg.train.batch_size or cfg.data.batch_size,
                     "basis_run": cfg.train.basis_run, "theta0_run": theta0_run.uri,
                     "theta0_norm": float(task.theta0_N.norm()), "theta0_same_as_meta_training": theta0_same},
            "weights": weights, "steps": steps, "horizons": horizons, "run_steps": total, "z0_std": z0_std,
            "seeds": test_list, "val_seeds": val_list, "smoothing": f"trailing mean of {SMOOTH_WINDOW}",
            "lr_selection": selection, "optimizers": optimizers, "speedups": speedups, "metrics": metrics}



def _mean_acc_at(runs: Sequence[Dict[str, Any]], step: int) -> float:
    return sum(r["evals"][str(step)]["test_acc"] for r in runs) / len(runs)


# ---------------------------------------------------------------------------------------------------------
# where φ comes from

def meta_training_run(weights: str) -> str:
    """The directory of the meta-training run φ comes from: ``weights`` = RUN, RUN/l2o/weights.pt,
    RUN/l2o/ckpt/GEN/weights.pt or RUN/weights.pt (local paths)."""

    path = os.path.abspath(os.path.expanduser(weights))
    run = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.basename(os.path.dirname(run)) == "ckpt":  # a generation's own file
        run = os.path.dirname(os.path.dirname(run))
    return os.path.dirname(run) if os.path.basename(run) == "l2o" else run


def meta_training_config(weights: str):
    """The config (``config.yaml``) of `meta_training_run`; None when there is none to read."""


    try:
        return load_config(os.path.join(meta_training_run(weights), layout.CONFIG))
    except (ConfigError, StorageError, OSError):  # no config there, or storage that cannot serve it
        return None


def same_theta0(task, weights: str) -> Optional[bool]:
    """Whether the meta-training run's ``theta0.pt`` is the task's θ0 (None: no such file; False also for another
    architecture). Call before the task's first step (its parameters are θ0 until then)."""

    run = RunDir(meta_training_run(weights))
    try:
        ref = run.read_theta0() if run.exists(layout.THETA0) else None
    except StorageError:  # an unverifiable θ0 (no manifest entry): unknown
        ref = None
    if ref is None:
        return None
    own = task.model.state_dict()
    return ref.keys() == own.keys() and all(
        ref[k].shape == own[k].shape and torch.equal(ref[k].cpu(), own[k].detach().cpu()) for k in ref)


def trained_on(weights: str) -> Optional[str]:
    """The task φ was meta-trained on (`meta_training_config`), as `task_label` writes it; None when unknown."""
    cfg = meta_training_config(weights)
    if cfg is None:
        return None
    return task_label({"data": cfg.data.name, "model": cfg.model.name, "projection": cfg.train.projection,
                       "dim": cfg.train_dim})
