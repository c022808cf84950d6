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

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from raysub import faults
from raysub.config import Config
from raysub.data import open_dataset
from raysub.engine import loop
from raysub.engine.compute import Compute
from raysub.engine.flat import flatten_params
from raysub.errors import ConfigError, DivergedError
from raysub.lock import fence
from raysub.models import model_for
# the module, not its names: looked up at each call (tests replace stop_decision/close_window); not through the
# package (`from raysub.pipeline import ...` runs pipeline/__init__, which imports the driver: a cycle)
import raysub.pipeline.stream_gram as stream_gram
# the section's schedule: used below
from raysub.pipeline.sample_plan import (
    min_window_snapshots,
    num_snapshots,
    snapshot_steps,
    stream_plan,
)
# the trajectory's files: used below, and `collect_trajectory`/`write_snapshot` re-exported for their ~12 importers
from raysub.pipeline.trajectory import collect_trajectory, write_index, write_snapshot
from raysub.storage import RunDir, block_bounds, block_index_rel, decode_vector
from raysub.lock import token_of
from raysub.pipeline.stream_gram import GRAM_REL
from raysub.errors import StorageError


def window_check(stream, signals: List[Dict[str, Any]], epoch: int, cfg: Config) -> Dict[str, Any]:
    """The stopping signal at the end of ``epoch`` (every rank alike: the same Gram); appended to ``signals``.

    reach_residual: the latest snapshot against the top-d subspace of the snapshots up to the previous check;
    residual_drop: its fall relative to the previous check's value (`raysub.pipeline.stream_gram` module doc).
    """
    t = stream.count
    prev = signals[-1]["num_snapshots"] if signals else 1
    record: Dict[str, Any] = {"epoch": epoch, "num_snapshots": t, "reach_residual": None, "residual_drop": None,
                              "max_angle_deg": None, "mean_cos2": None}
    if prev >= 2 and t > prev:
        K = stream.gram
        r = stream_gram.reach_residual(K, prev, t - 1, cfg.basis.dim)
        record["reach_residual"] = r
        before = signals[-1].get("reach_residual") if signals else None
        if r is not None and before:
            record["residual_drop"] = (before - r) / before
        record.update(stream_gram.subspace_drift(K, prev, t, cfg.basis.dim))
    signals.append(record)
    return record


# public for the benchmark of the streaming Gram's cost (raysub.bench.basis_costs)


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


@dataclass
class _Sampler:
    """One worker's sampling run: what `sample_loop` sets up, and the trajectory block it writes."""

    cfg: Config
    run: RunDir
    rank: int
    world: int
    device: torch.device
    data: Any  # a raysub.data dataset
    model: torch.nn.Module
    ddp: torch.nn.Module  # the model, wrapped in DistributedDataParallel when world > 1
    opt: torch.optim.Optimizer
    compute: Compute
    bounds: Any  # every rank's (start, stop) of the flat vector
    snap_at: Dict[int, int]  # global step → snapshot number
    stream: Optional[stream_gram.StreamGram]
    token: Optional[str]  # the driver's lock token: `fence` before every write into the run
    basis_prefix: Optional[str]
    index: List[Dict[str, Any]] = field(default_factory=list)  # this block's snapshots
    written: Dict[str, str] = field(default_factory=dict)  # {path: sha256} of this rank's latest writes
    signals: List[Dict[str, Any]] = field(default_factory=list)  # the window's stopping signals

    @property
    def own_index(self) -> str:
        return block_index_rel(self.rank)

    def take_snapshot(self, flat_N: torch.Tensor, snap: int, step: int, epoch: int) -> None:
        """Write this rank's block of ``flat_N`` as snapshot ``snap`` (and add it to the streamed Gram)."""
        fence(self.run, self.token)  # one small read per snapshot: a command whose lock was taken over writes no more
        self.written[self.own_index] = write_snapshot(self.run, flat_N, self.rank, self.bounds, snap, step, epoch,
                                                      self.index)
        if self.stream is not None:
            lo, hi = self.bounds[self.rank]
            self.stream.add(flat_N[lo:hi])


