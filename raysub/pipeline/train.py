"""Stage 3 — train in the subspace: θ = θ0 + P z, only z ∈ R^D is trained, on Ray Train.

Every worker holds P (replicated), computes the gradient g_r of its share of the global batch (mean loss over
its B/W examples), projects it, g̃_r = Pᵀ g_r, and all-reduces D+1 floats (g̃ and the loss) — not N: projection is linear, so
the mean of the projections is the projection of the mean gradient. Every worker then applies the same Δz, so θ
stays identical across workers without ever communicating N floats.

When P does not fit a worker (``train.projection_sharding``: sharded, node, or auto's choice, planned by the driver
with `raysub.pipeline.plan.sharding_plan`), each worker holds only the rows of its slice of θ: it reduce-scatters
the gradient, projects its slice, and all-gathers θ after the step (`raysub.engine.sharded`); the D+1-float
all-reduce, the optimizers and the checkpoints are as above.

BatchNorm: running statistics are buffers outside the subspace. Each worker updates its own during the epoch
(from its local batches); at the end of every epoch, before evaluation and the checkpoint, they are
broadcast from rank 0, so all workers evaluate and checkpoint the same model.

The per-worker loop is a recipe over `raysub.engine.task`: build the task and the optimizer, restore the
latest checkpoint, then for each epoch: steps (`train_step`), the divergence check, BatchNorm broadcast,
evaluation, report with a checkpoint. The step itself (projection, all-reduce, the optimizer protocol) lives in
the engine, shared with the Tune trials, the benchmark and meta-training.

Divergence: at the end of every epoch the global step losses (the loss rides in the all-reduce) and z, both
identical on every rank, are checked. A non-finite one stops every rank before that epoch's evaluation and
checkpoint: the run reports ``{"diverged": record, "history", "step_losses"}`` (the completed epochs; see
`report_divergence`), writes no ``train/LABEL.pt`` and returns — raising would make Ray retry a deterministic
failure. In a sweep the trial reports one last row with ``diverged`` = 1 and validation and test accuracy 0, so
it fails its d.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List

import torch

from raysub import faults
from raysub.engine import loop, sharded
from raysub.engine.task import (Task, allreduce_floats_per_step, build_task, evaluate_task, group_floats_per_step,
                                 train_step)
from raysub.config import Config
from raysub.runs import layout
from raysub.storage import RunDir
from raysub.errors import StorageError
from raysub.lock import fence, token_of
from raysub.optim import build_optimizer


def trained_rel(label: str) -> str:
    """Where a subspace training puts its trained z: ``train/LABEL.pt``."""
    return layout.train_z(label)


def read_trained(run: RunDir, label: str) -> Dict[str, Any]:
    """The trained z of ``label`` ({"z", "dim", "projection", "projection_options", "buffers"}), verified
    against the run's manifest.

    Raises:
        StorageError: no checksum in the manifest (not committed, or diverged), missing, or corrupted.
    """

    rel = trained_rel(label)
    checksum = run.manifest_checksum(rel)
    if checksum is None:
        raise StorageError(f"{run.path(rel)} has no checksum in {run.path(layout.MANIFEST)}: train '{label}' "
                           f"(or retrain it with --overwrite)")
    return run.read_torch(rel, checksum)


def _restore(session: str, task: Task, z_D: torch.Tensor, opt) -> Dict[str, Any]:
    """The loop's state from the latest checkpoint Ray hands this run (z, optimizer and buffers restored in
    place; a divergence report as it is), or a fresh start."""
    state = loop.load_checkpoint(session)
    if state is None:
        return {"epoch": 0, "history": [], "elapsed": 0.0, "step_losses": []}
    if "diverged_report" in state:
        return state
    with torch.no_grad():
        z_D.copy_(state["z"].to(z_D.device))
    opt.load_state_dict(state["optimizer"])
    for name, buf in task.model.named_buffers():
        buf.copy_(state["buffers"][name].to(buf.device))
    return state


def train_epoch(task: Task, z_D: torch.Tensor, opt, epoch: int, rank: int, world: int):
    """One epoch of `train_step`s in the run's data order. Returns (global step losses, mean step stats)."""
    cfg = task.cfg
    batch = cfg.train.batch_size or cfg.data.batch_size
    seed = cfg.train_data_seed
    task.model.train()
    losses: List[torch.Tensor] = []
    sums: Dict[str, float] = {}
    batches = loop.epoch_batches(task.data.size("train"), batch, seed, epoch, rank, world)
    for x, y in task.data.batches("train", batches, augment=cfg.data.augment, seed=loop.mix_seed(seed, epoch),
                                  num_workers=cfg.data.num_workers):
        x, y = x.to(task.device, non_blocking=True), y.to(task.device, non_blocking=True)
        loss, stats = train_step(task, z_D, opt, x, y)
        losses.append(loss.detach().reshape(()))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    step_losses = torch.stack(losses).double().tolist() if losses else []
    return step_losses, {k: v / max(len(losses), 1) for k, v in sums.items()}


