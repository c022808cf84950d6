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
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from raysub.errors import StorageError
# the Gram-space algebra and the stored basis's reading live below the stages (the sampler needs them too);
# the names stay importable from here
from raysub.linalg import (basis_tile, centre_gram, increment_coefficients,
                            solve_spectrum, spectrum_record)
from raysub.runs.basis import basis_dir, load_basis, read_spectrum  # noqa: F401  (re-exported: the stage's readers)
from raysub.storage import ColumnWriter, RunDir, basis_rel, decode_vector

TILE = 1 << 16  # columns per float64 tile: T·TILE·8 bytes (52 MB at T=100)
ACTOR_RESTARTS = 3  # restarts of a block actor whose process or node died (each rereads its block)


def _node_id() -> Optional[str]:
    """The Ray node this runs on (recorded per block in spectrum.json), None outside Ray."""
    # heavy: ray loads here, not when this module is imported
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
        self.W_TN: Optional[np.ndarray] = None

    def where(self) -> Dict[str, Any]:
        """This actor's process and node (for operators, and for the tests that kill it)."""
        return {"pid": os.getpid(), "node": _node_id()}

    def load(self) -> float:
        t0 = time.perf_counter()
        self.W_TN = np.empty((len(self.shards), self.num_coords), dtype=np.float32)
        for i, (rel, checksum) in enumerate(self.shards):
            buf = self.run.read_buffer(rel, checksum)
            decode_vector(buf, out=self.W_TN[i])
            del buf
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
            writer.close()
        return {"path": basis_rel(self.block, prefix), "sha256": sink.sha256, "load_s": load_s,
                "write_s": time.perf_counter() - t0, "node": _node_id()}

    def write_basis(self, proj_TD: np.ndarray, dtype: str = "float32", prefix: str = "basis") -> Dict[str, Any]:
        """U_b = W̃_bᵀ (V_D Σ_D⁻¹), streamed tile by tile into this block's basis shard.

        Returns:
            Its path and sha256, the write time and the actor's node (`raysub.bench.basis.MeasuredBlockGram`
            adds the actor's memory).
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
            writer.close()
        return {"path": basis_rel(self.block, prefix), "sha256": sink.sha256, "write_s": time.perf_counter() - t0,
                "node": _node_id()}


def write_streamed_block(run_uri: str, block: int, shards: List[Tuple[str, str]], num_coords: int,
                         proj_TD: np.ndarray, dtype: str, prefix: str, block_class: Optional[type] = None
                         ) -> Dict[str, Any]:
    """One block of the basis from a streamed Gram (a Ray task): read it once, write U_b (`BlockGram`)."""
    return (block_class or BlockGram)(run_uri, block, shards, num_coords).write_basis_streamed(proj_TD, dtype, prefix)


def build_basis(run: RunDir, dim: int, blocks: List[Dict[str, Any]], shards: Dict[str, str],
                dtype: str = "float32", prefix: str = "basis", streamed_gram: Optional[np.ndarray] = None,
                block_class: Optional[type] = None) -> Dict[str, Any]:
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
        block_class: what holds a block (default `BlockGram`); the basis benchmark passes a subclass that measures
            each block's memory (`raysub.bench.basis.MeasuredBlockGram`), so this stage measures none.
    Returns:
        The spectrum record written to ``PREFIX/spectrum.json`` plus per-block timings (and what ``block_class``
        adds).
    """
    # heavy: ray loads here, not when this module is imported
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
        writes = ray.get([task.remote(run.uri, b["block"], e, b["stop"] - b["start"], proj_TD, dtype, prefix,
                                      block_class) for b, e in zip(blocks, entries_of)])
        grams = [{"load_s": 0.0, "gram_s": 0.0}]
    else:
        # every block stays in memory between the two passes, so all block actors must be alive at once
        Actor = block_actor_class(min(1.0, cpus / len(blocks)), block_class or BlockGram)
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


def block_actor_class(num_cpus: float, block_class: Optional[type] = None):
    """`BlockGram` as a Ray actor: spread over the cluster's nodes (each block's memory on its own node where there
    are enough), and restarted when it dies (its process killed, its node lost). A restarted actor holds no block:
    the retried call rereads it from the run directory (verified against the manifest), so a restart costs one
    block's read. Both calls are idempotent: the Gram is recomputed, the shard rewritten atomically."""
    # heavy: ray loads here, not when this module is imported
    import ray

    return ray.remote(num_cpus=num_cpus, scheduling_strategy="SPREAD", max_restarts=ACTOR_RESTARTS,
                      max_task_retries=ACTOR_RESTARTS)(block_class or BlockGram)
