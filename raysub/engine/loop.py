"""Pieces shared by the per-worker training loops (sampling SGD and subspace training).

Data order: every epoch has one global permutation drawn from (seed, epoch); it is cut into global batches of
B examples (the last incomplete batch is dropped) and rank r of W takes rows [r·B/W, (r+1)·B/W) of each. So W
workers see exactly the examples one worker with batch B sees, in the same order, and a resumed run replays the
same order from its epoch.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
import shutil

import torch
import torch.distributed as dist

from raysub import faults
from raysub.config import Config


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> Tuple[int, int]:
    if dist_ready():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_threads() -> None:
    """One intra-op thread per reserved CPU (Ray sets OMP_NUM_THREADS from the worker's CPUs)."""
    n = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)


@dataclass
class WorkerContext:
    """What every training loop starts with (`worker_context`)."""

    cfg: Any  # raysub.config.Config
    progress: Any  # a ray.util.queue.Queue for rank 0's progress records, or None
    rank: int
    world: int
    device: torch.device
    run: Any  # raysub.storage.RunDir
    session: str  # "train" (a Ray Train worker) or "tune" (a single-process Tune trial)


def worker_context(config: Dict) -> WorkerContext:
    """The config, progress queue, rank/world, device and run directory of a loop's ``config`` dict.

    ``config["session"]``: "train" (a Ray Train worker, the default) or "tune" (a single-process trial running
    in its Ray Tune actor: no process group, reports and checkpoints go through ``ray.tune``); ``config["faults"]``:
    the driver's `raysub.faults.snapshot`, installed in this worker."""
    # heavy: pyarrow loads here, not when this module is imported
    from raysub.storage import RunDir

    cfg = Config.from_dict(config["cfg"])
    faults.install(config.get("faults"))  # the driver's testing hooks (`raysub.faults`), inert when unset
    setup_threads()
    rank, world = rank_world()
    session = config.get("session", "train")
    if session == "tune":
        device = torch.device("cuda" if cfg.cluster.use_gpu and torch.cuda.is_available() else "cpu")
    else:
        # heavy: ray loads here, not when this module is imported
        import ray.train.torch

        device = ray.train.torch.get_device()
    return WorkerContext(cfg, config.get("progress"), rank, world, device, RunDir(cfg.run_dir), session)


def mix_seed(seed: int, epoch: int) -> int:
    """One integer seed per (seed, epoch): the data order and augmentation of an epoch."""
    return seed * 100_003 + epoch


def epoch_batches(num_examples: int, global_batch: int, seed: int, epoch: int, rank: int, world: int
                  ) -> List[torch.Tensor]:
    """This rank's index batches for ``epoch`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(mix_seed(seed, epoch))
    perm = torch.randperm(num_examples, generator=gen)
    local = global_batch // world
    steps = num_examples // global_batch
    return [perm[s * global_batch + rank * local : s * global_batch + (rank + 1) * local] for s in range(steps)]


def eval_batches(num_examples: int, global_batch: int, rank: int, world: int) -> List[torch.Tensor]:
    """A contiguous shard of the evaluation split for this rank, in batches of global_batch/W."""
    bounds = torch.linspace(0, num_examples, world + 1).round().long().tolist()
    idx = torch.arange(bounds[rank], bounds[rank + 1])
    local = max(1, global_batch // world)
    return [idx[i : i + local] for i in range(0, len(idx), local)]


def lr_at(epoch: int, base_lr: float, milestones: Sequence[int], gamma: float) -> float:
    """Step decay: ``base_lr · gamma^(number of milestones ≤ epoch)`` (epochs are 0-based)."""
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if dist_ready() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], data, split: str, global_batch: int,
             device: torch.device, num_workers: int = 0) -> Dict[str, float]:
    """Loss and accuracy on ``split``, each rank doing its shard, summed over ranks."""
    rank, world = rank_world()
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    batches = eval_batches(data.size(split), global_batch, rank, world)
    for x, y in data.batches(split, batches, augment=False, seed=0, num_workers=num_workers):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = forward(x)
        stats[0] += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
        stats[1] += (logits.argmax(1) == y).sum().double()
        stats[2] += y.numel()
    all_reduce_sum_(stats)
    return {"loss": float(stats[0] / stats[2]), "acc": float(stats[1] / stats[2])}


@contextlib.contextmanager
def frozen_buffers(module: torch.nn.Module):
    """Trial forwards (line searches) in train mode must not move BatchNorm running statistics."""
    saved = [b.detach().clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in zip(module.buffers(), saved):
                buf.copy_(old)


def global_step_losses(losses: List[torch.Tensor]) -> List[float]:
    """This epoch's per-step training losses, averaged over ranks (one all-reduce per epoch)."""
    if not losses:
        return []
    t = torch.stack([loss.detach().double() for loss in losses])
    _, world = rank_world()
    all_reduce_sum_(t)
    return (t / world).tolist()


