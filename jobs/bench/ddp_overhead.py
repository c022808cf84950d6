"""Benchmark: raysub's Ray Train sampler vs a plain torchrun-style DDP loop, images/s on the same model and data.

What it measures
    Training throughput (images/s) of the DDP sampling loop `raysub sample` runs (`raysub.pipeline.sample`,
    driven by the real stage, `raysub.pipeline.run.stage_sample`: Ray Train TorchTrainer, gloo on CPU / nccl on
    GPU, θ0 from the run directory, one trajectory snapshot per epoch, the end-of-epoch loss all-reduce, BatchNorm
    broadcast, evaluation, checkpoint and report) against a plain PyTorch DDP loop started the torchrun way
    (``torch.multiprocessing`` spawn, ``init_process_group``, ``DistributedDataParallel`` — the bare model with one
    worker, as raysub — SGD with momentum, the same forward / zero_grad / backward / step). Both sides use the same
    model from raysub's registry, the same per-worker batch, the same number of workers, steps per epoch and epochs,
    the same torch intra-op threads per worker (and OMP_NUM_THREADS) and the same synthetic data: a seeded pool of
    uint8 images (``bench-synthetic``, registered by this script only), indexed by a per-epoch permutation,
    converted to float and normalised per batch as raysub's in-memory datasets do; no augmentation.

    Timing (rank 0, after the first ``--warmup-epochs`` epochs; start-up excluded on both sides): an epoch of
    raysub's sampler runs from one epoch's start to the next (the last one to the loop's return) and includes
    everything the sampler does per epoch except the test-set evaluation, which is timed inside the worker and
    taken out (the test split is a single global batch anyway); the snapshot writes, loss all-reduce, buffer
    broadcast and the per-epoch checkpoint + report stay in, so raysub's figure is conservative. The plain loop's
    epoch is its steps. images/s = measured epochs × steps × workers × batch / time. raysub_over_torch_ddp =
    raysub images/s / plain DDP images/s (goal ≥ 0.97). raysub_steps_over_torch_ddp compares the step loops
    alone (raysub's steps, snapshot writes included). raysub's per-epoch pieces are timed by wrapping, inside the
    Ray Train worker, the `raysub.engine.loop` functions the sampler calls (nothing of the loop is reimplemented).
    The two sides alternate round by round (torch, raysub, raysub, torch, ... ``--rounds``) so that drifting load
    from other processes hits both alike; images and times are summed over rounds.

    GPU (``--gpu``, only with CUDA): ResNet-18 at 224² with 1000 classes, 1 GPU and all GPUs (nccl), one worker
    per GPU; ``images_per_s_gpu`` is raysub's throughput on all GPUs.

How long it takes
    About 2 minutes with the defaults on a 2-core CPU (ResNet-20 on 3×32×32, 2 workers × 1 thread, batch 64 per
    worker, 4 epochs of 20 steps per side and round, 2 rounds; each raysub round pays ~20 s of Ray Train start-up,
    not timed); 119 s measured at load average 1.4. A busy machine makes both sides slower and noisier: compare
    figures with the load average printed.

What it reaches (2-core development machine, torch 2.14.1, Ray 2.60.0)
    1 worker: raysub_over_torch_ddp 1.018 (285 vs 280 images/s, load 1.2-1.4): the sampler's loop costs nothing.
    2 workers (the default): 0.89-0.94 over three runs (e.g. 471 vs 532 images/s at load 1.4-2.7), nearly all of it
    inside the steps (steps-only ratio 0.89), not in the per-epoch checkpoint/report (~15 ms), snapshot (~2 ms) or
    other end-of-epoch work (~30 ms) of a ~5 s epoch. With as many busy workers as cores, Ray's own processes
    (progress queue actor and driver poll, Train controller health checks, GCS, raylet, Train V2's helper actors:
    ~15% of one core, measured from /proc) take CPU from the workers, which Ray runs at nice 15; a node with a core
    to spare for them shows no gap (the 1-worker figure).

How to run
    locally:      python jobs/bench/ddp_overhead.py [--workers 2] [--batch 64] [--steps 20] [--epochs 4]
                  [--model resnet20] [--image-size 32] [--threads 1] [--rounds 2] [--gpu]
    on a cluster: ray job submit --working-dir . -- python jobs/bench/ddp_overhead.py --gpu
                  (the plain loop runs on the node the driver runs on: use it on a one-node cluster.)

Output: progress lines, a table, the load average, and as the last line of stdout one JSON object with at least
raysub_over_torch_ddp (and, with --gpu, images_per_s_gpu).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from raysub.data.base import Dataset  # noqa: E402

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
    from raysub.data.base import DATASETS

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
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from raysub.models import build_model

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
    import torch.multiprocessing as mp

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
        import raysub.pipeline.sample as sample
        from raysub.engine import loop

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
    import raysub.pipeline.sample as sample
    from raysub.config import load_config
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


def pickle_by_value() -> None:
    """Ray pickles this module's functions (the wrapped loop, the dataset) by value when it is imported under a
    name the workers cannot import (a test loads it from its path)."""
    if __name__ != "__main__":
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------------------------------------------- main


def run_case(case: Dict[str, Any], rounds: int, warmup: int, root: str) -> Dict[str, Any]:
    """``rounds`` alternating rounds of both sides on one case; their `measured` records and `figures`."""
    images_per_epoch = case["steps"] * case["workers"] * case["batch"]
    raysub_runs, torch_runs, threads, niceness = [], [], {}, {}
    for r in range(rounds):
        for side in (("torch", "raysub") if r % 2 == 0 else ("raysub", "torch")):
            load = os.getloadavg()[0]
            if side == "torch":
                rec = run_torch(case, os.path.join(root, f"{case['label']}-torch-r{r}"))
                torch_runs.append(measured(rec, warmup, images_per_epoch))
                threads["torch"], niceness["torch"] = rec["threads"], rec["niceness"]
                got = torch_runs[-1]
            else:
                rec = run_raysub(case, os.path.join(root, f"{case['label']}-raysub-r{r}"))
                raysub_runs.append(measured(rec, warmup, images_per_epoch))
                threads["raysub"], niceness["raysub"] = rec["threads"], rec["niceness"]
                got = raysub_runs[-1]
            starts, ends = len(rec["epoch_start"]), len(rec.get("steps_end", rec["epoch_start"]))
            if starts != case["epochs"] or ends != case["epochs"]:  # the loop no longer calls what is wrapped
                raise RuntimeError(f"{side}: timed {starts} epoch starts and {ends} ends of {case['epochs']} epochs")
            log(f"{case['label']} round {r + 1}/{rounds} {side:6s}: {throughput(got['images'], got['seconds']):8.1f} "
                f"images/s over {got['epochs']} epochs ({', '.join(f'{s:.2f}' for s in got['epoch_s'])} s/epoch), "
                f"load {load:.2f}")
    if threads.get("raysub") != threads.get("torch"):
        log(f"warning: intra-op threads differ: raysub workers {threads.get('raysub')}, plain DDP "
            f"{threads.get('torch')}")
    if niceness.get("raysub") != niceness.get("torch"):
        log(f"note: the workers' niceness differs: raysub (Ray's workers) {niceness.get('raysub')}, plain DDP "
            f"{niceness.get('torch')}: on a busy machine the lower-priority side gets less CPU")
    return {"case": case, "raysub": raysub_runs, "torch": torch_runs, "threads": threads, "niceness": niceness,
            **figures(raysub_runs, torch_runs)}


def cases_for(args) -> List[Dict[str, Any]]:
    base = {"batch": args.batch, "steps": args.steps, "epochs": args.epochs, "seed": args.seed,
            "threads": args.threads}
    if not args.gpu:
        return [{**base, "label": f"cpu-{args.workers}w", "model": args.model, "workers": args.workers,
                 "gpu": False, "num_classes": 10}]
    n = torch.cuda.device_count()
    return [{**base, "label": f"gpu-{g}", "model": args.model, "workers": g, "gpu": True, "num_classes": 1000}
            for g in sorted({1, n})]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="DDP workers on CPU (default 2); --gpu: 1 and all GPUs")
    ap.add_argument("--batch", type=int, default=None, help="per-worker batch (default 64 CPU, 128 GPU)")
    ap.add_argument("--steps", type=int, default=None, help="steps per epoch (default 20 CPU, 50 GPU)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per side and round, warm-up included (default 4)")
    ap.add_argument("--warmup-epochs", type=int, default=1, help="leading epochs not timed (default 1)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sides (default 2)")
    ap.add_argument("--model", default=None, help="raysub model name (default resnet20 CPU, resnet18 GPU)")
    ap.add_argument("--image-size", type=int, default=None, help="square image side (default 32 CPU, 224 GPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker, both sides (default 1)")
    ap.add_argument("--pool", type=int, default=1024, help="distinct synthetic images (default 1024)")
    ap.add_argument("--gpu", action="store_true", help="ResNet-18 at 224² on 1 and all GPUs (nccl); needs CUDA")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = ap.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        print("bench.ddp_overhead: error: --gpu needs CUDA, and torch sees no GPU: run without --gpu for the CPU "
              "comparison", file=sys.stderr)
        return 2
    args.batch = args.batch or (128 if args.gpu else 64)
    args.steps = args.steps or (50 if args.gpu else 20)
    args.model = args.model or ("resnet18" if args.gpu else "resnet20")
    args.image_size = args.image_size or (224 if args.gpu else 32)
    if args.epochs <= args.warmup_epochs:
        ap.error(f"--epochs {args.epochs} must exceed --warmup-epochs {args.warmup_epochs} (nothing would be timed)")
    pickle_by_value()

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    root = tempfile.mkdtemp(prefix="raysub-ddp-bench-")
    results = []
    try:
        for case in cases_for(args):
            case["data_root"] = os.path.join(root, f"data-{case['label']}")
            write_spec(case["data_root"], argparse.Namespace(**{**vars(args), "workers": case["workers"]}),
                       case["num_classes"])
            log(f"{case['label']}: {case['model']} on 3×{args.image_size}×{args.image_size}, {case['workers']} "
                f"workers × batch {args.batch}, {args.threads} thread(s) each, {args.epochs} epochs × {args.steps} "
                f"steps per side and round ({args.warmup_epochs} warm-up), {args.rounds} rounds; load average "
                f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
            results.append(run_case(case, args.rounds, args.warmup_epochs, root))
    finally:
        if args.keep:
            log(f"run directories kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    load1 = os.getloadavg()

    print()
    print(f"raysub Ray Train sampler vs plain torch DDP (images/s; {args.epochs - args.warmup_epochs} timed epochs × "
          f"{args.steps} steps per round, {args.rounds} rounds)")
    print("-" * 112)
    print(f"{'case':10s} {'raysub':>9s} {'torch DDP':>10s} {'ratio':>7s} {'steps only':>11s} {'ratio':>7s}   "
          f"raysub per epoch, s: {'eval':>6s} {'ckpt+rep':>8s} {'snapshot':>8s} {'other':>6s}")
    for res in results:
        r = res["raysub"]
        mean = lambda k: sum(x[k] for x in r) / len(r)  # noqa: E731
        print(f"{res['case']['label']:10s} {res['images_per_s_raysub']:9.1f} {res['images_per_s_torch_ddp']:10.1f} "
              f"{res['raysub_over_torch_ddp']:7.3f} {res['images_per_s_raysub_steps']:11.1f} "
              f"{res['raysub_steps_over_torch_ddp']:7.3f}   {'':21s} {mean('mean_eval_s'):6.3f} "
              f"{mean('mean_report_s'):8.3f} {mean('mean_snapshot_s'):8.3f} {mean('mean_other_s'):6.3f}")
    head = results[-1]
    print(f"goal: raysub / torch DDP >= {GOAL}: {'met' if head['raysub_over_torch_ddp'] >= GOAL else 'NOT met'} "
          f"({head['case']['label']}); per round: "
          + ", ".join(f"{x:.3f}" for x in head["raysub_over_torch_ddp_rounds"])
          + f"; median epoch vs median epoch: {head['raysub_over_torch_ddp_median_epoch']:.3f}")
    print(f"threads per worker: raysub {head['threads'].get('raysub')}, torch DDP {head['threads'].get('torch')}; "
          f"niceness: raysub {head['niceness'].get('raysub')}, torch DDP {head['niceness'].get('torch')}")
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load0)} at start, "
          f"{' '.join(f'{x:.2f}' for x in load1)} at end, {os.cpu_count()} CPUs")
    print("-" * 112)

    fig: Dict[str, Any] = {k: head[k] for k in ("raysub_over_torch_ddp", "raysub_steps_over_torch_ddp",
                                                 "raysub_over_torch_ddp_median_epoch",
                                                 "images_per_s_raysub", "images_per_s_torch_ddp",
                                                 "images_per_s_raysub_steps", "raysub_over_torch_ddp_rounds")}
    fig.update(goal=GOAL, model=args.model, image_size=args.image_size, workers=head["case"]["workers"],
               batch_per_worker=args.batch, steps_per_epoch=args.steps, epochs=args.epochs,
               warmup_epochs=args.warmup_epochs, rounds=args.rounds, threads=head["threads"],
               niceness=head["niceness"],
               torch=torch.__version__, device="cuda" if args.gpu else "cpu")
    fig["raysub_epoch_pieces_s"] = {k: sum(x[f"mean_{k}"] for x in head["raysub"]) / len(head["raysub"])
                                    for k in ("eval_s", "report_s", "snapshot_s", "other_s")}
    fig["cases"] = {res["case"]["label"]: {k: res[k] for k in ("raysub_over_torch_ddp", "raysub_steps_over_torch_ddp",
                                                               "images_per_s_raysub", "images_per_s_torch_ddp")}
                    for res in results}
    if args.gpu:
        fig["images_per_s_gpu"] = head["images_per_s_raysub"]
        fig["images_per_s_gpu_torch_ddp"] = head["images_per_s_torch_ddp"]
        fig["gpus"] = head["case"]["workers"]
    fig["loadavg_start"], fig["loadavg_end"] = list(load0), list(load1)
    fig["wall_s"] = time.perf_counter() - t_start
    print(json.dumps(fig), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
