"""The basis benchmark's costs (`raysub.bench.basis`): the streamed stage's physical floor, the streaming
Gram's cost to a sampling rank, and the block actors' memory (measured by `MeasuredBlockGram` around the
basis stage's own `BlockGram`, which measures none)."""
from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import numpy as np

from raysub.bench.harness import peak_rss_bytes, reset_peak_rss, rotated, rss_bytes
from raysub.pipeline.basis import BlockGram
from raysub.storage import RunDir, block_bounds
from raysub.pipeline.stream_gram import StreamGram


class Floor:
    """The streamed basis stage's physical floor on this machine: one plain sequential read of the trajectory
    (`read_all`, measured alongside), one plain write of the D×N float32 basis bytes (one file per block, pyarrow
    output stream, no checksum) and one float32 GEMM of U_b's shape per block, (D×T)(T×n_b), numpy on this
    process's threads. The operands are made once, before any timing."""

    def __init__(self, run: RunDir, n: int, t: int, dim: int, num_blocks: int, seed: int):
        self.run, self.dim, self.num_blocks = run, dim, num_blocks
        self.bounds = block_bounds(n, num_blocks)
        nb = max(hi - lo for lo, hi in self.bounds)
        rng = np.random.default_rng(seed)
        self.W_TN = rng.standard_normal((t, nb), dtype=np.float32)
        self.P_DT = rng.standard_normal((dim, t), dtype=np.float32)
        self.U_DN = np.zeros((dim, nb), dtype=np.float32)  # the GEMM's output; its bytes are what write() writes

    def write(self) -> float:
        self.run.fs.create_dir(self.run.path("floor"))
        t0 = time.perf_counter()
        for b, (lo, hi) in enumerate(self.bounds):
            with self.run.fs.open_output_stream(self.run.path(f"floor/basis_{b}.bin")) as sink:
                sink.write(memoryview(self.U_DN.reshape(-1)[: self.dim * (hi - lo)]))
        secs = time.perf_counter() - t0
        self.run.delete("floor")
        return secs

    def gemm(self) -> float:
        t0 = time.perf_counter()
        for lo, hi in self.bounds:
            np.matmul(self.P_DT, self.W_TN[:, : hi - lo], out=self.U_DN[:, : hi - lo])
        return time.perf_counter() - t0


def floor_figures(read_s: float, write_s: float, gemm_s: float, stream_basis_s: float, basis_s: float) -> dict:
    floor = read_s + write_s + gemm_s
    return {"floor_read_s": read_s, "floor_write_s": write_s, "floor_gemm_s": gemm_s, "floor_s": floor,
            "stream_basis_s": stream_basis_s, "stream_basis_over_posthoc": stream_basis_s / basis_s,
            "stream_basis_over_floor": stream_basis_s / floor}


def overhead_ratio(step_s: float, steps_per_snapshot: int, snapshots: int, stream_s: float) -> float:
    """Sampling time with the streaming Gram ÷ without, for a window of ``snapshots`` (θ0 included, taken before
    the first step) at one snapshot every ``steps_per_snapshot`` steps: the steps cost the same either way (the
    interleaved rounds show it), the stream adds ``stream_s`` over the window (every add and window check)."""
    train_s = (snapshots - 1) * steps_per_snapshot * step_s
    return (train_s + stream_s) / train_s