def _setup(ctx: loop.WorkerContext, config: Dict[str, Any]) -> _Sampler:
    """The dataset, the model from θ0 (DDP-wrapped), the optimizer, this rank's block and the streamed Gram."""
    cfg, rank, world, device, run = ctx.cfg, ctx.rank, ctx.world, ctx.device, ctx.run
    data = open_dataset(cfg)
    model = model_for(cfg, data, init=False)  # θ0 (init_from's weights included) is loaded next
    model.load_state_dict(run.read_theta0())  # every rank starts from the same θ0 (verified)
    model.to(device)
    compute = Compute.of(cfg, device)  # bf16 autocast, channels_last (the snapshots stay in the logical order)
    compute.prepare_model(model)
    ddp = DistributedDataParallel(model) if world > 1 else model
    opt = full_optimizer(cfg, model)
    bounds = block_bounds(sum(p.numel() for p in model.parameters() if p.requires_grad), world)
    lo, hi = bounds[rank]
    steps_per_epoch = data.size("train") // cfg.data.batch_size
    snap_at = {s: i + 1 for i, s in enumerate(snapshot_steps(cfg, steps_per_epoch))}
    stream = (stream_gram.StreamGram(num_snapshots(cfg, steps_per_epoch), hi - lo, device, loop.all_reduce_sum_)
              if config.get("stream_gram") else None)
    return _Sampler(cfg, run, rank, world, device, data, model, ddp, opt, compute, bounds, snap_at, stream,
                    config.get("lock_token"), config.get("basis_prefix"))


