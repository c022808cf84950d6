"""Stage 2 — basis: the DLDR principal directions of the trajectory, by a distributed Gram matrix.

W is the T×N trajectory (snapshots as rows), stored in blocks of coordinates. Centring subtracts each
coordinate's mean over the T snapshots, so it is exact block by block. With W̃ the centred matrix:

    G = W̃ W̃ᵀ = Σ_b W̃_b W̃_bᵀ          (T×T, float64, one term per block actor)
    G = V Λ Vᵀ, σ_k = √λ_k            (driver, eigh, descending)
    U_b = W̃_bᵀ V_D Σ_D⁻¹              (N_b×D, by each block actor)

Only T×T and T×D matrices cross the network. Each block actor reads its T snapshot shards once (verifying
checksums) into one T×N_b float32 array and keeps it for both passes; the arithmetic runs on float64 tiles of
``TILE`` columns (centring per tile, in float64, so the tiny differences between snapshots keep their digits).

Sign convention: each component is signed so that the largest-magnitude entry of its right singular vector
v_k (its coefficients over the T snapshots) is positive. Explained-variance ratio: λ_k / Σ_j λ_j.

Shape suffixes (`raysub.engine.flat`'s legend): ``_TN`` snapshots × parameters, ``_TT`` the Gram, ``_TD`` /
``_DT`` snapshots × basis components, ``_D`` one per component.
"""
from __future__ import annotations

import os
import resource
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from raysub.errors import StorageError
# the Gram-space algebra and the stored basis's reading live below the stages (the sampler needs them too);
# the names stay importable from here
from raysub.linalg import (basis_dir, basis_tile, centre_gram, increment_coefficients, load_basis,  # noqa: F401
                            read_spectrum, solve_spectrum, spectrum_record)
from raysub.storage import ColumnWriter, RunDir, basis_rel, decode_vector

