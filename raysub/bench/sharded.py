"""The sharded projection measured and checked in worlds of real processes (gloo on CPU, NCCL on GPUs).

`run_world` starts W processes from one forkserver that has imported torch and raysub once (a rank costs a fork,
not an interpreter and a torch import), each joins a torch.distributed process group and runs ``fn(rank, world,
*args)``; rank 0's return value comes back. On top of it:

- `equality_rank`: a few steps of every optimizer (P-SGD, P-BFGS, Adam†, the learned optimizer, class-gradient QN)
  through raysub's own `raysub.engine.task.train_step` on a ResNet-8 (BatchNorm after every conv) in a stored
  ``dense`` P, replicated, sharded or node-sharded, in float64 or float32; the z's come back. ``shift`` mis-slices every rank's
  rows by that many parameters (what a sharding bug looks like), so a check can show it would notice;
- `step_rank`: interleaved timing of the replicated and the sharded step on one model (CPU), with the peak RSS
  of each layout measured in processes of its own (`memory_rank`).

Used by tests/test_sharded_worlds.py and jobs/bench/sharded_projection.py.
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

PRELOAD = ["torch", "torch.distributed", "raysub.engine.task", "raysub.bench.sharded", "raysub.plugins"]
OPTIMIZERS = ("psgd", "pbfgs", "adam", "l2o", "cgqn")
OPTIONS = {"psgd": {"lr": 0.05, "momentum": 0.9}, "pbfgs": {"lr": 1.0, "momentum": 0.0},
           "adam": {"lr": 0.02, "momentum": 0.9}, "l2o": {"lr": 1.0, "momentum": 0.0},
           # damped: undamped, the class-gradient curvature of 12 random images is singular and z blows up to 1e9
           "cgqn": {"lr": 0.01, "momentum": 0.0, "damping": 1.0}}
GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 ranks


def _rank_main(rank: int, world: int, init: str, backend: str, fn: Callable, args: Sequence[Any], queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # W ranks on a small machine: no oversubscription
    try:
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
        out = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, "ok", out))
    except BaseException as exc:  # the parent reports it: one line per failed rank
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}"))


def run_world(world: int, fn: Callable, *args: Any, backend: str = "gloo", timeout: float = 600) -> List[Any]:
    """``fn(rank, world, *args)`` on ``world`` processes in one process group; every rank's return value, by rank.

    Raises:
        RuntimeError: a rank failed (its error), or the world did not finish within ``timeout`` seconds.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="raysub-world-") as tmp:
        init = f"file://{os.path.join(tmp, 'store')}"
        procs = [ctx.Process(target=_rank_main, args=(r, world, init, backend, fn, args, queue), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        results: Dict[int, Any] = {}
        errors = []
        deadline = time.time() + timeout
        try:
            while len(results) + len(errors) < world:
                left = deadline - time.time()
                if left <= 0:
                    raise RuntimeError(f"a world of {world} ranks ran past {timeout:.0f} s")
                try:
                    rank, status, out = queue.get(timeout=min(left, 5.0))
                except Exception:  # queue.Empty: is every rank still alive?
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                    if dead:
                        raise RuntimeError(f"rank {dead[0]} of {world} died (exit code {procs[dead[0]].exitcode})")
                    continue
                if status == "ok":
                    results[rank] = out
                else:
                    errors.append(f"rank {rank}: {out}")
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.1)
                if p.is_alive():
                    p.kill()
        if errors:
            raise RuntimeError(errors[0])
    return [results[r] for r in range(world)]


# ---------------------------------------------------------------------------------------------------------
# equality: the same z whatever the layout

def _model(dtype: torch.dtype, seed: int = 0):
    from raysub.models import build_model

    torch.manual_seed(seed)
    return build_model("resnet8", 10, (3, 8, 8)).to(dtype)


def _batches(steps: int, dtype: torch.dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, GLOBAL_BATCH, 3, 8, 8, generator=gen).to(dtype)
    y = torch.randint(0, 10, (steps, GLOBAL_BATCH), generator=gen)
    return x, y


def _projection(num_params: int, dim: int, dtype: torch.dtype, comm, shift: int = 0, device=None):
    """The ``dense`` family's stored P (seed 0): whole, or this rank's rows (mis-sliced by ``shift``)."""
    from raysub.engine.sharded import ShardedProjection
    from raysub.projections import PROJECTIONS

    big = 1 << 40
    if comm is None:
        return PROJECTIONS.get("dense")(num_params, dim, 0, dtype=dtype, max_bytes=big, device=device or "cpu")
    a, b = comm.layout.rows
    if shift:
        a, b = (a + shift, b + shift) if b + shift <= num_params else (a - shift, b - shift)
    rows = PROJECTIONS.get("dense")(num_params, dim, 0, dtype=dtype, rows=(a, b), max_bytes=big,
                                    device=device or "cpu")
    return ShardedProjection(rows, num_params, comm)


def equality_rank(rank: int, world: int, mode: str, groups: Optional[int], dtype_names: Sequence[str], steps: int,
                  dim: int, weights: str, shift: int = 0, optimizers: Sequence[str] = OPTIMIZERS, device: str = "cpu",
                  overrides: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Dict[str, Any]]:
    """`equality_rank_of` for each dtype in ``dtype_names`` (one world, several tables): {dtype name: its table}.
    ``device`` "cuda": rank r on GPU r (a NCCL world)."""
    return {d: equality_rank_of(rank, world, mode, groups, d, steps, dim, weights, shift, optimizers, device,
                                overrides) for d in dtype_names}


def equality_rank_of(rank: int, world: int, mode: str, groups: Optional[int], dtype_name: str, steps: int, dim: int,
                     weights: str, shift: int = 0, optimizers: Sequence[str] = OPTIMIZERS, device: str = "cpu",
                     overrides: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """``steps`` training steps of each optimizer from z = 0 in this world's layout, BatchNorm in train mode (each
    rank normalises with its own examples' statistics, as DDP does: only worlds of one size can agree) and in eval
    mode (fixed statistics: every world size computes the same function); per "OPTIMIZER/bn_MODE": z (a list),
    the floats sent per step and the bytes of P this rank held."""
    import torch.distributed as dist

    from raysub.engine import sharded
    from raysub.engine.flat import flatten_params
    from raysub.engine.task import Task, allreduce_floats_per_step, group_floats_per_step, train_step
    from raysub.optim.base import OPTIMIZERS as REGISTRY
    import raysub.plugins  # noqa: F401  the learned optimizer registered

    dtype = getattr(torch, dtype_name)
    dev = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    x, y = (t.to(dev) for t in _batches(steps, dtype))
    share = GLOBAL_BATCH // world
    out: Dict[str, Any] = {"mode": mode, "world": world, "device": str(dev)}
    # on a GPU a world of one still runs its collectives through NCCL (keep_single), so one GPU checks that path
    comm = (sharded.setup(mode, flatten_params(_model(dtype)).numel(), groups, keep_single=dev.type == "cuda")
            if mode != "replicated" else None)
    for bn, name in [(bn, name) for bn in ("train", "eval") for name in optimizers]:
        model = _model(dtype).to(dev)
        theta0_N = flatten_params(model)
        projection = _projection(theta0_N.numel(), dim, dtype, comm, shift, dev)
        if comm is not None:
            comm.floats = 0
        task = Task.from_parts(model, theta0_N, projection)
        z_D = torch.zeros(dim, dtype=dtype, device=dev)
        opts = {**OPTIONS[name], **({"weights": weights} if name == "l2o" else {}), **(overrides or {}).get(name, {})}
        opt = REGISTRY.get(name)(z_D, weight_decay=0.0, **opts)
        model.train(bn == "train")
        for s in range(steps):
            train_step(task, z_D, opt, x[s, rank * share : (rank + 1) * share], y[s, rank * share : (rank + 1) * share])
        out[f"{name}/bn_{bn}"] = {"z": z_D.cpu().tolist(), "allreduce_floats_per_step": allreduce_floats_per_step(task),
                     "group_floats_per_step": group_floats_per_step(task),
                     "p_bytes": sharded.held_bytes(projection)}
    dist.barrier()
    return out


# ---------------------------------------------------------------------------------------------------------
# memory and step time

def mlp_of(num_params_m: float) -> List[int]:
    """Hidden widths of an MLP on 784 inputs with about ``num_params_m`` million parameters (two equal layers)."""
    # 784·h + h·h + 10·h ≈ N: h = (−794 + sqrt(794² + 4N)) / 2
    n = num_params_m * 1e6
    h = int((-794 + (794 ** 2 + 4 * n) ** 0.5) / 2)
    return [h, h]


def memory_rank(rank: int, world: int, mode: str, hidden: Sequence[int], dim: int, steps: int) -> Dict[str, Any]:
    """Build a ``dense`` P (kept) for an MLP of ``hidden`` in ``mode``, take ``steps`` P-SGD steps; this process's
    peak RSS (VmHWM), the bytes of P it held and the time per step."""
    from raysub.bench.harness import peak_rss_bytes
    from raysub.engine import sharded
    from raysub.engine.flat import flatten_params
    from raysub.engine.task import Task, train_step
    from raysub.models import build_model
    from raysub.optim.base import OPTIMIZERS as REGISTRY

    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 28, 28), hidden=list(hidden))
    theta0_N = flatten_params(model)
    n = theta0_N.numel()
    comm = sharded.setup(mode, n, None) if mode != "replicated" else None
    projection = _projection(n, dim, torch.float32, comm)
    task = Task.from_parts(model, theta0_N, projection)
    z_D = torch.zeros(dim)
    opt = REGISTRY.get("psgd")(z_D, lr=0.01, momentum=0.9, weight_decay=0.0)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(task, z_D, opt, x, y)
    return {"num_params": n, "peak_rss": peak_rss_bytes(), "p_bytes": sharded.held_bytes(projection),
            "step_s": (time.perf_counter() - t0) / max(steps, 1)}