def broadcast_buffers_(module: torch.nn.Module) -> None:
    """Make every rank's buffers (BatchNorm running statistics) equal to rank 0's."""
    if dist_ready() and dist.get_world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def _session(session: str):
    if session == "tune":
        # heavy: ray loads here, not when this module is imported
        import ray.tune as api
    else:
        # heavy: ray loads here, not when this module is imported
        import ray.train as api
    return api


def report(metrics: Dict, state: Optional[Dict], session: str = "train") -> None:
    """``ray.train.report`` from every rank (``ray.tune.report`` in a Tune trial); rank 0 passes ``state`` as the
    checkpoint (torch.save'd).

    ``metrics`` gains ``world_size``: the ranks of the process group this loop all-reduces over (1 in a Tune trial
    or a 1-worker run), as the workers themselves see it — so a run's results show how many workers really
    trained together. Both calls upload the checkpoint during the call, so the local temporary copy is removed
    right after.
    """

    api = _session(session)
    metrics = {**metrics, "world_size": rank_world()[1]}
    if state is None:
        api.report(metrics)
        return
    tmp = tempfile.mkdtemp(prefix="raysub-ckpt-")
    try:
        torch.save(state, os.path.join(tmp, "state.pt"))
        api.report(metrics, checkpoint=api.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(session: str = "train") -> Optional[Dict]:
    """The state of the latest checkpoint Ray Train (or Tune) hands this run after a restart, or None."""
    ckpt = _session(session).get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as path:
        return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------------------
# divergence: every rank decides alike, and reports instead of raising (Ray would retry a deterministic failure)

def first_nonfinite(values: Sequence[float]) -> Optional[int]:
    """Index of the first nan or ±inf in ``values``, or None when every value is finite."""
    return next((i for i, v in enumerate(values) if not math.isfinite(v)), None)


def divergence(stage: str, epoch: int, steps_before: int, losses: Sequence[float], params_finite: bool
               ) -> Optional[Dict[str, Any]]:
    """The divergence record of an epoch, or None when its losses and parameters are all finite.

    Args:
        stage: the stage's label ("sample", or the training's label).
        epoch: the epoch, 1-based.
        steps_before: global steps taken before this epoch.
        losses: the epoch's global step losses (the loss of step k is taken before its update).
        params_finite: whether the parameters (θ, or z) are finite after the epoch's last step.
    Returns:
        {"stage", "epoch", "step" (1-based global step), "loss" (the last finite loss, or None), "reason"}:
        strict JSON (no nan), or None.
    """
    bad = first_nonfinite(losses)
    if bad is not None:
        return {"stage": stage, "epoch": epoch, "step": steps_before + bad + 1, "loss": None,
                "reason": f"the loss became {losses[bad]}"}
    if not params_finite:
        return {"stage": stage, "epoch": epoch, "step": steps_before + len(losses),
                "loss": losses[-1] if losses else None, "reason": "the parameters became non-finite"}
    return None


def divergence_message(what: str, record: Dict[str, Any], fix: str) -> str:
    """One line: ``WHAT diverged at epoch E (step S): REASON; FIX``."""
    return f"{what} diverged at epoch {record['epoch']} (step {record['step']}): {record['reason']}; {fix}"


def report_divergence(metrics: Dict[str, Any], rank: int, session: str = "train") -> None:
    """Every rank's last report of a diverged run.

    Ray Train hands the driver the metrics of the latest checkpoint only, so rank 0 attaches a checkpoint that
    holds nothing but these metrics (the last good epoch's stays beside it): a resumed run finds it
    (`resumed_divergence`) and reports the divergence again instead of training on from a diverged state."""
    report(metrics, {"diverged_report": metrics} if rank == 0 else None, session)


def resumed_divergence(state: Optional[Dict[str, Any]], rank: int, session: str = "train") -> bool:
    """Whether ``state``, the checkpoint a run restarts from, is a divergence report; if so it is reported
    again (`report_divergence`) and the loop must return."""
    if state is None or "diverged_report" not in state:
        return False
    report_divergence(state["diverged_report"], rank, session)
    return True
