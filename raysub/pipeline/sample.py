"""Stage 1 — sample: full-parameter SGD on Ray Train (DDP), snapshotting the trajectory.

The run starts from the seeded θ0 in ``theta0.pt`` (written by the driver, loaded by every rank). During the
first ``sample.epochs`` epochs it snapshots the flat trainable-parameter vector (θ0 is snapshot 0). After
DDP's all-reduce every rank holds identical parameters, so rank r writes only its contiguous block r of the
vector: the trajectory lands sharded by block with no extra communication. The same run continues to
``sgd.epochs`` as the full-SGD baseline.

Every epoch ends with a Ray Train checkpoint (model, optimizer, epoch, snapshot count, history). A restarted
worker group — Ray's own restart (``cluster.max_failures``) or ``raysub sample --resume`` — resumes from it,
rewrites the snapshots of the unfinished epoch under the same names (identical contents: the data order is a
function of seed and epoch), and never duplicates or loses one.

Divergence: before every snapshot the parameters are checked, and at the end of every epoch the global step
losses and the parameters, all identical on every rank (DDP's all-reduce), so every rank stops at the same
point. A diverged run writes no non-finite snapshot and no checkpoint of that epoch's state; every rank
reports ``{"diverged": record}`` (`report_divergence`) and returns — raising would make Ray Train retry a
deterministic failure — and the driver raises `DivergedError` naming the epoch and the step.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List

import torch

from raysub.engine import loop
from raysub.config import Config
from raysub.errors import DivergedError
from raysub.storage import RunDir, block_bounds, block_index_rel, encode_vector, snapshot_rel


def num_snapshots(cfg: Config, steps_per_epoch: int) -> int:
    """Snapshots the sampler writes: theta0 plus those taken inside the window."""
    if cfg.sample.snapshot_every_steps > 0:
        return 1 + (cfg.sample.epochs * steps_per_epoch) // cfg.sample.snapshot_every_steps
    return 1 + cfg.sample.epochs * cfg.sample.snapshots_per_epoch


def snapshot_steps(cfg: Config, steps_per_epoch: int) -> List[int]:
    """Global step counts (1-based, after the update) at which snapshots 1..t-1 are taken."""
    total = cfg.sample.epochs * steps_per_epoch
    if cfg.sample.snapshot_every_steps > 0:
        k = cfg.sample.snapshot_every_steps
        return list(range(k, total + 1, k))
    per = cfg.sample.snapshots_per_epoch
    steps = []
    for epoch in range(cfg.sample.epochs):
        for j in range(1, per + 1):
            steps.append(epoch * steps_per_epoch + math.ceil(j * steps_per_epoch / per))
    return steps


def check_sample_section(cfg: Config) -> List[str]:
    """The sampling window against ``basis.dim``: d must be below the number of snapshots (the centred trajectory
    has rank ≤ t−1). Checked here when the count does not depend on the dataset size, else in the plan."""
    problems = []
    if cfg.sample.snapshot_every_steps == 0 and cfg.basis.dim > 0 and cfg.sample.epochs > 0:
        t = num_snapshots(cfg, steps_per_epoch=1)
        if cfg.basis.dim >= t:
            problems.append(
                f"basis.dim={cfg.basis.dim} must be < the {t} snapshots sampled (the centred trajectory has rank "
                f"≤ {t - 1}): lower basis.dim or sample more (sample.epochs, sample.snapshots_per_epoch)"
            )
    return problems


def write_snapshot(run: RunDir, flat_N: torch.Tensor, block: int, bounds, snap: int, step: int, epoch: int,
                   index: List[Dict[str, Any]]) -> None:
    """Write block ``block`` of the flat vector as snapshot ``snap`` and rewrite the block's index.

    ``index`` is this block's snapshot list; entries from ``snap`` on are replaced (a resumed run rewrites them).
    """
    start, stop = bounds[block]
    values = flat_N[start:stop].detach().to("cpu", torch.float32).numpy()
    rel = snapshot_rel(block, snap)
    checksum = run.write_bytes(rel, encode_vector(values, {"snapshot": snap, "step": step, "block": block}))
    del index[snap:]
    index.append({"snapshot": snap, "step": step, "epoch": epoch, "path": rel, "sha256": checksum})
    run.write_json(block_index_rel(block), {"block": block, "start": start, "stop": stop, "snapshots": index})


def sample_loop(config: Dict[str, Any]) -> None:
    """Per-worker loop (Ray Train). ``config``: {"cfg": Config dict, "progress": Queue or None}."""
    from torch.nn.parallel import DistributedDataParallel

    from raysub.engine.flat import flatten_params

    from raysub.data import open_dataset
    from raysub.models import build_model

    ctx = loop.worker_context(config)
    cfg, progress, rank, world, device, run = ctx.cfg, ctx.progress, ctx.rank, ctx.world, ctx.device, ctx.run
    data = open_dataset(cfg)
    model = build_model(cfg.model.name, data.num_classes, data.input_shape, **cfg.model.options)
    model.load_state_dict(run.read_theta0())  # every rank starts from the same θ0 (verified)
    model.to(device)
    ddp = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=cfg.sgd.lr, momentum=cfg.sgd.momentum,
                          weight_decay=cfg.sgd.weight_decay)

    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bounds = block_bounds(n, world)
    steps_per_epoch = data.size("train") // cfg.data.batch_size
    snap_at = {s: i + 1 for i, s in enumerate(snapshot_steps(cfg, steps_per_epoch))}
    index: List[Dict[str, Any]] = []

    state = loop.load_checkpoint()
    if loop.resumed_divergence(state, rank):
        return
    if state is None:
        start_epoch, step, history, elapsed, step_losses = 0, 0, [], 0.0, []
        window_s = None
        write_snapshot(run, flatten_params(model), rank, bounds, 0, 0, 0, index)
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step, history, elapsed = state["epoch"], state["step"], state["history"], state["elapsed"]
        window_s, step_losses = state["window_s"], state["step_losses"]
        index = run.read_json(block_index_rel(rank))["snapshots"][: state["num_snapshots"]]

    t_start = time.perf_counter() - elapsed
    for epoch in range(start_epoch, cfg.sgd.epochs):
        for group in opt.param_groups:
            group["lr"] = loop.lr_at(epoch, cfg.sgd.lr, cfg.sgd.lr_milestones, cfg.sgd.lr_gamma)
        model.train()
        losses = []
        finite = True  # the parameters; identical on every rank, so every rank stops at the same step
        batches = loop.epoch_batches(data.size("train"), cfg.data.batch_size, cfg.seed, epoch, rank, world)
        for i, (x, y) in enumerate(data.batches("train", batches, augment=cfg.data.augment,
                                                 seed=loop.mix_seed(cfg.seed, epoch), num_workers=cfg.data.num_workers)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.detach())
            if step in snap_at:
                with torch.no_grad():
                    flat_N = flatten_params(model)
                    finite = bool(torch.isfinite(flat_N).all())
                    if not finite:
                        break
                    write_snapshot(run, flat_N, rank, bounds, snap_at[step], step, epoch + 1, index)
        epoch_losses = loop.global_step_losses(losses)
        if finite:
            with torch.no_grad():
                finite = bool(torch.isfinite(flatten_params(model)).all())
        diverged = loop.divergence("sample", epoch + 1, step - len(losses), epoch_losses, finite)
        if diverged is not None:
            loop.report_divergence({"diverged": diverged}, rank)
            return
        step_losses.extend(epoch_losses)
        loop.broadcast_buffers_(model)  # every rank evaluates (and rank 0 checkpoints) rank 0's BatchNorm statistics
        model.eval()
        test = loop.evaluate(model, data, "test", cfg.data.eval_batch_size, device, cfg.data.num_workers)
        now = time.perf_counter() - t_start
        if epoch + 1 == cfg.sample.epochs:
            window_s = now
        record = {"stage": "sgd", "epoch": epoch + 1, "epochs": cfg.sgd.epochs,
                  "train_loss": sum(epoch_losses) / max(len(epoch_losses), 1), "test_loss": test["loss"],
                  "test_acc": test["acc"], "elapsed_s": now, "num_snapshots": len(index)}
        history.append(record)
        ckpt_state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "step": step,
                      "history": history, "elapsed": now, "window_s": window_s, "num_snapshots": len(index),
                      "step_losses": step_losses}
        # the whole history only in the last report (what fit() returns), not in every epoch's
        last = epoch + 1 == cfg.sgd.epochs
        metrics = {**record, "window_s": window_s,
                   **({"history": history, "step_losses": step_losses} if last else {})}
        if rank == 0 and progress is not None:
            progress.put(record)
        loop.report(metrics, ckpt_state if rank == 0 else None)
        loop.maybe_inject_failure(run, epoch + 1, config.get("fail_after_epoch"))


def run_sample(cfg: Config, run: RunDir, printer, resume: bool = False) -> Dict[str, Any]:
    """Driver side: write θ0, run the sampler on Ray Train, assemble the manifest's trajectory section.

    Returns:
        {"history", "step_losses", "window_s", "wall_s", "num_snapshots", "blocks", "shards"}.
    Raises:
        DivergedError: the SGD loss or parameters became non-finite (no non-finite snapshot was written).
    """
    from raysub.engine.cluster import fit_with_progress, make_progress_queue, torch_trainer, unwrap_train_error

    progress = make_progress_queue()
    loop_config = {"cfg": cfg.to_dict(), "progress": progress,
                   "fail_after_epoch": os.environ.get("RAYSUB_FAIL_AFTER_EPOCH")}
    trainer = torch_trainer(sample_loop, loop_config, cfg, "sample", run.storage_path)
    t0 = time.perf_counter()
    try:
        result = fit_with_progress(trainer, progress, printer)
    except Exception as exc:
        raise unwrap_train_error(exc)
    wall = time.perf_counter() - t0
    metrics = result.metrics
    if metrics.get("diverged"):
        raise DivergedError(loop.divergence_message("SGD sampling", metrics["diverged"],
                                                    f"lower sgd.lr (now {cfg.sgd.lr:g}) and rerun with --overwrite"))
    blocks, shards = collect_trajectory(run)
    return {"history": metrics["history"], "step_losses": metrics["step_losses"], "window_s": metrics["window_s"],
            "wall_s": wall,
            "num_snapshots": len(blocks[0]["snapshots"]), "blocks": blocks, "shards": shards}


def collect_trajectory(run: RunDir, shards=None):
    """Read every block's index (verified against ``shards``, the manifest's checksums, when given); check all
    blocks hold the same snapshots. Returns (blocks, {path: sha256} of every snapshot and index).

    Raises:
        StorageError: an index missing from the manifest, corrupted, not valid JSON or not a block index; blocks
            that disagree.
    """
    from raysub.errors import StorageError
    from raysub.storage import sha256

    names = [d for d in run.listdir("trajectory") if d.startswith("block_")]
    if not names:
        raise StorageError(f"{run.path('trajectory')} holds no trajectory blocks: run 'raysub sample' (or resample "
                           f"with --overwrite)")
    blocks, sums = [], {}
    for d in names:
        rel = f"trajectory/{d}/index.json"
        if shards is not None and rel not in shards:
            raise StorageError(f"{run.path(rel)} has no checksum in the manifest: resample with --overwrite")
        index = run.read_json(rel, None if shards is None else shards[rel])
        if not (isinstance(index, dict) and isinstance(index.get("snapshots"), list)
                and all(k in index for k in ("block", "start", "stop"))):
            raise StorageError(f"{run.path(rel)} is not a trajectory block index (block, start, stop, snapshots): "
                               f"resample with --overwrite")
        sums[rel] = shards[rel] if shards is not None else sha256(run.read_bytes(rel))
        blocks.append(index)
    counts = {len(b["snapshots"]) for b in blocks}
    if len(counts) != 1:
        raise StorageError(f"trajectory blocks in {run.path('trajectory')} disagree on the number of snapshots "
                           f"{sorted(counts)}: resample with --overwrite")
    sums.update({s["path"]: s["sha256"] for b in blocks for s in b["snapshots"]})
    return blocks, sums
