"""The DDP overhead benchmark's two sides (`raysub.bench.ddp_overhead`): a synthetic image dataset, raysub's
sampler with its epochs timed from inside, a plain 2-process torch DDP loop, and the figures of both."""
from __future__ import annotations

import json
import os
import socket
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from raysub.data.base import Dataset
from raysub.data.base import DATASETS
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from raysub.models import build_model
import torch.multiprocessing as mp
from raysub.config import load_config
from raysub.engine import loop

GOAL = 0.97
DATASET = "bench-synthetic"
SPEC = "spec.json"


def log(msg: str) -> None:
    print(f"[bench.ddp_overhead {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ synthetic data


class SyntheticImages(Dataset):
    """A seeded pool of uint8 images and labels, described by ``root/spec.json``; example i is pool entry
    i mod pool (so a 224² run needs no gigabytes). Batches are normalised floats, as `InMemoryDataset` makes."""

    name = DATASET

    @classmethod
    def problems(cls, root, **kwargs):
        if root is None or not os.path.isfile(os.path.join(root, SPEC)):
            return [f"dataset {DATASET!r}: no {SPEC} in data.root={root} (written by jobs/bench/ddp_overhead.py)"]
        return []

    def __init__(self, root: Optional[str] = None):
        with open(os.path.join(root, SPEC)) as f:
            spec = json.load(f)
        self.num_classes = spec["num_classes"]
        s = spec["image_size"]
        self.input_shape = (3, s, s)
        self._sizes = {"train": spec["train_size"], "test": spec["test_size"]}
        gen = torch.Generator().manual_seed(spec["seed"])
        self._x = torch.randint(0, 256, (spec["pool"], 3, s, s), generator=gen, dtype=torch.uint8)
        self._y = torch.randint(0, self.num_classes, (spec["pool"],), generator=gen)

    def size(self, split: str) -> int:
        self._check_split(split)
        return self._sizes[split]

    def labels(self, split: str) -> torch.Tensor:
        return self._y[torch.arange(self.size(split)) % len(self._y)]

    def batches(self, split, batch_indices, *, augment, seed, num_workers=0):
        self._check_split(split)
        for idx in batch_indices:
            j = torch.as_tensor(idx, dtype=torch.long) % len(self._y)
            yield self._x[j].to(torch.float32).sub_(127.5).div_(64.0), self._y[j]


def register_dataset() -> None:
    """Register the synthetic dataset in raysub's registry (the driver at import, each Ray worker in its loop:
    imported here so that a by-value pickle of this function registers in the worker's registry, not a copy)."""

    if DATASET not in DATASETS:
        DATASETS.register(DATASET)(SyntheticImages)


register_dataset()


def write_spec(root: str, args, num_classes: int) -> None:
    os.makedirs(root, exist_ok=True)
    global_batch = args.workers * args.batch
    spec = {"num_classes": num_classes, "image_size": args.image_size, "seed": args.seed,
            "train_size": args.steps * global_batch, "test_size": global_batch,
            "pool": min(args.steps * global_batch, args.pool)}
    with open(os.path.join(root, SPEC), "w") as f:
        json.dump(spec, f)


# ----------------------------------------------------------------------------------------- the figures


def throughput(images: float, seconds: float) -> float:
    """Images per second."""
    return images / seconds if seconds > 0 else float("nan")


def ratio(raysub_images_per_s: float, torch_images_per_s: float) -> float:
    """raysub over plain DDP: above 1 means raysub is faster (the goal is ≥ 0.97)."""
    return raysub_images_per_s / torch_images_per_s


def epoch_walls(record: Dict[str, Any]) -> List[float]:
    """Each epoch's wall time: from its start to the next one's (the last one's to the loop's end)."""
    marks = list(record["epoch_start"]) + [record["end"]]
    return [b - a for a, b in zip(marks, marks[1:])]


def measured(record: Dict[str, Any], warmup: int, images_per_epoch: int) -> Dict[str, float]:
    """One run's steady-state figures (rank 0's record), the first ``warmup`` epochs left out.

    ``record``: {"epoch_start": [t...], "end": t, and for raysub also "steps_end": [t...] (after each epoch's
    steps), "eval_s", "report_s", "snapshot_s": [s per epoch]}. Returns images, the timed seconds (epoch walls less
    the evaluation) and, for raysub, the step loops' seconds and the mean per-epoch pieces.
    """
    walls = epoch_walls(record)[warmup:]
    n = len(walls)
    out = {"epochs": n, "images": n * images_per_epoch, "epoch_s": walls}
    evals = record.get("eval_s", [0.0] * len(record["epoch_start"]))[warmup:]
    out["seconds"] = sum(walls) - sum(evals)
    out["timed_epoch_s"] = [w - e for w, e in zip(walls, evals)]
    if "steps_end" in record:
        steps = [e - s for s, e in zip(record["epoch_start"], record["steps_end"])][warmup:]
        out["steps_seconds"] = sum(steps)
        for key in ("eval_s", "report_s", "snapshot_s"):
            out[f"mean_{key}"] = sum(record[key][warmup:]) / max(n, 1)
        out["mean_other_s"] = (sum(walls) - sum(steps) - sum(evals) - sum(record["report_s"][warmup:])) / max(n, 1)
    else:
        out["steps_seconds"] = out["seconds"]
    return out


def figures(raysub_runs: Sequence[Dict[str, float]], torch_runs: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Both sides' images/s over all their rounds (`measured` records) and the ratios raysub / plain DDP."""
    r_img, t_img = sum(r["images"] for r in raysub_runs), sum(t["images"] for t in torch_runs)
    r_ips = throughput(r_img, sum(r["seconds"] for r in raysub_runs))
    t_ips = throughput(t_img, sum(t["seconds"] for t in torch_runs))
    r_steps = throughput(r_img, sum(r["steps_seconds"] for r in raysub_runs))
    # the median timed epoch of each side over all rounds: robust to a burst of load hitting a few epochs
    r_med = statistics.median(s for r in raysub_runs for s in r["timed_epoch_s"])
    t_med = statistics.median(s for t in torch_runs for s in t["timed_epoch_s"])
    return {"images_per_s_raysub": r_ips, "images_per_s_torch_ddp": t_ips,
            "images_per_s_raysub_steps": r_steps,
            "raysub_over_torch_ddp": ratio(r_ips, t_ips), "raysub_steps_over_torch_ddp": ratio(r_steps, t_ips),
            "raysub_over_torch_ddp_median_epoch": ratio(1.0 / r_med, 1.0 / t_med),
            "raysub_over_torch_ddp_rounds": [ratio(throughput(r["images"], r["seconds"]),
                                                   throughput(t["images"], t["seconds"]))
                                             for r, t in zip(raysub_runs, torch_runs)]}


# -------------------------------------------------------------------------------------- plain torch DDP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_worker(rank: int, case: Dict[str, Any], port: int, out_dir: str) -> None:
    """One rank of the torchrun-style loop (``torch.multiprocessing.spawn`` target)."""


    world, batch = case["workers"], case["batch"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(case["threads"])
    gpu = case["gpu"]
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}" if gpu else "cpu")
    data = SyntheticImages(case["data_root"])
    torch.manual_seed(case["seed"])
    model = build_model(case["model"], data.num_classes, data.input_shape).to(device)
    # as raysub's sampler: DDP with more than one rank, the bare model with one
    ddp = DistributedDataParallel(model, device_ids=[rank] if gpu else None) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    n, global_batch = data.size("train"), world * batch
    record: Dict[str, Any] = {"epoch_start": [], "threads": torch.get_num_threads(), "niceness": os.nice(0)}
    model.train()
    for epoch in range(case["epochs"]):
        record["epoch_start"].append(time.perf_counter())
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(case["seed"] * 100_003 + epoch))
        for s in range(case["steps"]):
            idx = perm[s * global_batch + rank * batch: s * global_batch + (rank + 1) * batch]
            x, y = next(data.batches("train", [idx], augment=False, seed=0))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if gpu:
            torch.cuda.synchronize()
    record["end"] = time.perf_counter()
    with open(os.path.join(out_dir, f"torch_rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


def run_torch(case: Dict[str, Any], out_dir: str) -> Dict[str, Any]:
    """Spawn ``case["workers"]`` processes of `torch_worker`; rank 0's record."""

    os.makedirs(out_dir, exist_ok=True)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(case["threads"])  # what torchrun (and Ray, from the CPUs) give each rank
    try:
        mp.spawn(torch_worker, args=(case, free_port(), out_dir), nprocs=case["workers"], join=True)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    with open(os.path.join(out_dir, "torch_rank0.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------- raysub's sampler


def make_sample_loop(timing_dir: str):
    """raysub's own per-worker sampling loop, with its per-epoch pieces timed: this wrapper (run in each Ray
    Train worker) wraps the `raysub.engine.loop` functions the loop calls at known points — ``epoch_batches``
    (an epoch starts), ``global_step_losses`` (its steps ended), ``evaluate``, ``report`` (checkpoint + report)
    — and `raysub.pipeline.sample.write_snapshot`, then calls the real `raysub.pipeline.sample.sample_loop`."""

    def bench_sample_loop(config):
        # heavy: pyarrow loads here, not when this module is imported
        import raysub.pipeline.sample as sample

        register_dataset()
        rec: Dict[str, Any] = {"epoch_start": [], "steps_end": [], "eval_s": [], "report_s": [], "snapshot_s": []}
        accumulate = {"evaluate": "eval_s", "report": "report_s", "write_snapshot": "snapshot_s"}

        def timed(module, name, on_start=None, into=None, at_end=None):
            original = getattr(module, name)

            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                if on_start is not None:
                    on_start.append(t0)
                    if into is not None:  # a new epoch: its accumulators start at 0
                        for key in into:
                            rec[key].append(0.0)
                try:
                    return original(*args, **kwargs)
                finally:
                    t1 = time.perf_counter()
                    if at_end is not None:
                        at_end.append(t1)
                    elif name in accumulate:  # into the current epoch's total
                        rec[accumulate[name]][-1] += t1 - t0

            setattr(module, name, wrapper)

        timed(loop, "epoch_batches", on_start=rec["epoch_start"], into=("eval_s", "report_s", "snapshot_s"))
        timed(loop, "global_step_losses", at_end=rec["steps_end"])
        for name in ("evaluate", "report"):
            timed(loop, name)
        timed(sample, "write_snapshot")
        rec["snapshot_s"].append(0.0)  # snapshot 0 (θ0) is written before the first epoch starts
        rec["snapshot0_s"] = None
        try:
            sample.sample_loop(config)
        finally:
            rec["end"] = time.perf_counter()
            rec["snapshot0_s"] = rec["snapshot_s"].pop(0)
            rank, world = loop.rank_world()
            rec["threads"], rec["world"], rec["niceness"] = torch.get_num_threads(), world, os.nice(0)
            with open(os.path.join(timing_dir, f"raysub_rank{rank}.json"), "w") as f:
                json.dump(rec, f)

    return bench_sample_loop


def run_raysub(case: Dict[str, Any], run_dir: str) -> Dict[str, Any]:
    """`raysub sample` of the case through the real stage; rank 0's timing record and the stage's wall time."""
    # heavy: pyarrow loads here, not when this module is imported
    import raysub.pipeline.sample as sample
    from raysub.pipeline.run import stage_sample

    cfg = load_config(None, [
        f"run_dir={run_dir}", f"seed={case['seed']}", f"data.name={DATASET}", f"data.root={case['data_root']}",
        f"data.batch_size={case['workers'] * case['batch']}", f"data.eval_batch_size={case['workers'] * case['batch']}",
        "data.augment=false", f"model.name={case['model']}", "model.options={}",
        f"cluster.num_workers={case['workers']}", f"cluster.cpus_per_worker={case['threads']}",
        f"cluster.use_gpu={str(case['gpu']).lower()}", f"sgd.epochs={case['epochs']}", "sgd.lr=0.1",
        "sgd.momentum=0.9", "sgd.weight_decay=1e-4", "sgd.lr_milestones=[]", f"sample.epochs={case['epochs']}",
        "sample.snapshots_per_epoch=1", "basis.dim=1"])
    timing_dir = os.path.join(run_dir + "-timings")
    os.makedirs(timing_dir, exist_ok=True)
    real = sample.sample_loop
    sample.sample_loop = make_sample_loop(timing_dir)  # run_sample hands `sample_loop` to the TorchTrainer
    try:
        t0 = time.perf_counter()
        stage_sample(cfg, overwrite=True, say=lambda line: log(f"  raysub: {line}"))
        wall = time.perf_counter() - t0
    finally:
        sample.sample_loop = real
    with open(os.path.join(timing_dir, "raysub_rank0.json")) as f:
        record = json.load(f)
    record["stage_wall_s"] = wall
    return record