def step_rank(rank: int, world: int, model_name: str, shape: Sequence[int], dim: int, batch: int, rounds: int,
              steps: int, device: str = "cpu") -> Dict[str, Any]:
    """Replicated and sharded P-SGD steps of ``model_name`` side by side in one world, timed in interleaved blocks
    of ``steps`` (order rotating each round); median seconds per step of each, and the floats each step sent."""
    from raysub.bench.harness import rotated
    from raysub.engine import sharded
    from raysub.engine.flat import flatten_params
    from raysub.engine.task import Task, allreduce_floats_per_step, group_floats_per_step, train_step
    from raysub.models import build_model
    from raysub.optim.base import OPTIMIZERS as REGISTRY

    dev = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    share = batch // world
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(share, *shape, generator=gen).to(dev), torch.randint(0, 10, (share,), generator=gen).to(dev)
    sides = {}
    for mode in ("replicated", "sharded"):
        torch.manual_seed(0)
        model = build_model(model_name, 10, tuple(shape)).to(dev)
        theta0_N = flatten_params(model)
        comm = (sharded.setup(mode, theta0_N.numel(), None, keep_single=dev.type == "cuda")
                if mode != "replicated" else None)
        task = Task.from_parts(model, theta0_N, _projection(theta0_N.numel(), dim, torch.float32, comm, 0, dev))
        z_D = torch.zeros(dim, device=dev)
        sides[mode] = (task, z_D, REGISTRY.get("psgd")(z_D, lr=0.01, momentum=0.9, weight_decay=0.0))
        for _ in range(2):  # warm-up
            train_step(task, z_D, sides[mode][2], x, y)
    times: Dict[str, List[float]] = {m: [] for m in sides}
    for r in range(rounds):
        for mode in rotated(list(sides), r):
            task, z_D, opt = sides[mode]
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(task, z_D, opt, x, y)
            sync()
            times[mode].append((time.perf_counter() - t0) / steps)
    return {m: {"step_s": statistics.median(times[m]), "allreduce_floats_per_step": allreduce_floats_per_step(t),
                "group_floats_per_step": group_floats_per_step(t)} for m, (t, _, _) in sides.items()}


