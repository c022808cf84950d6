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
from typing import Any, Dict, List, Optional

import torch

from raysub.engine import loop
from raysub.config import Config
from raysub.errors import ConfigError, DivergedError
from raysub.storage import RunDir, block_bounds, block_index_rel, decode_vector, encode_vector, snapshot_rel


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
    s = cfg.sample
    if s.stop not in ("fixed", "adaptive"):
        problems.append(f"sample.stop={s.stop!r}: choose fixed or adaptive")
    if s.stop == "adaptive" and not s.stream_gram:
        problems.append("sample.stop=adaptive reads the streaming Gram: set sample.stream_gram=true")
    if s.write_basis and not s.stream_gram:
        problems.append("sample.write_basis=true needs the streaming Gram: set sample.stream_gram=true")
    if not 0 < s.stop_threshold < 1:
        problems.append(f"sample.stop_threshold={s.stop_threshold}: must be in (0, 1) (the reach residual's "
                        f"relative fall per epoch below which the window ends; 0.05 is the measured default)")
    if s.stop_patience < 1:
        problems.append(f"sample.stop_patience={s.stop_patience}: must be ≥ 1")
    if s.min_snapshots < 0:
        problems.append(f"sample.min_snapshots={s.min_snapshots}: must be ≥ 0 (0: basis.dim + 1)")
    elif 0 < s.min_snapshots <= cfg.basis.dim:
        problems.append(f"sample.min_snapshots={s.min_snapshots} must exceed basis.dim={cfg.basis.dim} (the window "
                        f"needs d + 1 snapshots): raise it, or 0 for basis.dim + 1")
    if not s.stream_gram_budget_mb > 0:
        problems.append(f"sample.stream_gram_budget_mb={s.stream_gram_budget_mb}: must be > 0")
    return problems


def min_window_snapshots(cfg: Config) -> int:
    return cfg.sample.min_snapshots or cfg.basis.dim + 1


def write_snapshot(run: RunDir, flat_N: torch.Tensor, block: int, bounds, snap: int, step: int, epoch: int,
                   index: List[Dict[str, Any]]) -> str:
    """Write block ``block`` of the flat vector as snapshot ``snap`` and rewrite the block's index; returns the
    index's sha256.

    ``index`` is this block's snapshot list; entries from ``snap`` on are replaced (a resumed run rewrites them).
    """
    start, stop = bounds[block]
    values = flat_N[start:stop].detach().to("cpu", torch.float32).numpy()
    rel = snapshot_rel(block, snap)
    checksum = run.write_bytes(rel, encode_vector(values, {"snapshot": snap, "step": step, "block": block}))
    del index[snap:]
    index.append({"snapshot": snap, "step": step, "epoch": epoch, "path": rel, "sha256": checksum})
    return write_index(run, block, bounds, index)


def write_index(run: RunDir, block: int, bounds, index: List[Dict[str, Any]]) -> str:
    """Write block ``block``'s index of snapshots; returns its sha256 (which the driver commits)."""
    start, stop = bounds[block]
    return run.write_json(block_index_rel(block), {"block": block, "start": start, "stop": stop, "snapshots": index})


def _window_check(stream, signals: List[Dict[str, Any]], epoch: int, cfg: Config) -> Dict[str, Any]:
    """The stopping signal at the end of ``epoch`` (every rank alike: the same Gram); appended to ``signals``.

    reach_residual: the latest snapshot against the top-d subspace of the snapshots up to the previous check;
    residual_drop: its fall relative to the previous check's value (`raysub.pipeline.stream_gram` module doc).
    """
    from raysub.pipeline.stream_gram import reach_residual, subspace_drift

    t = stream.count
    prev = signals[-1]["num_snapshots"] if signals else 1
    record: Dict[str, Any] = {"epoch": epoch, "num_snapshots": t, "reach_residual": None, "residual_drop": None,
                              "max_angle_deg": None, "mean_cos2": None}
    if prev >= 2 and t > prev:
        K = stream.gram
        r = reach_residual(K, prev, t - 1, cfg.basis.dim)
        record["reach_residual"] = r
        before = signals[-1].get("reach_residual") if signals else None
        if r is not None and before:
            record["residual_drop"] = (before - r) / before
        record.update(subspace_drift(K, prev, t, cfg.basis.dim))
    signals.append(record)
    return record


