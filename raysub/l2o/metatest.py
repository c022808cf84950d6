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
  with the lr on a schedule over the run's own length (`schedule_lr`: constant, cosine or step); φ runs at its
  own constant reference lr.
- **Learning rates and schedules** (`pick_lr`): each baseline's (lr, schedule) is the grid point with the best
  mean validation accuracy at the end of runs as long as the meta-test runs (max(h)·N steps: tuned for the run's
  length, as a user would) on the validation optimizees (ties: lower mean final training loss); test is never
  read.
- **Meta-test runs**: every optimizer on the meta-test optimizees for max(horizons)·N steps, evaluated on val and
  test at every horizon h·N; "accuracy after the full run" is the one at the last step.
- **Metrics**: SL2O §4.1's convergence step (`raysub.metrics.convergence_step`) over the full run, and VeLO's
  speedup (`speedup`) of φ over Momentum† and over Adam† at each horizon, per optimizee, then mean ± std over
  optimizees; the best tuned baseline's test accuracy after the full run against φ's.

The curve metrics (`smoothed`, a trailing mean of the last 20 losses, `steps_to_reach`, `speedup`, `summarize`,
`mean_std`) are `raysub.metrics`'; the record's tables (`meta_test_table`, `transfer_table`) are
`raysub.report.tables`' and its plot `raysub.report.plots.plot_meta_test`.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from raysub.errors import ConfigError, StorageError
from raysub.l2o.seeds import VALIDATION_SERIAL, optimizee_seed
from raysub.metrics import (SMOOTH_WINDOW, convergence_step, curve_speedup, final_loss, mean_std, smoothed, speedup,
                            summarize)
from raysub.report.tables import task_label
from raysub.runs import layout
from raysub.optim import build_optimizer, OPTIMIZERS
from raysub.l2o.weights import load_learned_optimizer, weights_problems, weights_run
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
# a baseline's lr schedule over its run (the run's own length): what a user tuning for that length would try
SCHEDULES = ("constant", "cosine", "step")
# the evaluated training-loss curve of every meta-test run: the loss of z on CURVE_SAMPLES fixed training samples
# (the same for every optimizer and optimizee), every CURVE_EVERY steps: the speedups without minibatch noise
CURVE_SAMPLES, CURVE_EVERY, CURVE_SEED = 2048, 10, 12345
ADAM_LR_CHOICES = ("weights", "constant", "run")  # --adam-lr: where an adam_schedule φ's Adam lr comes from