# public for the benchmarks that train a window's basis in process (raysub.bench.window_runs)


def divergence_line(cfg: Config, record: Dict[str, Any]) -> str:
    """The one-line report of a diverged subspace training (``record`` from `run_subspace`)."""
    return loop.divergence_message(f"training {cfg.train_label!r}", record,
                                   f"lower train.lr (now {cfg.train.lr:g}) and rerun with --overwrite")


def _report_divergence(ctx, record: Dict[str, Any], history, step_losses, now: float, sweep: bool) -> None:
    """The last report of a diverged run (`report_divergence`). A Tune trial's row keeps the metrics Tune and ASHA
    read (epoch, val_acc) and scores 0."""
    if sweep:
        metrics = {"stage": record["stage"], "epoch": record["epoch"], "epochs": ctx.cfg.train.epochs,
                   "val_acc": 0.0, "test_acc": 0.0, "diverged": 1, "elapsed_s": now}
    else:
        metrics = {"diverged": record, "history": history, "step_losses": step_losses}
    loop.report_divergence(metrics, ctx.rank, ctx.session)


def subspace_loop(config: Dict[str, Any]) -> None:
    """Per-worker loop (Ray Train worker or Tune trial). ``config``: {"cfg": Config dict, "progress": Queue or
    None, "session", "sweep", "faults" (`raysub.faults.snapshot`), "lock_token" (`raysub.lock.fence` before rank 0's writes)}.

    The last report carries ``written``: {``train/LABEL.pt``: its sha256, as rank 0 wrote it}."""

    ctx = loop.worker_context(config)
    cfg = ctx.cfg
    task = build_task(cfg, device=ctx.device, run=ctx.run,
                      sharding=config.get("sharding") or cfg.train.projection_sharding)
    z_D = task.new_z()
    opt = build_optimizer(cfg.train.optimizer, z_D, cfg.train)
    opt.set_horizon(cfg.train.epochs * (task.data.size("train") // (cfg.train.batch_size or cfg.data.batch_size)))
    state = _restore(ctx.session, task, z_D, opt)
    if loop.resumed_divergence(state, ctx.rank, ctx.session):
        return
    history, step_losses = state["history"], state["step_losses"]
    t_start = time.perf_counter() - state["elapsed"]
    evals = ["test"] + (["val"] if cfg.data.val_fraction > 0 else [])
    for epoch in range(state["epoch"], cfg.train.epochs):
        opt.set_lr(loop.lr_at(epoch, cfg.train.lr, cfg.train.lr_milestones, cfg.train.lr_gamma))
        epoch_losses, step_stats = train_epoch(task, z_D, opt, epoch, ctx.rank, ctx.world)
        diverged = loop.divergence(cfg.train_label, epoch + 1, len(step_losses), epoch_losses,
                                   bool(torch.isfinite(z_D).all()))
        if diverged is not None:
            _report_divergence(ctx, diverged, history, step_losses, time.perf_counter() - t_start,
                               bool(config.get("sweep")))
            return
        step_losses.extend(epoch_losses)
        loop.broadcast_buffers_(task.model)
        scores = {s: evaluate_task(task, z_D, s, cfg.data.eval_batch_size, cfg.data.num_workers) for s in evals}
        now = time.perf_counter() - t_start
        record = {"stage": cfg.train_label, "epoch": epoch + 1, "epochs": cfg.train.epochs,
                  "train_loss": sum(epoch_losses) / max(len(epoch_losses), 1),
                  **{f"{s}_{k}": v for s in evals for k, v in scores[s].items()},
                  "elapsed_s": now, "allreduce_floats_per_step": allreduce_floats_per_step(task),
                  "projection_sharding": sharded.mode_of(task.projection),
                  "p_bytes_per_worker": sharded.held_bytes(task.projection)}
        if isinstance(task.projection, sharded.ShardedProjection):
            record["group_floats_per_step"] = group_floats_per_step(task)
        if opt.counters():
            record["optimizer_stats"] = opt.counters()
        if step_stats:
            record["step_stats"] = step_stats
        history.append(record)
        last = epoch + 1 == cfg.train.epochs and not config.get("sweep")  # Tune keeps every epoch's row
        written = {}
        if last and ctx.rank == 0:  # the trained model is θ0 + P z with these buffers
            fence(ctx.run, config.get("lock_token"))
            written[trained_rel(cfg.train_label)] = ctx.run.write_torch(trained_rel(cfg.train_label), {
                "z": z_D.detach().cpu(), "dim": task.dim, "projection": cfg.train.projection,
                "projection_options": dict(cfg.train.projection_options),  # z's coordinates (dldr scale)
                "buffers": {k: v.detach().cpu() for k, v in task.model.named_buffers()}})
        metrics = {**record, "z_norm": float(z_D.norm()),
                   **({"history": history, "step_losses": step_losses, "written": written} if last else {})}
        if ctx.rank == 0 and ctx.progress is not None:
            ctx.progress.put(record)
        ckpt = {"z": z_D.detach().cpu(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "history": history,
                "step_losses": step_losses, "elapsed": now,
                "buffers": {k: v.detach().cpu() for k, v in task.model.named_buffers()}}
        if ctx.rank == 0:
            fence(ctx.run, config.get("lock_token"))  # the checkpoint lands in RUN/checkpoints
        loop.report(metrics, ckpt if ctx.rank == 0 else None, ctx.session)
        faults.after_epoch(ctx.run, epoch + 1)  # testing hooks (`raysub.faults`), inert unless the driver set them


def run_subspace(cfg: Config, run: RunDir, printer, sharding: str = "") -> Dict[str, Any]:
    """Driver side: run `subspace_loop` on Ray Train; ``sharding``: the resolved ``train.projection_sharding``
    (`raysub.pipeline.plan.sharding_plan`; empty: the workers resolve the config's).

    Returns:
        {"history", "step_losses", "wall_s", "diverged", "written"}: the completed epochs' records and global step
        losses (all finite); ``diverged`` is None, or the record of the epoch that diverged ({"stage", "epoch",
        "step", "loss", "reason"}, see `divergence_line`), in which case no ``train/LABEL.pt`` was written;
        ``written``: {``train/LABEL.pt``: sha256} as rank 0 wrote it.
    """
    # imported per call, not at the top: tests monkeypatch these names on the module they come from
    from raysub.engine.cluster import (fit_with_progress, make_progress_queue, release_progress_queue, torch_trainer,
                                       unwrap_train_error)
    from raysub.tracking import train_callbacks

    progress = make_progress_queue()
    trainer = torch_trainer(subspace_loop, {"cfg": cfg.to_dict(), "progress": progress, "lock_token": token_of(run),
                                            "sharding": sharding},
                            cfg,
                            f"train-{cfg.train_label}", run.ray_storage("checkpoints"),
                            callbacks=train_callbacks(cfg, run, f"train-{cfg.train_label}"))  # raysub.tracking
    t0 = time.perf_counter()
    try:
        result = fit_with_progress(trainer, progress, printer)
    except Exception as exc:
        raise unwrap_train_error(exc)
    finally:
        release_progress_queue(progress)  # for this driver's next fit
    fence(run)  # a command whose lock was taken over while the workers ran writes nothing more
    return {"history": result.metrics["history"], "step_losses": result.metrics["step_losses"],
            "wall_s": time.perf_counter() - t0, "diverged": result.metrics.get("diverged"),
            "written": result.metrics.get("written") or {}}