def stream_overhead(model_name: str = "resnet20", batch: int = 128, steps_per_snapshot: int = 390,
                    snapshots: int = 51, dim: int = 40, rounds: int = 6, steps_per_round: int = 8,
                    seed: int = 0) -> dict:
    """What the streaming Gram costs a sampling rank, in this process on the CPU, at DLDR's CIFAR-10 protocol by
    default (ResNet-20, batch 128, one snapshot per 390-step epoch, 51 snapshots with θ0, adaptive checks at
    d = 40 every epoch: `raysub/configs/cifar10_resnet20.yaml`).

    1. Interleaved rounds of ``steps_per_round`` SGD steps (synthetic data), alternately followed by a
       streaming-Gram add and window check (what `sample_loop` does at a snapshot) and by nothing: the step time
       with and without the stream beside it (ABBA order, median).
    2. The window's whole stream cost: ``snapshots`` adds and checks into a `StreamGram` of that capacity, each
       timed (the row of snapshot t costs t + 1 products, so the late ones cost most).
    `overhead_ratio` puts them together.
    """

    # heavy: torch loads here, not when this module is imported
    import torch

    # heavy: torch loads here, not when this module is imported
    from raysub.engine.flat import flatten_params
    from raysub.models import build_model
    from raysub.pipeline.sample import window_check

    torch.manual_seed(seed)
    model = build_model(model_name, 10, (3, 32, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = SimpleNamespace(basis=SimpleNamespace(dim=dim))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def snapshot(stream, signals):
        with torch.no_grad():
            stream.add(flatten_params(model))
        window_check(stream, signals, len(signals) + 1, cfg)

    model.train()
    for _ in range(3):
        step()
    with_s, without_s = [], []
    stream, signals = StreamGram(rounds + 1, n, "cpu", lambda row: None), []
    with torch.no_grad():
        stream.add(flatten_params(model))
    for r in range(rounds):
        for streaming in rotated((True, False), r):
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            (with_s if streaming else without_s).append((time.perf_counter() - t0) / steps_per_round)
            if streaming:
                snapshot(stream, signals)
    # the whole window's stream: every add (rows of growing length) and every check
    stream, signals, costs = StreamGram(snapshots, n, "cpu", lambda row: None), [], []
    for s in range(snapshots):
        with torch.no_grad():
            for p in model.parameters():  # a new point per snapshot (an SGD step's worth of change)
                p.add_(torch.randn_like(p), alpha=1e-3)
        t0 = time.perf_counter()
        snapshot(stream, signals)
        costs.append(time.perf_counter() - t0)
    step_s = statistics.median(without_s)
    return {"overhead_model": model_name, "overhead_params": n, "overhead_batch": batch,
            "overhead_steps_per_snapshot": steps_per_snapshot, "overhead_snapshots": snapshots,
            "overhead_dim": dim, "step_s_without_stream": step_s, "step_s_with_stream": statistics.median(with_s),
            "step_s_with_over_without": statistics.median(with_s) / step_s,
            "stream_window_s": float(sum(costs)), "stream_add_max_s": float(max(costs)),
            "stream_gram_overhead": overhead_ratio(step_s, steps_per_snapshot, snapshots, float(sum(costs)))}


# ----------------------------------------------------------------------------------------------- memory


class MeasuredBlockGram(BlockGram):
    """`BlockGram` that also reports its actor's memory with each basis shard it writes: the RSS when it started
    (``start_rss``), its peak (``peak_rss``, the kernel's high-water mark, reset when the actor starts where the
    kernel allows: ``peak_rss_source``) and its block's bytes. What `build_basis(..., block_class=...)` runs for the
    benchmark; the production stage measures nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.peak_source = reset_peak_rss()  # the peak of this actor, not of the worker process before it
        self.rss0 = rss_bytes()

    def memory(self) -> dict:
        """This actor's memory now: start and peak RSS, its source, the block's bytes."""
        return {"peak_rss": max(self.rss0, peak_rss_bytes()), "peak_rss_source": self.peak_source,
                "start_rss": self.rss0, "block_bytes": self.W_TN.nbytes}

    def write_basis(self, *args, **kwargs) -> dict:
        """`BlockGram.write_basis` plus `memory`."""
        return {**super().write_basis(*args, **kwargs), **self.memory()}

    def write_basis_streamed(self, *args, **kwargs) -> dict:
        """`BlockGram.write_basis_streamed` plus `memory`."""
        return {**super().write_basis_streamed(*args, **kwargs), **self.memory()}



def raysub_memory(blocks) -> dict:
    """raysub's memory figures from a basis record's "blocks" entries (one per block actor).

    Every block actor holds its block from the Gram pass to the write pass, so all of them are resident at once:
    raysub's footprint is the sum of the actors' peaks (an upper bound: their peaks need not coincide). The
    per-actor ratios compare one actor with its own block.
    """
    peaks = [int(b["peak_rss"]) for b in blocks]
    return {
        "peak_ram_over_block": max((b["peak_rss"] - b["start_rss"]) / b["block_bytes"] for b in blocks),
        "peak_rss_over_block_abs": max(b["peak_rss"] / b["block_bytes"] for b in blocks),
        "raysub_actor_peak_rss_bytes": max(peaks),
        "raysub_actor_peak_rss_bytes_all": peaks,
        "raysub_peak_rss_sum_bytes": sum(peaks),
        "raysub_peak_rss_source": sorted({b.get("peak_rss_source", "sampled") for b in blocks}),
        "block_bytes": max(int(b["block_bytes"]) for b in blocks),
    }


def reference_over_raysub_ram(reference_peak_rss: int, mem: dict) -> float:
    """The reference process's peak RSS over raysub's: the sum of the block actors' peaks (`raysub_memory`)."""
    return reference_peak_rss / mem["raysub_peak_rss_sum_bytes"]