def schedule_lr(schedule: str, lr: float, step: int, total: int) -> float:
    """The lr of step ``step`` (1-based) of a run of ``total`` steps: ``constant``; ``cosine`` towards 0,
    lr·½(1 + cos(π(step−1)/total)) (its last step still just above 0); ``step``: lr, ×0.1 after half the run, ×0.01 after three quarters."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / total))
    if schedule == "step":
        return lr * 0.1 ** ((step > total // 2) + (step > (3 * total) // 4))
    raise ValueError(f"unknown lr schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


# ---------------------------------------------------------------------------------------------------------
# the lr pick

def pick_key(row: Dict[str, Any]) -> Tuple[float, float]:
    """How `pick_lr` ranks its candidates: mean validation accuracy, ties to the lower mean final loss."""
    return row["val_acc"], -row["final_loss"]


def pick_lr(grid: Sequence[float], runner: Callable[..., Dict[str, Any]], seeds: Sequence[int],
            schedules: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The lr of ``grid`` (and, given ``schedules``, the schedule) with the best mean validation accuracy over
    ``seeds``; ties: lower mean final loss.

    Args:
        runner: ``runner(lr, seed)`` (``runner(lr, seed, schedule)`` with ``schedules``) -> a run's {"val_acc",
            "losses", "diverged"} (a diverged run scores 0). Only "val_acc" and the training losses are read.

    Returns:
        {"lr", "schedule" (with ``schedules``), "rows": per candidate {"lr", ["schedule",] "val_acc", "final_loss",
        "diverged"}, "at_edge": the pick is the grid's smallest or largest lr (widen the grid)}.
    """
    if not grid:
        raise ValueError("pick_lr: empty lr grid")
    rows = []
    for schedule in (schedules or [None]):
        for lr in grid:
            runs = [runner(lr, s) if schedule is None else runner(lr, s, schedule) for s in seeds]
            rows.append({"lr": lr, **({} if schedule is None else {"schedule": schedule}),
                         "val_acc": sum(r["val_acc"] for r in runs) / len(runs),
                         "final_loss": sum(final_loss(r["losses"]) for r in runs) / len(runs),
                         "diverged": sum(bool(r["diverged"]) for r in runs)})
    best = max(rows, key=pick_key)
    return {"lr": best["lr"], **({} if schedules is None else {"schedule": best["schedule"]}), "rows": rows,
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


_CURVE_SET: Dict[str, Any] = {}  # the last task's curve set: read once per task (forked workers inherit it)


def curve_set(task, samples: int = CURVE_SAMPLES) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fixed training samples of the evaluated curve: ``samples`` of the train split drawn with `CURVE_SEED`
    (all of it when smaller), without augmentation: the same for every optimizer and optimizee of a task. Read
    once and kept for the last (task, samples) asked for."""
    if _CURVE_SET.get("task") is not task or _CURVE_SET.get("samples") != samples:
        n = task.data.size("train")
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(CURVE_SEED))[:min(samples, n)]
        x, y = next(iter(task.data.batches("train", [idx], augment=False, seed=0)))
        _CURVE_SET.update(task=task, samples=samples, batch=(x.to(task.device), y.to(task.device)))
    return _CURVE_SET["batch"]


@torch.no_grad()
def curve_loss(task, z_D: torch.Tensor, batch: Tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean cross-entropy of θ0 + P z on ``batch`` in eval mode. The task's θ is left at z (as a training step
    leaves it; the next `train_step` sets it again); its train/eval mode and buffers are as they were."""
    sub = task.sub
    sub.set_z(z_D)
    was_training = sub.model.training
    sub.model.eval()
    try:
        return float(F.cross_entropy(sub.forward(batch[0]), batch[1]))
    finally:
        sub.model.train(was_training)


def run_optimizee(cfg, task, optimizer_name: str, lr: float, options: Dict[str, Any], seed: int, z0_std: float,
                  steps: int, eval_at: Sequence[int] = (), splits: Sequence[str] = ("val", "test"),
                  say: Optional[Callable[[str], None]] = None, progress_every: int = 0,
                  schedule: str = "constant", curve_every: int = 0,
                  curve_samples: int = CURVE_SAMPLES) -> Dict[str, Any]:
    """``steps`` steps of one optimizee (data-order ``seed``, z0 from it) with a registry optimizer, its lr on
    ``schedule`` over the ``steps`` of the run (`schedule_lr`; constant by default).

    Args:
        cfg: The config whose ``train`` section is the task (its momentum, weight decay; its batch).
        task: `build_task(cfg)`; its model buffers are put back as they were afterwards.
        optimizer_name, lr, options: The registered optimizer, its lr (``l2o``: the reference lr0, so any value
            gives the meta-trained step) and its ``train.optimizer_options``.
        eval_at: Steps after which to evaluate (the last step always is).
        splits: The splits evaluated (`pick_lr`'s runs: ``("val",)`` only).
        say, progress_every: A progress line every ``progress_every`` steps (0: none).
        curve_every, curve_samples: With ``curve_every`` > 0, the evaluated curve: the loss of z on `curve_set`
            before the first step and after every ``curve_every``-th step and each of ``eval_at``.

    Returns:
        {"optimizer", "lr", "seed", "steps", "losses" (the batch loss of each step taken, at z before it),
        "diverged", "diverged_at" (1-based step or None), "evals": {step: {"val_acc", "val_loss", …}},
        "val_acc"/"test_acc" (after the last step; 0 when diverged), "convergence_step", "z", "wall_s"}, and
        with ``curve_every`` "curve": [[step, loss], ...] (up to the divergence).
        A non-finite loss or z stops the run: every later evaluation scores accuracy 0.
    """
    # imported per call, not at the top: tests monkeypatch these names on the module they come from
    from raysub.engine.task import evaluate_task, train_step

    t0 = time.perf_counter()
    train = replace(cfg.train, optimizer=optimizer_name, lr=float(lr), optimizer_options=dict(options))
    z_D = start_z(task, seed, z0_std)
    opt = build_optimizer(optimizer_name, z_D, train)
    opt.set_horizon(steps)  # φ reading the fraction of its run done: this run's length
    checkpoints = sorted({int(s) for s in eval_at if 0 < s <= steps} | {steps})
    buffers = {k: v.clone() for k, v in task.model.named_buffers()}
    losses: List[float] = []
    evals: Dict[str, Dict[str, float]] = {}  # by step, as a string (JSON's keys)
    diverged_at = None
    stream = batch_stream(task, cfg, seed)
    curve_batch = curve_set(task, curve_samples) if curve_every else None
    curve: List[List[float]] = [[0, curve_loss(task, z_D, curve_batch)]] if curve_every else []
    try:
        task.model.train()
        for step in range(1, steps + 1):
            x, y = next(stream)
            x, y = x.to(task.device), y.to(task.device)
            if schedule != "constant":
                opt.set_lr(schedule_lr(schedule, lr, step, steps))
            loss, _ = train_step(task, z_D, opt, x, y)
            losses.append(float(loss))
            if not (math.isfinite(losses[-1]) and bool(torch.isfinite(z_D).all())):
                diverged_at = step
                break
            if curve_every and (step % curve_every == 0 or step in checkpoints):
                curve.append([step, curve_loss(task, z_D, curve_batch)])
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
    return {"optimizer": optimizer_name, "lr": lr, "schedule": schedule, "seed": seed, "steps": steps,
            "losses": losses,
            "diverged": diverged_at is not None, "diverged_at": diverged_at, "evals": evals,
            **{f"{s}_acc": last[f"{s}_acc"] for s in splits},
            "convergence_step": None if diverged_at else convergence_step(losses),
            **({"curve": curve} if curve_every else {}),
            "z": z_D.detach().cpu(), "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------
# the protocol

def phi_adam_base(choice: Union[str, float], own: float, adam_pick: Optional[Dict[str, Any]]
                  ) -> Tuple[float, str]:
    """(the Adam lr an adam_schedule φ multiplies, why) for ``--adam-lr`` ``choice``: ``weights`` φ's ``own``;
    ``constant`` the best constant-schedule row of Adam†'s pick ``adam_pick`` (`pick_lr`'s record; φ brings the
    schedule); ``run`` that pick's lr; a number itself. `check_meta_test` has made sure the pick has what it needs."""
    if not isinstance(choice, str):
        return float(choice), "given"
    if choice == "constant":
        rows = [r for r in adam_pick["rows"] if r.get("schedule") == "constant"]
        return max(rows, key=pick_key)["lr"], "Adam†'s best constant lr"
    if choice == "run":
        return adam_pick["lr"], f"Adam†'s pick ({adam_pick['lr']:g} {adam_pick.get('schedule', 'constant')})"
    return own, "the lr φ was meta-trained with"


def adam_lr_arg(text: str) -> Union[str, float]:
    """``--adam-lr``'s value: ``weights``, ``constant``, ``run`` or a number (`check_meta_test` judges it)."""
    try:
        return float(text)
    except ValueError:
        return text


def check_meta_test(cfg, weights: Optional[str], steps: int, horizons: Sequence[int], seeds: int,
                    val_seeds: int, grids: Dict[str, Sequence[float]], schedules: Sequence[str] = SCHEDULES,
                    phi_adam_lr: Union[str, float] = "weights") -> None:
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
    bad = [x for x in schedules if x not in SCHEDULES]
    if not schedules or bad:
        problems.append(f"--schedules {','.join(schedules)}: choose one or more of {', '.join(SCHEDULES)}")
    if "psgd" not in grids:
        problems.append("--baselines: Momentum† (psgd) is the reference of the speedups and the accuracy gap: "
                        "include it")
    for name, grid in grids.items():
        if name not in OPTIMIZERS or name == "l2o":
            problems.append(f"--lr-grid {name}: not a baseline; choose from "
                            f"{', '.join(n for n in OPTIMIZERS.names() if n != 'l2o')}")
        elif not grid or any(not (isinstance(v, (int, float)) and v > 0) for v in grid):
            problems.append(f"--lr-grid {name}={list(grid)}: give one or more lrs > 0")
    if (phi_adam_lr not in ADAM_LR_CHOICES if isinstance(phi_adam_lr, str)
            else not (math.isfinite(phi_adam_lr) and phi_adam_lr > 0)):
        problems.append(f"--adam-lr {phi_adam_lr}: give weights (φ's own), constant (Adam†'s best constant lr for "
                        f"the runs), run (the lr of Adam†'s pick) or an lr > 0")
    weight_problems = [] if weights is None else [f"--weights: {p}" for p in weights_problems(weights)]
    adam_schedule = (weights is not None and not weight_problems
                     and load_learned_optimizer(weights)[0].rule == "adam_schedule")
    if adam_schedule and phi_adam_lr in ("constant", "run") and "adam" not in grids:
        problems.append(f"--adam-lr {phi_adam_lr}: takes Adam†'s pick: include adam in --baselines")
    if adam_schedule and phi_adam_lr == "constant" and "constant" not in schedules:
        problems.append("--adam-lr constant: takes Adam†'s best constant lr: include constant in --schedules")
    problems += weight_problems
    if problems:
        raise ConfigError(problems)


_FORKED: Optional[tuple] = None  # (cfg, task) that `run_all`'s forked workers inherit


def _forked_run(job):
    args, kwargs = job
    cfg, task = _FORKED
    return run_optimizee(cfg, task, *args, **kwargs)


def run_all(cfg, task, jobs: Sequence[tuple], processes: int = 1) -> List[Dict[str, Any]]:
    """`run_optimizee` of each ``(args, kwargs)`` job, in order: here, or in ``processes`` forked processes (one
    torch thread each; every run is seeded on its own, so where it runs changes nothing in its result)."""
    global _FORKED
    if processes <= 1:
        return [run_optimizee(cfg, task, *args, **kwargs) for args, kwargs in jobs]
    import multiprocessing

    _FORKED = (cfg, task)
    try:
        with multiprocessing.get_context("fork").Pool(processes, initializer=torch.set_num_threads,
                                                      initargs=(1,)) as pool:
            return pool.map(_forked_run, jobs, chunksize=1)
    finally:
        _FORKED = None


def meta_test(cfg, weights: str, steps: int, horizons: Sequence[int] = (1, 2, 5), seeds: int = 3,
              val_seeds: Optional[int] = None, grids: Optional[Dict[str, Sequence[float]]] = None,
              z0_std: Optional[float] = None, say: Callable[[str], None] = print,
              progress_every: int = 0, schedules: Sequence[str] = SCHEDULES, processes: int = 1,
              phi_adam_lr: Union[str, float] = "weights", curve_every: int = CURVE_EVERY) -> Dict[str, Any]:
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
        schedules: The lr schedules tried with each lr of a grid (`schedule_lr`, over the run's length): each
            baseline's (lr, schedule) is picked on validation runs as long as the meta-test runs, max(h)·N steps.
        processes: Runs at once, in forked processes (`run_all`); the record is the same for any number.
        phi_adam_lr: For ``adam_schedule`` weights, the Adam lr φ's multiplier applies to: ``"weights"`` (the
            lr φ was meta-trained with: its own task's tuned Adam lr), ``"constant"`` (plain Adam's best constant
            lr for these runs, from the rows of Adam†'s pick — φ brings the schedule; needs Adam† and the
            constant schedule among the baselines), ``"run"`` (the lr of Adam†'s (lr, schedule) pick) or a
            number. Ignored for other rules.
        curve_every: The meta-test runs' evaluated curve (`run_optimizee`: the loss on `CURVE_SAMPLES` fixed
            training samples every ``curve_every`` steps; 0: none): the speedups again, without minibatch noise
            (``l2o_eval_speedup_over_*``).

    Returns:
        The record (`RunDir.write_json` writes it, non-finite values as null): task, weights, seeds, lr
        selection, per-optimizer runs (losses, evaluations, convergence step) and summaries, per-horizon
        speedups and the headline ``metrics``.
    """

    grids = dict(DEFAULT_GRIDS if grids is None else grids)
    horizons = sorted({int(h) for h in horizons})
    val_seeds = cfg.l2o.validation_optimizees if val_seeds is None else val_seeds
    z0_std = cfg.l2o.z0_std if z0_std is None else z0_std
    check_meta_test(cfg, weights, steps, horizons, seeds, val_seeds, grids, schedules, phi_adam_lr)
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
    t0 = time.perf_counter()
    picks = [((name, lr, {}, seed, z0_std, total), {"splits": ("val",), "schedule": sch})
             for name, grid in grids.items() for sch in schedules for lr in grid for seed in val_list]
    picked = {(a[0], a[1], k["schedule"], a[3]): r for (a, k), r in zip(picks, run_all(cfg, task, picks, processes))}
    say(f"lr picks: {len(picks)} validation runs of {total} steps in {time.perf_counter() - t0:.0f} s "
        f"({processes} process{'es' if processes > 1 else ''})")
    for name, grid in grids.items():
        t0 = time.perf_counter()

        def runner(lr, seed, schedule, name=name):
            return picked[(name, lr, schedule, seed)]

        selection[name] = pick_lr(list(grid), runner, val_list, schedules=list(schedules))
        rows = "  ".join(f"{r['lr']:g} {r['schedule']}: {100 * r['val_acc']:.2f}%"
                         + (f" ({r['diverged']} diverged)" if r["diverged"] else "") for r in selection[name]["rows"])
        say(f"lr pick {LABELS.get(name, name)} (val acc after runs of {total}): {rows}  → lr "
            f"{selection[name]['lr']:g} {selection[name]['schedule']}"
            f"{'  (at the grid edge: widen it)' if selection[name]['at_edge'] else ''}"
            f"  {time.perf_counter() - t0:.1f}s")

    phi_options, phi_lr = {"weights": weights}, None
    phi_config = load_learned_optimizer(weights)[0]
    if phi_config.rule == "adam_schedule":  # φ multiplies Adam's step: at which lr
        phi_lr, why = phi_adam_base(phi_adam_lr, phi_config.adam_lr, selection.get("adam"))
        phi_options["adam_lr"] = phi_lr
        say(f"φ (adam_schedule) multiplies Adam's step at lr {phi_lr:g} ({why}, runs of {total})")
    arms = [("l2o", 1.0, phi_options, "constant")] + [
        (n, selection[n]["lr"], {}, selection[n]["schedule"]) for n in grids]
    checkpoints = [h * steps for h in horizons]
    optimizers: Dict[str, Any] = {}
    jobs = [((name, lr, options, seed, z0_std, total), {"eval_at": checkpoints, "schedule": schedule,
                                                        "curve_every": curve_every,
                                                        "progress_every": progress_every if processes <= 1 else 0,
                                                        "say": say if processes <= 1 else None})
            for name, lr, options, schedule in arms for seed in test_list]
    if curve_every:
        curve_set(task)  # read once here: the forked workers inherit it
    done = iter(run_all(cfg, task, jobs, processes))
    for name, lr, options, schedule in arms:
        runs = []
        for seed in test_list:
            r = next(done)
            r.pop("z")
            early = r["diverged_at"] is not None and r["diverged_at"] <= steps
            r["convergence_step_at_n"] = None if early else convergence_step(r["losses"][:steps])
            runs.append(r)
            cs = r["convergence_step"]
            say(f"{LABELS.get(name, name)} seed {seed}: test acc {100 * r['test_acc']:.2f}%  conv step "
                f"{'-' if cs is None else cs}  final loss {final_loss(r['losses']):.4f}"
                f"{'  DIVERGED at step ' + str(r['diverged_at']) if r['diverged'] else ''}  {r['wall_s']:.1f}s")
        optimizers[name] = {"label": LABELS.get(name, name), "lr": None if name == "l2o" else lr,
                            "schedule": None if name == "l2o" else schedule, "runs": runs,
                            "summary": summarize(runs)}

    def speedups_over(baseline: str, evaluated: bool = False) -> Dict[str, Any]:
        out = {}
        for h in horizons:
            pairs = zip(optimizers["l2o"]["runs"], optimizers[baseline]["runs"])
            per_seed = ([curve_speedup(a["curve"], b["curve"], h * steps, len(b["losses"])) for a, b in pairs]
                        if evaluated
                        else [speedup(a["losses"], b["losses"], h * steps) for a, b in pairs])
            out[f"{h}n"] = {"h": h, "n": h * steps, "per_seed": per_seed, **mean_std([s["value"] for s in per_seed]),
                            "lower_bound": any(s["lower_bound"] for s in per_seed)}
        return out

    speedups = speedups_over("psgd")
    speedups_adam = speedups_over("adam") if "adam" in optimizers else None
    eval_speedups = ({n: speedups_over(n, evaluated=True) for n in optimizers if n != "l2o"} if curve_every
                     else None)
    l2o_s, mom_s = optimizers["l2o"]["summary"], optimizers["psgd"]["summary"]
    best = max((n for n in optimizers if n != "l2o"), key=lambda n: optimizers[n]["summary"]["test_acc"]["mean"])
    metrics = {
        "l2o_over_momentum_steps": l2o_s["convergence_step"]["mean"] / mom_s["convergence_step"]["mean"],
        "l2o_over_momentum_steps_censored": bool(l2o_s["not_converged"] or mom_s["not_converged"]),
        "acc_gap_pts": 100 * (mom_s["test_acc"]["mean"] - l2o_s["test_acc"]["mean"]),
        "acc_gap_pts_at_n": 100 * (_mean_acc_at(optimizers["psgd"]["runs"], steps)
                                   - _mean_acc_at(optimizers["l2o"]["runs"], steps)),
        # the best tuned baseline's test accuracy after the full run, minus φ's (in points)
        f"acc_gap_best_{max(horizons)}n_pts": 100 * (optimizers[best]["summary"]["test_acc"]["mean"]
                                                      - l2o_s["test_acc"]["mean"]),
        "best_baseline": best,
        **({"l2o_over_adam_steps": l2o_s["convergence_step"]["mean"]
            / optimizers["adam"]["summary"]["convergence_step"]["mean"],
            "l2o_over_adam_steps_censored": bool(l2o_s["not_converged"]
                                                 or optimizers["adam"]["summary"]["not_converged"])}
           if "adam" in optimizers else {}),
        "test_acc_end": {n: o["summary"]["test_acc"]["mean"] for n, o in optimizers.items()},
        "seeds": seeds,
    }
    for label, table in (("momentum", speedups), ("adam", speedups_adam)):
        for h in horizons if table else ():
            key = f"l2o_speedup_over_{label}" + ("" if h == 1 else f"_{h}n")
            metrics[key] = table[f"{h}n"]["mean"]
            metrics[key + "_lower_bound"] = table[f"{h}n"]["lower_bound"]
    for name, label in (("psgd", "momentum"), ("adam", "adam")):
        for h in horizons if eval_speedups and name in eval_speedups else ():
            key = f"l2o_eval_speedup_over_{label}" + ("" if h == 1 else f"_{h}n")
            metrics[key] = eval_speedups[name][f"{h}n"]["mean"]
            metrics[key + "_lower_bound"] = eval_speedups[name][f"{h}n"]["lower_bound"]
    return {"task": {"data": cfg.data.name, "model": cfg.model.name, "projection": cfg.train.projection,
                     "dim": task.dim, "batch_size": cfg.train.batch_size or cfg.data.batch_size,
                     "basis_run": cfg.train.basis_run, "theta0_run": theta0_run.uri,
                     "theta0_norm": float(task.theta0_N.norm()), "theta0_same_as_meta_training": theta0_same},
            "weights": weights, "l2o_adam_lr": phi_lr, "steps": steps, "horizons": horizons, "run_steps": total, "z0_std": z0_std,
            "seeds": test_list, "val_seeds": val_list, "smoothing": f"trailing mean of {SMOOTH_WINDOW}",
            "lr_selection": selection, "schedules": list(schedules), "optimizers": optimizers, "speedups": speedups,
            "speedups_adam": speedups_adam, "eval_speedups": eval_speedups,
            "curve": {"samples": CURVE_SAMPLES, "every": curve_every, "seed": CURVE_SEED} if curve_every else None,
            "metrics": metrics}



def _mean_acc_at(runs: Sequence[Dict[str, Any]], step: int) -> float:
    return sum(r["evals"][str(step)]["test_acc"] for r in runs) / len(runs)


# ---------------------------------------------------------------------------------------------------------
# where φ comes from

def meta_training_run(weights: str) -> Optional[str]:
    """The meta-training run φ comes from: the run whose manifest (or tuning record) vouches for ``weights`` (RUN,
    RUN/l2o/weights.pt, RUN/l2o/ckpt/GEN/weights.pt: `raysub.l2o.weights.weights_run`, so a run named ``l2o`` is
    itself, not its parent); None for weights no run records (a copy), or weights that do not load."""
    try:
        return weights_run(weights)
    except ConfigError:
        return None


def meta_training_config(weights: str):
    """The config (``config.yaml``) of `meta_training_run`; None when there is none to read."""
    run = meta_training_run(weights)
    if run is None:
        return None
    try:
        return load_config(RunDir(run).path(layout.CONFIG))
    except (ConfigError, StorageError, OSError):  # no config there, or storage that cannot serve it
        return None


def same_theta0(task, weights: str) -> Optional[bool]:
    """Whether the meta-training run's ``theta0.pt`` is the task's θ0 (None: no such file; False also for another
    architecture). Call before the task's first step (its parameters are θ0 until then)."""

    uri = meta_training_run(weights)
    if uri is None:
        return None
    run = RunDir(uri)
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