TILE = 1 << 16  # columns per float64 tile: T·TILE·8 bytes (52 MB at T=100)
ACTOR_RESTARTS = 3  # restarts of a block actor whose process or node died (each rereads its block)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> str:
    """Reset this process's RSS high-water mark to its current RSS; returns what `peak_rss_bytes` reads from now.

    "vmhwm_since_reset" when the kernel took the reset (``5`` written to /proc/self/clear_refs); otherwise the
    process's lifetime peak: "vmhwm_lifetime" (VmHWM, since exec) or, without VmHWM, "ru_maxrss_lifetime".
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "vmhwm_since_reset"
    except OSError:
        return "vmhwm_lifetime" if _vmhwm_bytes() is not None else "ru_maxrss_lifetime"


def _vmhwm_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak RSS as the kernel counts it (every page ever resident, not samples of the RSS)."""
    hwm = _vmhwm_bytes()
    if hwm is not None:
        return hwm
    # KiB; Linux carries ru_maxrss across exec, so it may include the RSS of the process that started this one
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _node_id() -> Optional[str]:
    """The Ray node this runs on (recorded per block in spectrum.json), None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class BlockGram:
    """Holds one block W_b of the trajectory; computes its centred Gram and, later, its basis rows.

    Args:
        run_uri: Run directory.
        block: Block number b.
        shards: [(path, sha256)] of the block's snapshots in order.
    """

    def __init__(self, run_uri: str, block: int, shards: List[Tuple[str, str]], num_coords: int):
        self.run = RunDir(run_uri)
        self.block = block
        self.shards = shards
        self.num_coords = num_coords
        self.peak_source = reset_peak_rss()  # the peak of this actor, not of the worker process before it
        self.rss0 = _rss_bytes()
        self.peak = self.rss0
        self.W_TN: Optional[np.ndarray] = None

    def where(self) -> Dict[str, Any]:
        """This actor's process and node (for operators, and for the tests that kill it)."""
        return {"pid": os.getpid(), "node": _node_id()}

    def _track(self):
        self.peak = max(self.peak, peak_rss_bytes())

    def load(self) -> float:
        t0 = time.perf_counter()
        self.W_TN = np.empty((len(self.shards), self.num_coords), dtype=np.float32)
        for i, (rel, checksum) in enumerate(self.shards):
            buf = self.run.read_buffer(rel, checksum)
            decode_vector(buf, out=self.W_TN[i])
            if i == 0:
                self._track()
            del buf
        self._track()
        return time.perf_counter() - t0

    def gram(self) -> Dict[str, Any]:
        """{"gram": T×T float64 centred Gram of this block, "sqnorm_mean": ‖mean_b‖², timings}."""
        load_s = self.load() if self.W_TN is None else 0.0
        t0 = time.perf_counter()
        T = self.W_TN.shape[0]
        gram_TT = np.zeros((T, T), dtype=np.float64)
        for start in range(0, self.num_coords, TILE):
            X = self.W_TN[:, start : start + TILE].astype(np.float64)
            X -= X.mean(axis=0, keepdims=True)
            gram_TT += X @ X.T
            self._track()
        return {"gram": gram_TT, "load_s": load_s, "gram_s": time.perf_counter() - t0}

    def write_basis_streamed(self, proj_TD: np.ndarray, dtype: str = "float32", prefix: str = "basis"
                             ) -> Dict[str, Any]:
        """U_b from a streamed Gram: one read of the block, then per tile one GEMM (`stream_gram.basis_tile`)."""
        load_s = self.load() if self.W_TN is None else 0.0
        t0 = time.perf_counter()
        coef_DT = increment_coefficients(proj_TD)
        with self.run.open_writer(basis_rel(self.block, prefix)) as sink:
            writer = ColumnWriter(sink, proj_TD.shape[1], dtype)
            for start in range(0, self.num_coords, TILE):
                writer.write(basis_tile(coef_DT, self.W_TN[:, start : start + TILE]))
                self._track()
            writer.close()
        return {"path": basis_rel(self.block, prefix), "sha256": sink.sha256, "load_s": load_s,
                "write_s": time.perf_counter() - t0, "peak_rss": max(self.peak, peak_rss_bytes()),
                "peak_rss_source": self.peak_source, "start_rss": self.rss0, "block_bytes": self.W_TN.nbytes,
                "node": _node_id()}

    def write_basis(self, proj_TD: np.ndarray, dtype: str = "float32", prefix: str = "basis") -> Dict[str, Any]:
        """U_b = W̃_bᵀ (V_D Σ_D⁻¹), streamed tile by tile into this block's basis shard.

        Returns:
            Its path and sha256, the write time, and the actor's memory (start and peak RSS, block bytes).
        """
        if self.W_TN is None:  # a restarted actor (the first died): its block is reread from storage, verified
            self.load()
        t0 = time.perf_counter()
        # centring and product in float64 (one TILE at a time), rounded once when written: a float32 product
        # adds its own rounding over T terms and leaves the stored basis orthonormal to 1e-7–1e-6, not ~1e-9
        proj_DT = np.ascontiguousarray(proj_TD.T, dtype=np.float64)
        with self.run.open_writer(basis_rel(self.block, prefix)) as sink:
            writer = ColumnWriter(sink, proj_TD.shape[1], dtype)
            for start in range(0, self.num_coords, TILE):
                X = self.W_TN[:, start : start + TILE].astype(np.float64)
                X -= X.mean(axis=0, keepdims=True)
                writer.write(proj_DT @ X)
                self._track()
            writer.close()
        return {"path": basis_rel(self.block, prefix), "sha256": sink.sha256, "write_s": time.perf_counter() - t0,
                "peak_rss": max(self.peak, peak_rss_bytes()), "peak_rss_source": self.peak_source,
                "start_rss": self.rss0, "block_bytes": self.W_TN.nbytes, "node": _node_id()}


def write_streamed_block(run_uri: str, block: int, shards: List[Tuple[str, str]], num_coords: int,
                         proj_TD: np.ndarray, dtype: str, prefix: str) -> Dict[str, Any]:
    """One block of the basis from a streamed Gram (a Ray task): read it once, write U_b (`BlockGram`)."""
    return BlockGram(run_uri, block, shards, num_coords).write_basis_streamed(proj_TD, dtype, prefix)