# ---------------------------------------------------------------------------------------------------------
# the benchmark (jobs/bench/sharded_projection.py)

def basis_bytes_read(num_params: int, dim: int, world: int, root: str) -> Dict[str, Any]:
    """Store a float32 D×N basis in ``world`` blocks (as ``world`` sampling ranks write it: block_bounds), then read
    each rank's rows as a sharded worker does (`raysub.runs.basis.load_basis` with ``rows``); the bytes each rank
    read (its block and the spectrum record), against N·D·4/W."""
    import io

    import numpy as np

    from raysub.runs import basis as run_basis, layout
    from raysub.storage import ColumnWriter, RunDir, block_bounds

    run = RunDir(root)
    records = []
    gen = np.random.default_rng(0)
    for i, (a, b) in enumerate(block_bounds(num_params, world)):
        sink = io.BytesIO()
        writer = ColumnWriter(sink, dim)
        writer.write(gen.standard_normal((dim, b - a), dtype=np.float32))
        writer.close()
        rel = f"{layout.BASIS}/part_{i:03d}.arrow"
        records.append({"block": i, "start": a, "stop": b, "path": rel, "sha256": run.write_bytes(rel, sink.getvalue())})
    run.write_json(layout.spectrum(layout.BASIS), {"dim": dim, "blocks": records, "num_snapshots": dim + 1,
                                           "singular_values": [1.0] * dim})
    read: List[int] = []

    class Counting(RunDir):
        def read_bytes(self, rel, checksum=None):
            data = super().read_bytes(rel, checksum)
            read[-1] += len(data)
            return data

    for a, b in block_bounds(num_params, world):  # the spectrum is found at basis/spectrum.json, as in an older run
        read.append(0)
        rows = run_basis.load_basis(Counting(root), dim, rows=(a, b))
        assert rows.shape == (dim, b - a)
    return {"bytes_read_per_rank": read, "ideal_per_rank": num_params * dim * 4 / world}