def _restore(s: _Sampler, state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The loop's progress from ``state`` (the checkpoint Ray hands this run: model, optimizer, this block's index
    and the streamed Gram restored in place), or a fresh start (snapshot 0, θ0, written).

    Returns {"epoch", "step", "history", "elapsed", "step_losses", "window_s", "window_epochs"}; ``window_epochs``
    is None while the window is open."""
    cfg = s.cfg
    if state is None:
        s.take_snapshot(flatten_params(s.model), 0, 0, 0)
        return {"epoch": 0, "step": 0, "history": [], "elapsed": 0.0, "step_losses": [], "window_s": None,
                "window_epochs": None}
    s.model.load_state_dict(state["model"])
    s.opt.load_state_dict(state["optimizer"])
    s.signals = state.get("signals", [])
    s.index = s.run.read_json(s.own_index)["snapshots"][: state["num_snapshots"]]
    s.written.update(state.get("written") or {})
    fence(s.run, s.token)
    s.written[s.own_index] = write_index(s.run, s.rank, s.bounds, s.index)  # its digest from its writer, this process
    if s.stream is not None:  # the Gram from the checkpoint; this rank's block reread from its verified shards
        s.stream.load_state_dict(state["stream"], (decode_vector(s.run.read_buffer(x["path"], x["sha256"]))
                                                   for x in s.index))
    window_epochs = state.get("window_epochs", cfg.sample.epochs if state["epoch"] >= cfg.sample.epochs else None)
    return {"epoch": state["epoch"], "step": state["step"], "history": state["history"],
            "elapsed": state["elapsed"], "step_losses": state["step_losses"], "window_s": state["window_s"],
            "window_epochs": window_epochs}


def _sgd_epoch(s: _Sampler, epoch: int, step: int, in_window: bool):
    """One epoch of SGD steps in the run's data order, snapshotting inside the window. Stops at the first
    non-finite snapshot (none is written). Returns (global step losses, the global step count, whether the
    parameters are finite)."""
    cfg, model = s.cfg, s.model
    for group in s.opt.param_groups:
        group["lr"] = loop.lr_at(epoch, cfg.sgd.lr, cfg.sgd.lr_milestones, cfg.sgd.lr_gamma)
    model.train()
    losses = []
    finite = True  # the parameters; identical on every rank, so every rank stops at the same step
    batches = loop.epoch_batches(s.data.size("train"), cfg.data.batch_size, cfg.seed, epoch, s.rank, s.world)
    for x, y in s.data.batches("train", batches, augment=cfg.data.augment, seed=loop.mix_seed(cfg.seed, epoch),
                               num_workers=cfg.data.num_workers):
        x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(s.compute.forward(s.ddp, x), y)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.opt.step()
        step += 1
        losses.append(loss.detach())
        faults.at_step(s.run, step)
        if in_window and step in s.snap_at:
            with torch.no_grad():
                flat_N = flatten_params(model)
                finite = bool(torch.isfinite(flat_N).all())
                if not finite:
                    break
                s.take_snapshot(flat_N, s.snap_at[step], step, epoch + 1)
    epoch_losses = loop.global_step_losses(losses)
    if finite:
        with torch.no_grad():
            finite = bool(torch.isfinite(flatten_params(model)).all())
    return epoch_losses, step, finite


def _end_window_epoch(s: _Sampler, epoch: int):
    """At the end of a window epoch: its stopping signal (None without the streamed Gram) and whether the window
    closes here — its last epoch, or the adaptive stop — in which case the streamed Gram (and, with
    ``sample.write_basis``, the basis) is written. Returns (signal, closes)."""
    cfg = s.cfg
    signal = window_check(s.stream, s.signals, epoch + 1, cfg) if s.stream is not None else None
    closes = epoch + 1 == cfg.sample.epochs or (
        cfg.sample.stop == "adaptive"
        and _decide(stream_gram.stop_decision(s.signals, cfg.sample.stop_threshold, cfg.sample.stop_patience,
                                              min_window_snapshots(cfg), len(s.index)), s.device))
    if closes:
        if signal is not None:
            signal["stop"] = True
        if s.stream is not None:
            fence(s.run, s.token)
            s.written.update(stream_gram.close_window(s.run, s.stream, s.rank, s.bounds, cfg, s.basis_prefix) or {})
    return signal, closes


def _report_epoch(s: _Sampler, st: Dict[str, Any], record: Dict[str, Any], last: bool, progress) -> None:
    """Report the epoch with its checkpoint (rank 0's); the last report also writes ``model.pt`` and carries the
    whole history and every rank's ``written``."""
    if last:
        if s.rank == 0:  # the trained model, which `train.init_from` of another run reads (the driver commits it)
            fence(s.run, s.token)
            s.written["model.pt"] = s.run.write_torch("model.pt", s.model.state_dict())
        reported = {**s.written, **_gather({s.own_index: s.written[s.own_index]})}
    ckpt_state = {"model": s.model.state_dict(), "optimizer": s.opt.state_dict(), "epoch": record["epoch"],
                  "step": st["step"], "history": st["history"], "elapsed": record["elapsed_s"],
                  "window_s": st["window_s"], "num_snapshots": len(s.index), "step_losses": st["step_losses"],
                  "window_epochs": st["window_epochs"], "signals": s.signals,
                  "stream": s.stream.state_dict() if s.stream is not None else None, "written": dict(s.written)}
    # the whole history only in the last report (what fit() returns), not in every epoch's
    metrics = {**record, "window_s": st["window_s"], "window_epochs": st["window_epochs"],
               **({"history": st["history"], "step_losses": st["step_losses"], "signals": s.signals,
                   "written": reported} if last else {})}
    if s.rank == 0 and progress is not None:
        progress.put(record)
    if s.rank == 0:
        fence(s.run, s.token)  # the checkpoint lands in RUN/checkpoints
    loop.report(metrics, ckpt_state if s.rank == 0 else None)


def sample_loop(config: Dict[str, Any]) -> None:
    """Per-worker loop (Ray Train). ``config``: {"cfg": Config dict, "progress": Queue or None,
    "stream_gram": whether to build the streaming Gram (the driver's budget decision), "basis_prefix",
    "lock_token": the driver's lock token (`raysub.lock.fence` before every write into the run), "faults"}.

    A recipe: set up, restore the latest checkpoint, then for each epoch: SGD steps (snapshots inside the window),
    the divergence check, the window's end, evaluation, report with a checkpoint.

    The last report carries ``written``: {path: sha256} of every index, ``model.pt``, the streamed Gram and
    spectrum, as their writers computed them."""
    ctx = loop.worker_context(config)
    s = _setup(ctx, config)
    cfg = s.cfg
    state = loop.load_checkpoint()
    if loop.resumed_divergence(state, s.rank):
        return
    st = _restore(s, state)
    baseline = cfg.sgd.epochs > cfg.sample.epochs  # without it the stage ends with the window
    t_start = time.perf_counter() - st["elapsed"]
    faults.started(st["epoch"])  # testing hooks (`raysub.faults`): a kill -9 target
    # a restart after the stage's last epoch (an adaptive window that ended it early included) trains no more
    finished = state is not None and (st["epoch"] >= cfg.sgd.epochs or (st["window_epochs"] is not None
                                                                          and not baseline))
    for epoch in range(st["epoch"], cfg.sgd.epochs if not finished else st["epoch"]):
        in_window = st["window_epochs"] is None
        epoch_losses, step, finite = _sgd_epoch(s, epoch, st["step"], in_window)
        diverged = loop.divergence("sample", epoch + 1, st["step"], epoch_losses, finite)
        if diverged is not None:
            loop.report_divergence({"diverged": diverged}, s.rank)
            return
        st["step"] = step
        st["step_losses"].extend(epoch_losses)
        signal = None
        if in_window:
            signal, closes = _end_window_epoch(s, epoch)
            if closes:
                st["window_epochs"] = epoch + 1
        loop.broadcast_buffers_(s.model)  # every rank evaluates (and rank 0 checkpoints) rank 0's BatchNorm stats
        s.model.eval()
        test = loop.evaluate(s.compute.forward_fn(s.model), s.data, "test", cfg.data.eval_batch_size, s.device,
                             cfg.data.num_workers)
        now = time.perf_counter() - t_start
        if in_window and st["window_epochs"] is not None:
            st["window_s"] = now
        last = epoch + 1 == cfg.sgd.epochs or (st["window_epochs"] is not None and not baseline)
        record = {"stage": "sgd", "epoch": epoch + 1, "epochs": cfg.sgd.epochs,
                  "train_loss": sum(epoch_losses) / max(len(epoch_losses), 1), "test_loss": test["loss"],
                  "test_acc": test["acc"], "elapsed_s": now, "num_snapshots": len(s.index)}
        if signal is not None:
            record["stop_signal"] = signal
        st["history"].append(record)
        _report_epoch(s, st, record, last, ctx.progress)
        faults.after_epoch(s.run, epoch + 1)  # testing hooks (`raysub.faults`), inert unless the driver set them
        if last:
            break


def _gather(mine: Dict[str, str]) -> Dict[str, str]:
    """Every rank's ``mine`` merged (one all_gather of a few strings, at the end): each block's index digest
    reaches the driver through rank 0's report."""
    if not loop.dist_ready() or torch.distributed.get_world_size() == 1:
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
    # imported per call, not at the top: tests monkeypatch these names on the module they come from
    from raysub.engine.cluster import (fit_with_progress, make_progress_queue, release_progress_queue, torch_trainer,
                                       unwrap_train_error)
    from raysub.tracking import train_callbacks

    off = stream_plan(cfg, num_params, num_snaps) if num_params is not None else "sample.stream_gram=false"
    if off is not None and cfg.sample.stream_gram:
        printer(f"[sample] {off}: falling back to the post-hoc Gram in the basis stage")
    progress = make_progress_queue()
    loop_config = {"cfg": cfg.to_dict(), "progress": progress, "stream_gram": off is None, "lock_token": token_of(run),
                   "basis_prefix": basis_prefix if off is None and cfg.sample.write_basis else None,
                   "faults": faults.snapshot()}  # the tests' hooks (raysub.faults): failures, real kills
    trainer = torch_trainer(sample_loop, loop_config, cfg, "sample", run.ray_storage("checkpoints"),
                            callbacks=train_callbacks(cfg, run, "sample"))  # live curves (raysub.tracking)
    t0 = time.perf_counter()
    try:
        result = fit_with_progress(trainer, progress, printer)
    except Exception as exc:
        raise unwrap_train_error(exc)
    finally:
        release_progress_queue(progress)  # for this driver's next fit
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

    if rel not in written:
        raise StorageError(f"the sampler reported no checksum for {run.path(rel)} (a checkpoint of an older raysub): "
                           f"resample with --overwrite")
    return written[rel]
