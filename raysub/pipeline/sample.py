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
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List

import torch

from raysub.engine import loop
from raysub.config import Config
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
    model.load_state_dict(run.read_torch("theta0.pt"))  # every rank starts from the same θ0
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
                    write_snapshot(run, flatten_params(model), rank, bounds, snap_at[step], step, epoch + 1, index)
        epoch_losses = loop.global_step_losses(losses)
        step_losses.extend(epoch_losses)
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
        {"history", "window_s", "wall_s", "num_snapshots", "blocks", "shards"}.
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
    blocks, shards = collect_trajectory(run)
    return {"history": metrics["history"], "step_losses": metrics["step_losses"], "window_s": metrics["window_s"],
            "wall_s": wall,
            "num_snapshots": len(blocks[0]["snapshots"]), "blocks": blocks, "shards": shards}


def collect_trajectory(run: RunDir):
    """Read every block's index; check all blocks hold the same snapshots. Returns (blocks, {path: sha256})."""
    from raysub.errors import StorageError

    names = [d for d in run.listdir("trajectory") if d.startswith("block_")]
    blocks = [run.read_json(f"trajectory/{d}/index.json") for d in names]
    counts = {len(b["snapshots"]) for b in blocks}
    if len(counts) != 1:
        raise StorageError(f"trajectory blocks in {run.path('trajectory')} disagree on the number of snapshots "
                           f"{sorted(counts)}: resample with --overwrite")
    shards = {s["path"]: s["sha256"] for b in blocks for s in b["snapshots"]}
    return blocks, shards