def main(argv=None) -> int:
    """jobs/bench/sharded_projection.py: see its docstring."""

    from raysub.bench.harness import OneLineParser, loadavg, print_figures
    from raysub.l2o import LearnedOptimizerConfig, adam_like_params, save_learned_optimizer

    ap = OneLineParser("sharded_projection", description="the sharded projection: memory, step time, traffic")
    ap.add_argument("--memory-params-m", type=float, default=20.0, help="MLP size for the RSS comparison (millions)")
    ap.add_argument("--dim", type=int, default=64, help="d of the RSS comparison (default 64)")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--step-model", default="resnet20")
    ap.add_argument("--step-dim", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--basis-params-m", type=float, default=4.0, help="N of the basis-read figure (millions)")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the RSS comparison (minutes, ~10 GB)")
    ap.add_argument("--step-shape", default="3,32,32", help="input shape of the step-time model (ImageNet: 3,224,224)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the step-time figure on GPUs over NCCL, rank r on GPU r")
    ap.add_argument("--world", type=int, default=2, help="ranks of the step-time world (on cuda: at most the GPUs)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible")
    if args.device == "cuda" and args.world > torch.cuda.device_count():
        ap.error(f"--world {args.world}: only {torch.cuda.device_count()} GPUs are visible")
    shape = tuple(int(v) for v in args.step_shape.split(","))
    say = lambda line: print(f"[sharded_projection] {line}", flush=True)
    fig: Dict[str, Any] = {"loadavg_start": loadavg(), "device": args.device}
    world = 2

    say(f"step time: {args.step_model} on {shape}, d={args.step_dim}, global batch {args.batch}, W={args.world}, "
        f"{args.device}, interleaved rounds; {loadavg()}")
    steps = run_world(args.world, step_rank, args.step_model, shape, args.step_dim, args.batch, args.rounds,
                      args.steps, args.device, backend="nccl" if args.device == "cuda" else "gloo")
    fig.update(step_model=args.step_model, step_shape=list(shape), step_world=args.world)
    rep, sh = (max(r[m]["step_s"] for r in steps) for m in ("replicated", "sharded"))
    fig.update(step_s_replicated=rep, step_s_sharded=sh, step_sharded_over_replicated=sh / rep,
               step_group_floats_sharded=steps[0]["sharded"]["group_floats_per_step"],
               step_allreduce_floats=steps[0]["sharded"]["allreduce_floats_per_step"])
    say(f"  replicated {1e3 * rep:.1f} ms, sharded {1e3 * sh:.1f} ms per step: {sh / rep:.3f} (goal ≤ 1.10); "
        f"{loadavg()}")

    with tempfile.TemporaryDirectory(prefix="raysub-sharded-bench-") as tmp:
        weights = os.path.join(tmp, "weights.pt")
        config = LearnedOptimizerConfig(hidden_size=4, step_scale=0.1)
        save_learned_optimizer(weights, config, adam_like_params(config))
        node = run_world(4, equality_rank, "node", 2, ["float32"], 2, 6, weights, 0, ("psgd",))[0]["float32"]
        fig["floats_per_step_internode_node_mode"] = node["psgd/bn_train"]["allreduce_floats_per_step"]
        fig["node_mode_d"] = 6
        say(f"node mode, 2 groups × 2 ranks, d=6: {fig['floats_per_step_internode_node_mode']:g} floats per step cross "
            f"the groups (goal d+1 = 7); {node['psgd/bn_train']['group_floats_per_step']:g} stay inside a group")

        n = int(args.basis_params_m * 1e6)
        reads = basis_bytes_read(n, args.step_dim, world, os.path.join(tmp, "basis_run"))
        fig["basis_bytes_read_per_rank"] = max(reads["bytes_read_per_rank"])
        fig["basis_bytes_ideal_per_rank"] = reads["ideal_per_rank"]
        say(f"basis of N={n:,}, d={args.step_dim} in {world} blocks: each rank read {reads['bytes_read_per_rank']} "
            f"bytes, N·d·4/W = {reads['ideal_per_rank']:,.0f}")

    if not args.skip_memory:
        hidden = mlp_of(args.memory_params_m)
        mem = {}
        for mode in ("replicated", "sharded"):
            say(f"memory: MLP {hidden} (~{args.memory_params_m:g}M parameters), dense P kept, d={args.dim}, W={world}, "
                f"{mode}; {loadavg()}")
            ranks = run_world(world, memory_rank, mode, hidden, args.dim, args.memory_steps)
            mem[mode] = {"peak_rss": max(r["peak_rss"] for r in ranks), "p_bytes": ranks[0]["p_bytes"],
                         "step_s": max(r["step_s"] for r in ranks), "num_params": ranks[0]["num_params"]}
            say(f"  peak RSS {mem[mode]['peak_rss'] / 1e9:.2f} GB per worker, P {mem[mode]['p_bytes'] / 1e9:.2f} GB, "
                f"{mem[mode]['step_s']:.2f} s per step")
        fig.update(memory_num_params=mem["sharded"]["num_params"], memory_dim=args.dim,
                   peak_rss_replicated=mem["replicated"]["peak_rss"], peak_rss_sharded=mem["sharded"]["peak_rss"],
                   p_rss_sharded_over_replicated=mem["sharded"]["peak_rss"] / mem["replicated"]["peak_rss"],
                   step_sharded_over_replicated_memory_size=mem["sharded"]["step_s"] / mem["replicated"]["step_s"])
    fig["loadavg_end"] = loadavg()
    print_figures(fig)
    return 0