def build_basis(run: RunDir, dim: int, blocks: List[Dict[str, Any]], shards: Dict[str, str],
                dtype: str = "float32", prefix: str = "basis", streamed_gram: Optional[np.ndarray] = None
                ) -> Dict[str, Any]:
    """Run the block actors on Ray, sum the Grams, solve, write the basis shards and ``PREFIX/spectrum.json``.

    Args:
        blocks: the trajectory's block indices (``trajectory/block_*/index.json`` contents).
        shards: {path: sha256} from the manifest; every snapshot is verified against it.
        prefix: the directory of this basis generation (the manifest commits it; see `basis_dir`).
        streamed_gram: the sampler's Gram relative to θ0 (`raysub.pipeline.stream_gram`): no Gram pass; the
            driver solves first, then one Ray task per block reads it once and writes U_b. Nothing has to stay
            resident between passes, so the tasks take a whole CPU each and run in Ray's already-started worker
            processes, a CPU's worth of blocks at a time (actors would each start a process: ~1.5 s on 2 cores,
            as long as the rest of the stage at 2M parameters — `jobs/bench/basis.py`).
    Returns:
        The spectrum record written to ``PREFIX/spectrum.json`` plus per-block timings and memory.
    """
    import ray

    t0 = time.perf_counter()
    cpus = ray.cluster_resources().get("CPU", 1)
    entries_of = []
    for b in blocks:
        entries = []
        for s in b["snapshots"]:
            if s["path"] not in shards:
                raise StorageError(f"snapshot {s['path']} is not in the manifest: resample with --overwrite")
            entries.append((s["path"], shards[s["path"]]))
        entries_of.append(entries)
    if streamed_gram is not None:
        spec = solve_spectrum(centre_gram(streamed_gram), dim)
        proj_TD = spec["V"] / spec["singular_values"][:dim]
        task = ray.remote(write_streamed_block).options(num_cpus=min(1.0, cpus))
        writes = ray.get([task.remote(run.uri, b["block"], e, b["stop"] - b["start"], proj_TD, dtype, prefix)
                          for b, e in zip(blocks, entries_of)])
        grams = [{"load_s": 0.0, "gram_s": 0.0}]
    else:
        # every block stays in memory between the two passes, so all block actors must be alive at once
        Actor = block_actor_class(min(1.0, cpus / len(blocks)))
        actors = [Actor.remote(run.uri, b["block"], e, b["stop"] - b["start"]) for b, e in zip(blocks, entries_of)]
        try:
            grams = ray.get([a.gram.remote() for a in actors])
            spec = solve_spectrum(sum(g["gram"] for g in grams), dim)
            proj_TD = spec["V"] / spec["singular_values"][:dim]
            writes = ray.get([a.write_basis.remote(proj_TD, dtype, prefix) for a in actors])
        finally:
            for a in actors:
                ray.kill(a)
    timings = {"load_s": max([g["load_s"] for g in grams] + [w.get("load_s", 0.0) for w in writes]),
               "gram_s": max(g["gram_s"] for g in grams), "write_s": max(w["write_s"] for w in writes),
               "total_s": time.perf_counter() - t0}
    record = spectrum_record(spec, dim, dtype, [{"block": b["block"], "start": b["start"], "stop": b["stop"], **w}
                                                for b, w in zip(blocks, writes)],
                             timings, "posthoc" if streamed_gram is None else "stream")
    record["sha256"] = run.write_json(f"{prefix}/spectrum.json", record)
    return record


def block_actor_class(num_cpus: float):
    """`BlockGram` as a Ray actor: spread over the cluster's nodes (each block's memory on its own node where there
    are enough), and restarted when it dies (its process killed, its node lost). A restarted actor holds no block:
    the retried call rereads it from the run directory (verified against the manifest), so a restart costs one
    block's read. Both calls are idempotent: the Gram is recomputed, the shard rewritten atomically."""
    import ray

    return ray.remote(num_cpus=num_cpus, scheduling_strategy="SPREAD", max_restarts=ACTOR_RESTARTS,
                      max_task_retries=ACTOR_RESTARTS)(BlockGram)