def full_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of the full-parameter run (``sgd.optimizer``) over the model's trainable parameters.

    Frozen parameters (``requires_grad`` False, e.g. the base weights of a low-rank reparametrised model) are
    left out, so the optimizer can never step or decay them and its checkpointed state covers only what trains.
    With every parameter trainable, SGD gets them in ``model.parameters()`` order, as before the option existed,
    so such runs are bit-identical.

    Args:
        cfg: The run config (``sgd.optimizer``, ``sgd.lr``, ``sgd.momentum``, ``sgd.weight_decay``).
        model: The model to train.

    Returns:
        torch.optim.SGD (heavy-ball momentum) or torch.optim.AdamW (betas (0.9, 0.999); momentum unused).

    Raises:
        ConfigError: an unknown ``sgd.optimizer`` (the schema check refuses it before a run starts).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.sgd.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.sgd.lr, momentum=cfg.sgd.momentum, weight_decay=cfg.sgd.weight_decay)
    if cfg.sgd.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.sgd.lr, betas=(0.9, 0.999), weight_decay=cfg.sgd.weight_decay)
    raise ConfigError(f"sgd.optimizer={cfg.sgd.optimizer!r}: choose sgd or adamw")


def sample_loop(config: Dict[str, Any]) -> None:
    """Per-worker loop (Ray Train). ``config``: {"cfg": Config dict, "progress": Queue or None,
    "stream_gram": whether to build the streaming Gram (the driver's budget decision), "basis_prefix",
    "lock_token": the driver's lock token (`raysub.lock.fence` before every write into the run)}.

    The last report carries ``written``: {path: sha256} of every index, ``model.pt``, the streamed Gram and
    spectrum, as their writers computed them."""
    from torch.nn.parallel import DistributedDataParallel

    from raysub.lock import fence

    from raysub.engine.flat import flatten_params

    from raysub.data import open_dataset
    from raysub.engine.compute import Compute
    from raysub.models import model_for
    from raysub.pipeline.stream_gram import StreamGram, close_window, stop_decision

    ctx = loop.worker_context(config)
    cfg, progress, rank, world, device, run = ctx.cfg, ctx.progress, ctx.rank, ctx.world, ctx.device, ctx.run
    data = open_dataset(cfg)
    model = model_for(cfg, data, init=False)  # θ0 (init_from's weights included) is loaded next
    model.load_state_dict(run.read_theta0())  # every rank starts from the same θ0 (verified)
    model.to(device)
    compute = Compute.of(cfg, device)  # bf16 autocast, channels_last (the snapshots stay in the logical order)
    compute.prepare_model(model)
    ddp = DistributedDataParallel(model) if world > 1 else model
    opt = full_optimizer(cfg, model)

    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bounds = block_bounds(n, world)
    lo, hi = bounds[rank]
    steps_per_epoch = data.size("train") // cfg.data.batch_size
    snap_at = {s: i + 1 for i, s in enumerate(snapshot_steps(cfg, steps_per_epoch))}
    index: List[Dict[str, Any]] = []
    adaptive = cfg.sample.stop == "adaptive"
    stream = (StreamGram(num_snapshots(cfg, steps_per_epoch), hi - lo, device, loop.all_reduce_sum_)
              if config.get("stream_gram") else None)
    signals: List[Dict[str, Any]] = []
    token = config.get("lock_token")
    own_index = block_index_rel(rank)
    written: Dict[str, str] = {}  # {path: sha256} of this rank's latest writes (rank 0's are checkpointed)

    def take_snapshot(flat_N, snap, step, epoch):
        fence(run, token)  # one small read per snapshot: a command whose lock was taken over writes nothing more
        written[own_index] = write_snapshot(run, flat_N, rank, bounds, snap, step, epoch, index)
        if stream is not None:
            stream.add(flat_N[lo:hi])

    state = loop.load_checkpoint()
    if loop.resumed_divergence(state, rank):
        return
    if state is None:
        start_epoch, step, history, elapsed, step_losses = 0, 0, [], 0.0, []
        window_s, window_epochs = None, None
        take_snapshot(flatten_params(model), 0, 0, 0)
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step, history, elapsed = state["epoch"], state["step"], state["history"], state["elapsed"]
        window_s, step_losses = state["window_s"], state["step_losses"]
        window_epochs = state.get("window_epochs", cfg.sample.epochs if start_epoch >= cfg.sample.epochs else None)
        signals = state.get("signals", [])
        index = run.read_json(own_index)["snapshots"][: state["num_snapshots"]]
        written.update(state.get("written") or {})
        fence(run, token)
        written[own_index] = write_index(run, rank, bounds, index)  # its digest from its writer, this process
        if stream is not None:  # the Gram from the checkpoint; this rank's block reread from its verified shards
            stream.load_state_dict(state["stream"], (decode_vector(run.read_buffer(s["path"], s["sha256"]))
                                                     for s in index))
    # the stage ends with the window when there is no baseline beyond it (sgd.epochs = sample.epochs)
    baseline = cfg.sgd.epochs > cfg.sample.epochs

    t_start = time.perf_counter() - elapsed
    loop.publish_pid(start_epoch, config.get("pid_dir"))  # testing hook (RAYSUB_PID_DIR): a kill -9 target
    # a restart after the stage's last epoch (an adaptive window that ended it early included) trains no more
    finished = state is not None and (start_epoch >= cfg.sgd.epochs or (window_epochs is not None and not baseline))
    for epoch in range(start_epoch, cfg.sgd.epochs if not finished else start_epoch):
        in_window = window_epochs is None
        for group in opt.param_groups:
            group["lr"] = loop.lr_at(epoch, cfg.sgd.lr, cfg.sgd.lr_milestones, cfg.sgd.lr_gamma)
        model.train()
        losses = []
        finite = True  # the parameters; identical on every rank, so every rank stops at the same step
        batches = loop.epoch_batches(data.size("train"), cfg.data.batch_size, cfg.seed, epoch, rank, world)
        for i, (x, y) in enumerate(data.batches("train", batches, augment=cfg.data.augment,
                                                 seed=loop.mix_seed(cfg.seed, epoch), num_workers=cfg.data.num_workers)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = torch.nn.functional.cross_entropy(compute.forward(ddp, x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.detach())
            if in_window and step in snap_at:
                with torch.no_grad():
                    flat_N = flatten_params(model)
                    finite = bool(torch.isfinite(flat_N).all())
                    if not finite:
                        break
                    take_snapshot(flat_N, snap_at[step], step, epoch + 1)
        epoch_losses = loop.global_step_losses(losses)
        if finite:
            with torch.no_grad():
                finite = bool(torch.isfinite(flatten_params(model)).all())
        diverged = loop.divergence("sample", epoch + 1, step - len(losses), epoch_losses, finite)
        if diverged is not None:
            loop.report_divergence({"diverged": diverged}, rank)
            return
        step_losses.extend(epoch_losses)
        signal = None
        if in_window:
            if stream is not None:
                signal = _window_check(stream, signals, epoch + 1, cfg)
            closes = epoch + 1 == cfg.sample.epochs or (
                adaptive and _decide(stop_decision(signals, cfg.sample.stop_threshold, cfg.sample.stop_patience,
                                                   min_window_snapshots(cfg), len(index)), device))
            if closes:
                window_epochs = epoch + 1
                if signal is not None:
                    signal["stop"] = True
                if stream is not None:
                    fence(run, token)
                    written.update(close_window(run, stream, rank, bounds, cfg, config.get("basis_prefix")) or {})
        loop.broadcast_buffers_(model)  # every rank evaluates (and rank 0 checkpoints) rank 0's BatchNorm statistics
        model.eval()
        test = loop.evaluate(compute.forward_fn(model), data, "test", cfg.data.eval_batch_size, device,
                             cfg.data.num_workers)
        now = time.perf_counter() - t_start
        if in_window and window_epochs is not None:
            window_s = now
        last = epoch + 1 == cfg.sgd.epochs or (window_epochs is not None and not baseline)
        record = {"stage": "sgd", "epoch": epoch + 1, "epochs": cfg.sgd.epochs,
                  "train_loss": sum(epoch_losses) / max(len(epoch_losses), 1), "test_loss": test["loss"],
                  "test_acc": test["acc"], "elapsed_s": now, "num_snapshots": len(index)}
        if signal is not None:
            record["stop_signal"] = signal
        history.append(record)
        if last:
            if rank == 0:  # the trained model, which `train.init_from` of another run reads (the driver commits it)
                fence(run, token)
                written["model.pt"] = run.write_torch("model.pt", model.state_dict())
            reported = {**written, **_gather({own_index: written[own_index]})}
        ckpt_state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "step": step,
                      "history": history, "elapsed": now, "window_s": window_s, "num_snapshots": len(index),
                      "step_losses": step_losses, "window_epochs": window_epochs, "signals": signals,
                      "stream": stream.state_dict() if stream is not None else None, "written": dict(written)}
        # the whole history only in the last report (what fit() returns), not in every epoch's
        metrics = {**record, "window_s": window_s, "window_epochs": window_epochs,
                   **({"history": history, "step_losses": step_losses, "signals": signals, "written": reported}
                      if last else {})}
        if rank == 0 and progress is not None:
            progress.put(record)
        if rank == 0:
            fence(run, token)  # the checkpoint lands in RUN/checkpoints
        loop.report(metrics, ckpt_state if rank == 0 else None)
        loop.maybe_inject_failure(run, epoch + 1, config.get("fail_after_epoch"))
        loop.publish_pid(epoch + 1, config.get("pid_dir"), config.get("pause_after_epoch"))
        if last:
            break


def _gather(mine: Dict[str, str]) -> Dict[str, str]:
    """Every rank's ``mine`` merged (one all_gather of a few strings, at the end): each block's index digest
    reaches the driver through rank 0's report."""
    from raysub.engine.loop import dist_ready

    if not dist_ready() or torch.distributed.get_world_size() == 1:
        return dict(mine)
    every: List[Optional[Dict[str, str]]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return {k: v for d in every for k, v in (d or {}).items()}


def _decide(flag: bool, device) -> bool:
    """Rank 0's decision, on every rank (one all-reduce): ranks on other hardware could round an eigh apart."""
    rank, _ = loop.rank_world()
    t = torch.tensor([1.0 if (flag and rank == 0) else 0.0], device=device)
    loop.all_reduce_sum_(t)
    return bool(t.item() > 0.5)


def stream_plan(cfg: Config, num_params: int, num_snaps: int) -> Optional[str]:
    """Why the streaming Gram is off for this run (None: it is on). Refuses when ``sample.stop=adaptive`` or
    ``sample.write_basis`` needs it and it does not fit its budget.

    Raises:
        ConfigError: the adaptive window or the rank-written basis cannot have its streaming Gram.
    """
    from raysub.pipeline.stream_gram import budget_refusal

    if not cfg.sample.stream_gram:
        return "sample.stream_gram=false"
    bounds = block_bounds(num_params, cfg.cluster.num_workers)
    widest = max(hi - lo for lo, hi in bounds)
    why = budget_refusal(num_snaps, widest, cfg.sample.stream_gram_budget_mb)
    if why is not None and (cfg.sample.stop == "adaptive" or cfg.sample.write_basis):
        needs = "sample.stop=adaptive" if cfg.sample.stop == "adaptive" else "sample.write_basis=true"
        raise ConfigError(f"{needs} needs the streaming Gram, but {why}: raise the budget, add workers "
                          f"(cluster.num_workers) or sample fewer snapshots")
    return why


def run_sample(cfg: Config, run: RunDir, printer, resume: bool = False, num_params: Optional[int] = None,
               num_snaps: Optional[int] = None, basis_prefix: Optional[str] = None) -> Dict[str, Any]:
    """Driver side: run the sampler on Ray Train (θ0 already written), assemble the manifest's trajectory section.

    Args:
        num_params, num_snaps: the plan's sizes (for the streaming Gram's budget).
        basis_prefix: with ``sample.write_basis``, the basis generation directory the ranks write into.
    Returns:
        {"history", "step_losses", "window_s", "window_epochs", "wall_s", "num_snapshots", "blocks", "shards",
        "stream_gram" (None, or {"path", "sha256"}), "stream_off" (why it is off, or None), "signals"}.
    Raises:
        DivergedError: the SGD loss or parameters became non-finite (no non-finite snapshot was written).
    """
    from raysub.engine.cluster import fit_with_progress, make_progress_queue, torch_trainer, unwrap_train_error
    from raysub.lock import fence, token_of
    from raysub.tracking import train_callbacks

    off = stream_plan(cfg, num_params, num_snaps) if num_params is not None else "sample.stream_gram=false"
    if off is not None and cfg.sample.stream_gram:
        printer(f"[sample] {off}: falling back to the post-hoc Gram in the basis stage")
    progress = make_progress_queue()
    loop_config = {"cfg": cfg.to_dict(), "progress": progress, "stream_gram": off is None, "lock_token": token_of(run),
                   "basis_prefix": basis_prefix if off is None and cfg.sample.write_basis else None,
                   "fail_after_epoch": os.environ.get("RAYSUB_FAIL_AFTER_EPOCH"),
                   "pid_dir": os.environ.get("RAYSUB_PID_DIR"),  # testing hooks for real kills (loop.publish_pid)
                   "pause_after_epoch": os.environ.get("RAYSUB_PAUSE_AFTER_EPOCH")}
    trainer = torch_trainer(sample_loop, loop_config, cfg, "sample", run.ray_storage("checkpoints"),
                            callbacks=train_callbacks(cfg, run, "sample"))  # live curves (raysub.tracking)
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
    fence(run)  # a command whose lock was taken over while the workers ran reads and writes nothing more
    # the writers' own digests, never a re-read's (another command's file would be committed as this one's); every
    # index is verified against its writer's digest before its snapshots' checksums are taken from it
    written = metrics.get("written") or {}
    blocks, shards = collect_trajectory(run, {k: v for k, v in written.items() if k.endswith("/index.json")})
    shards["model.pt"] = _reported(run, written, "model.pt")

    from raysub.pipeline.stream_gram import GRAM_REL

    gram = None
    if off is None:
        gram = {"path": GRAM_REL, "sha256": _reported(run, written, GRAM_REL)}
        shards[GRAM_REL] = gram["sha256"]
    basis = None
    prefix = loop_config["basis_prefix"]
    if prefix and f"{prefix}/spectrum.json" in written:
        record = run.read_json(f"{prefix}/spectrum.json", written[f"{prefix}/spectrum.json"])
        record["sha256"] = written[f"{prefix}/spectrum.json"]
        basis = (prefix, record)
    return {"history": metrics["history"], "step_losses": metrics["step_losses"], "window_s": metrics["window_s"],
            "window_epochs": metrics.get("window_epochs") or cfg.sample.epochs, "wall_s": wall,
            "num_snapshots": len(blocks[0]["snapshots"]), "blocks": blocks, "shards": shards,
            "stream_gram": gram, "stream_off": off, "signals": metrics.get("signals", []), "basis": basis}


def _reported(run: RunDir, written: Dict[str, str], rel: str) -> str:
    """The sha256 of ``rel`` as the worker that wrote it reported it."""
    from raysub.errors import StorageError

    if rel not in written:
        raise StorageError(f"the sampler reported no checksum for {run.path(rel)} (a checkpoint of an older raysub): "
                           f"resample with --overwrite")
    return written[rel]


def collect_trajectory(run: RunDir, shards=None, layout=None):
    """Read every block's index (verified against ``shards``, the manifest's checksums, when given); check all
    blocks hold the same snapshots. Returns (blocks, {path: sha256} of every snapshot and index).

    With ``shards`` the blocks are those the manifest lists — ``layout`` (its ``blocks``: block, start, stop)
    and its ``trajectory/block_BBB/index.json`` entries — never just the directories that happen to exist: each
    must be there with every snapshot its index names (checked by listing, before a snapshot is read), a
    directory the manifest does not list is refused, and the blocks must be the layout's (without one: cover
    the parameter vector from 0 without a gap). Without ``shards`` the blocks are the directories (the
    sampler, right after writing them).

    Raises:
        StorageError: a listed block or snapshot missing; an index missing from the manifest, corrupted, not
            valid JSON or not a block index; blocks that disagree, leave a gap or differ from the layout.
    """
    import re

    from raysub.errors import StorageError
    from raysub.storage import sha256

    resample = f"resample with 'raysub sample {run.arg('config.yaml')} --overwrite'"
    present = [d for d in run.listdir("trajectory") if d.startswith("block_")]
    names = present
    if shards is not None:  # an unlisted directory among them is refused below: its index has no checksum
        listed = {rel.split("/")[1] for rel in shards if re.fullmatch(r"trajectory/block_\d+/index\.json", rel)}
        listed |= {f"block_{b['block']:03d}" for b in layout or ()}
        names = sorted(listed | set(present))
    if not names:
        raise StorageError(f"{run.path('trajectory')} holds no trajectory blocks: run 'raysub sample' (or resample "
                           f"with --overwrite)")
    blocks, sums = [], {}
    for d in names:
        if d not in present:
            raise StorageError(f"{run.path('trajectory', d)} is missing, one of the {len(names)} trajectory blocks "
                               f"the manifest lists: restore it, or {resample}")
        rel = f"trajectory/{d}/index.json"
        if shards is not None and rel not in shards:
            raise StorageError(f"{run.path(rel)} has no checksum in the manifest: resample with --overwrite")
        index = run.read_json(rel, None if shards is None else shards[rel])
        if not (isinstance(index, dict) and isinstance(index.get("snapshots"), list)
                and all(k in index for k in ("block", "start", "stop"))):
            raise StorageError(f"{run.path(rel)} is not a trajectory block index (block, start, stop, snapshots): "
                               f"resample with --overwrite")
        if shards is not None:
            files = {f"trajectory/{d}/{name}" for name in run.listdir("trajectory", d)}
            gone = [s["path"] for s in index["snapshots"] if s["path"] not in files]
            if gone:
                raise StorageError(f"{run.path(gone[0])} is missing ({len(gone)} of the {len(index['snapshots'])} "
                                   f"snapshots of {d}): restore it, or {resample}")
        sums[rel] = shards[rel] if shards is not None else sha256(run.read_bytes(rel))
        blocks.append(index)
    counts = {len(b["snapshots"]) for b in blocks}
    if len(counts) != 1:
        raise StorageError(f"trajectory blocks in {run.path('trajectory')} disagree on the number of snapshots "
                           f"{sorted(counts)}: resample with --overwrite")
    if shards is not None:
        edge = 0
        for i, b in enumerate(sorted(blocks, key=lambda b: b["block"])):
            want = layout[i] if layout is not None and i < len(layout) else {"block": i, "start": edge}
            if any(b[k] != v for k, v in want.items() if k in ("block", "start", "stop")):
                raise StorageError(f"the trajectory blocks the manifest of {run.uri} lists do not cover the parameter "
                                   f"vector as its layout does (block {i}, from coordinate {edge}): {resample}")
            edge = b["stop"]
        if layout is not None and len(blocks) != len(layout):
            raise StorageError(f"the manifest of {run.uri} lays the parameters out in {len(layout)} blocks but lists "
                               f"{len(blocks)} trajectory blocks: {resample}")
    sums.update({s["path"]: s["sha256"] for b in blocks for s in b["snapshots"]})
    return blocks, sums
