"""The trajectory's Gram matrix, built while sampling; the stopping signal read from it; the basis from it.

Used by the sampler (`raysub.pipeline.sample`: `StreamGram`, `stop_decision`, `close_window`, which writes
``trajectory/gram.pt`` and, with ``sample.write_basis``, the ranks' blocks of the basis) and by the basis stage
(`read_streamed_gram`; `basis_tile` is the one read-and-GEMM pass of `BlockGram.write_basis_streamed`).

Every sampling rank keeps its block of the snapshots taken so far (float32, on its device). When snapshot t
arrives the rank computes row t of the Gram of its block *relative to θ0* (snapshot 0),

    K_b[t, j] = (θ_t − θ0)_b · (θ_j − θ0)_b,    j ≤ t      (float64 tiles; t+1 numbers)

and the row is all-reduced, so every rank holds the same full K = Σ_b K_b. Centring is exact in Gram space:
with C = I − 11ᵀ/T, the centred Gram W̃W̃ᵀ = C K C (a common offset — here θ0 — cancels), so the basis stage
needs only K. Differences from θ0 are formed in float64 from the float32 snapshots (exactly what is written to
disk), so K equals the post-hoc float64 Gram to rounding (~1e-15 relative).

Stopping signal (``sample.stop: adaptive``), from K alone at the end of every epoch e: the *reach residual*

    r_e = ‖(I − UUᵀ)(θ_a − θ0)‖ / ‖θ_a − θ0‖,   U = W̃_sᵀ V Σ⁻¹ (top d of snapshots 0..s−1, s: the previous check),
    Uᵀ(θ_a − θ0) = Σ⁻¹ Vᵀ C_s K[:s, a],   ‖θ_a − θ0‖² = K[a, a]   (a: the latest snapshot)

— how much of where SGD has got to by now the subspace found one epoch earlier cannot reach: an out-of-sample
test of the subspace that P-SGD/P-BFGS will train in. It falls while training still opens new directions and
levels off once it does not; the window ends when it has fallen by less than ``sample.stop_threshold`` of itself
(relative drop, default 5%) at ``sample.stop_patience`` (2) successive checks. Measured on Fashion-MNIST LeNet-5
(snapshots every 20 steps, d = 40): r = 0.34, 0.27, 0.23, 0.22, 0.21, 0.20, 0.19 at epochs 2..8 (drops 21%, 15%,
4%, 6%, 5%, 3%), so the rule ends the window at epoch 8, where the subspace optimizers' final accuracy levels off
(`jobs/bench/window_tradeoff.py`). Rejected: the share of the last epoch's displacement outside the subspace
(`outside_fraction`) rises 0.83 → 0.95 on that run — each epoch's own movement is mostly SGD noise — and the
principal angles between successive top-d subspaces stay near 90° for the same reason (both still recorded).

Shape suffixes (`raysub.engine.flat`'s legend): ``_TT`` T×T over the snapshots (``K_TT``: K, the Gram, is a name,
not a dimension), ``_TN`` the snapshots × a block's parameters, ``_DT`` basis components × snapshots, ``_Td`` the
snapshots × the top d components.
"""
from __future__ import annotations

import io
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

import numpy as np

# the Gram-space algebra the basis stage shares (torch-free); the names stay importable from here
from raysub.linalg import basis_tile, centre_gram, increment_coefficients, solve_spectrum, spectrum_record
from raysub.runs import layout
from raysub.runs.manifest import Manifest
from raysub.errors import ConfigError, StorageError
from raysub.storage import ColumnWriter, basis_rel

# torch is imported where it is used: the basis stage's block workers import this module for `basis_tile` alone, and
# importing torch in each of them cost ~1 s of CPU per worker — more than the streamed basis stage's whole work at
# small sizes (jobs/bench/basis.py)
if TYPE_CHECKING:
    import torch

    from raysub.config import Config
    from raysub.storage import RunDir

TILE = 1 << 16  # columns per float64 tile
GRAM_REL = layout.STREAM_GRAM


class StreamGram:
    """One rank's side of the streaming Gram.

    Args:
        capacity: the most snapshots the window can take (θ0 included).
        block_numel: coordinates of this rank's block.
        device: where the block buffer lives (the training device).
        reduce: sums a float64 tensor over ranks in place (`loop.all_reduce_sum_`); identity on one rank.
    """

    def __init__(self, capacity: int, block_numel: int, device, reduce: Callable[[torch.Tensor], Any]):
        # heavy: torch loads here, not when this module is imported
        import torch

        self.W_TN = torch.empty((capacity, block_numel), dtype=torch.float32, device=device)
        self.K_TT = np.zeros((capacity, capacity), dtype=np.float64)
        self.count = 0
        self.reduce = reduce

    def _row(self, t: int) -> torch.Tensor:
        # heavy: torch loads here, not when this module is imported
        import torch

        n = self.W_TN.shape[1]
        row = torch.zeros(t + 1, dtype=torch.float64, device=self.W_TN.device)
        for start in range(0, n, TILE):
            stop = min(n, start + TILE)
            X = self.W_TN[: t + 1, start:stop].double()
            X -= X[0].clone()  # relative to θ0 (snapshot 0): float64, so the differences are exact
            row += X @ X[t]
        return row

    def add(self, block: torch.Tensor) -> None:
        """Snapshot ``count``: store this rank's block and append row ``count`` of the global Gram."""
        t = self.count
        if t >= self.W_TN.shape[0]:
            raise RuntimeError(f"streaming Gram full: {t} snapshots (capacity {self.W_TN.shape[0]})")
        self.W_TN[t].copy_(block.detach().reshape(-1))
        row = self._row(t)
        self.reduce(row)
        row = row.cpu().numpy()
        self.K_TT[t, : t + 1] = row
        self.K_TT[: t + 1, t] = row
        self.count = t + 1

    def truncate(self, count: int) -> None:
        """Forget snapshots from ``count`` on (a resumed epoch rewrites them)."""
        self.K_TT[count:, :] = 0.0
        self.K_TT[:, count:] = 0.0
        self.count = count

    @property
    def gram(self) -> np.ndarray:
        """K (T×T, relative to θ0, uncentred) of the snapshots so far."""
        return self.K_TT[: self.count, : self.count]

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps: the Gram and its count (the block itself is reread from the shards)."""
        return {"gram": self.gram.copy(), "count": self.count}

    def load_state_dict(self, state: Dict[str, Any], blocks) -> None:
        """Restore from a checkpoint; ``blocks`` yields this rank's first ``count`` snapshot blocks (verified)."""
        # heavy: torch loads here, not when this module is imported
        import torch

        count = int(state["count"])
        for t, values in enumerate(blocks):
            if t >= count:
                break
            self.W_TN[t].copy_(torch.as_tensor(values))
        self.K_TT[:] = 0.0
        self.K_TT[:count, :count] = state["gram"]
        self.count = count


# ---------------------------------------------------------------------------------------------------------
# Gram-space linear algebra (driver and ranks alike)

def centring(T: int) -> np.ndarray:
    return np.eye(T) - np.full((T, T), 1.0 / T)


def top_subspace(K_TT: np.ndarray, dim: int):
    """(V_Td, σ_d) of the centred snapshots' top ``dim`` components (fewer when the rank is lower)."""
    G = centre_gram(K_TT)
    evals, evecs = np.linalg.eigh(G)
    order = np.argsort(evals)[::-1][:dim]
    evals, evecs = evals[order], evecs[:, order]
    keep = evals > max(evals[0], 0.0) * len(G) * np.finfo(np.float64).eps * 10 if len(evals) else evals > 0
    return evecs[:, keep], np.sqrt(evals[keep])


def outside_fraction(K_TT: np.ndarray, s: int, t: int, dim: int) -> float:
    """ρ: the fraction of ‖θ_t − θ_{s−1}‖² outside the top-``dim`` subspace of snapshots 0..s−1 (module doc).

    Args:
        K_TT: the Gram relative to θ0 of at least ``t + 1`` snapshots.
        s: snapshots in the reference set (0..s−1); the displacement starts at snapshot s − 1.
        t: the displacement ends at snapshot t (t ≥ s).
    """
    a, b = s - 1, t
    delta_sq = K_TT[b, b] - 2 * K_TT[a, b] + K_TT[a, a]
    if delta_sq <= 0:
        return 0.0
    V, sigma = top_subspace(K_TT[:s, :s], dim)
    if len(sigma) == 0:
        return 1.0
    cross = K_TT[:s, b] - K_TT[:s, a]  # W_s (θ_t − θ_{s−1}), rows relative to θ0
    cross = cross - cross.mean()  # C_s: centring the reference set
    coef = (V.T @ cross) / sigma
    inside = float(coef @ coef)
    return float(min(1.0, max(0.0, 1.0 - inside / delta_sq)))


def subspace_drift(K_TT: np.ndarray, s: int, t: int, dim: int) -> Dict[str, float]:
    """Principal angles between the top-``dim`` subspaces of snapshots 0..s−1 and 0..t−1 (s ≤ t).

    U_sᵀU_t = Σ_s⁻¹ V_sᵀ C_s K[:s, :t] C_t V_t Σ_t⁻¹; returns the largest angle (degrees) and the mean cos².
    """
    Vs, ss = top_subspace(K_TT[:s, :s], dim)
    Vt, st = top_subspace(K_TT[:t, :t], dim)
    cross = K_TT[:s, :t]
    cross = cross - cross.mean(axis=0, keepdims=True) - cross.mean(axis=1, keepdims=True) + cross.mean()
    M = (Vs.T @ cross @ Vt) / np.outer(ss, st)
    cos = np.clip(np.linalg.svd(M, compute_uv=False), 0.0, 1.0)
    k = min(len(ss), len(st))
    cos = np.concatenate([cos, np.zeros(max(0, k - len(cos)))])[:k]
    return {"max_angle_deg": float(np.degrees(np.arccos(cos.min()))) if k else 90.0,
            "mean_cos2": float((cos ** 2).mean()) if k else 0.0}


def gram_bytes(K_TT: np.ndarray) -> bytes:
    """``trajectory/gram.pt``: the uncentred Gram relative to θ0 and its snapshot count."""
    # heavy: torch loads here, not when this module is imported
    import torch

    buf = io.BytesIO()
    torch.save({"gram": torch.from_numpy(np.ascontiguousarray(K_TT)), "num_snapshots": int(K_TT.shape[0]),
                "reference": "theta0"}, buf)
    return buf.getvalue()


def reach_residual(K_TT: np.ndarray, count: int, a: int, dim: int) -> Optional[float]:
    """‖(I − UUᵀ)(θ_a − θ0)‖ / ‖θ_a − θ0‖ with U the top-``dim`` basis of snapshots 0..count−1, from K alone
    (module doc); None when θ_a = θ0.

    Args:
        K_TT: the Gram relative to θ0 of at least ``max(count, a + 1)`` snapshots.
        count: snapshots in the reference set (0..count−1).
        a: the snapshot whose displacement from θ0 is projected.
    """
    norm_sq = K_TT[a, a]
    if norm_sq <= 0:
        return None
    V, sigma = top_subspace(K_TT[:count, :count], dim)
    if len(sigma) == 0:
        return 1.0
    cross = K_TT[:count, a] - K_TT[:count, a].mean()  # C_s: centring the reference set
    coef = (V.T @ cross) / sigma
    return float(np.sqrt(max(0.0, 1.0 - float(coef @ coef) / norm_sq)))


def stop_decision(signals, threshold: float, patience: int, min_snapshots: int, count: int) -> bool:
    """Adaptive stop: at each of the last ``patience`` checks the reach residual fell by less than ``threshold``
    of its previous value (a rise counts as no fall), and at least ``min_snapshots`` were taken."""
    if count < min_snapshots or len(signals) < patience:
        return False
    recent = [s.get("residual_drop") for s in signals[-patience:]]
    return all(r is not None and math.isfinite(r) and r < threshold for r in recent)


# ---------------------------------------------------------------------------------------------------------
# the window's end and the basis stage: U_b = D_bᵀ C V Σ⁻¹ from the block a rank (or a basis actor) holds

def close_window(run: RunDir, stream, rank: int, bounds, cfg: Config, basis_prefix) -> Dict[str, str]:
    """The window's end: rank 0 writes ``trajectory/gram.pt``; with ``sample.write_basis`` every rank writes its
    block of the basis (`write_stream_basis`). Returns {path: sha256} of the records this rank wrote (the writer's
    digests, which the driver commits: it never hashes them by re-reading)."""
    written = {}
    if rank == 0:
        written[GRAM_REL] = run.write_bytes(GRAM_REL, gram_bytes(stream.gram))
    if basis_prefix:
        spectrum = write_stream_basis(run, stream, rank, bounds, cfg, basis_prefix)
        if spectrum is not None:
            written[layout.spectrum(basis_prefix)] = spectrum
    return written


def write_stream_basis(run: RunDir, stream, rank: int, bounds, cfg: Config, prefix: str) -> Optional[str]:
    """Every rank writes its block U_b = D_bᵀ C V_D Σ_D⁻¹ of the basis from the block it holds (no read of the
    trajectory); rank 0 writes ``PREFIX/spectrum.json``, which the driver commits as the basis stage.

    V and Σ come from rank 0's eigh of the (identical) centred Gram, sent to every rank. A window whose rank is
    below ``basis.dim`` writes nothing: the basis stage then reports it. Returns rank 0's spectrum.json sha256.
    """
    # heavy: torch loads here, not when this module is imported
    import torch
    import torch.distributed as dist

    # heavy: torch loads here, not when this module is imported
    from raysub.engine import loop

    t0 = time.perf_counter()
    T, dim = stream.count, cfg.basis.dim
    ok = torch.zeros(1, dtype=torch.float64, device=stream.W_TN.device)
    proj = torch.zeros((T, dim), dtype=torch.float64, device=stream.W_TN.device)
    spec = None
    if rank == 0:
        try:
            spec = solve_spectrum(centre_gram(stream.gram), dim)
            ok += 1
            proj += torch.from_numpy(spec["V"] / spec["singular_values"][:dim]).to(proj.device)
        except ConfigError:
            pass
    loop.all_reduce_sum_(ok)
    if ok.item() < 0.5:
        return None
    loop.all_reduce_sum_(proj)  # rank 0's, on every rank
    coef_DT = increment_coefficients(proj)
    W = stream.W_TN[:T]
    rel = basis_rel(rank, prefix)
    with run.open_writer(rel) as sink:
        writer = ColumnWriter(sink, dim, "float32")
        for start in range(0, W.shape[1], TILE):
            writer.write(basis_tile(coef_DT, W[:, start : start + TILE]).cpu().numpy())
        writer.close()
    mine = {"block": rank, "path": rel, "sha256": sink.sha256, "write_s": time.perf_counter() - t0,
            "block_bytes": int(W.numel() * 4)}
    if loop.dist_ready() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    else:
        every = [mine]
    if rank == 0:
        blocks = [{"start": bounds[b["block"]][0], "stop": bounds[b["block"]][1], **b} for b in every]
        timings = {"load_s": 0.0, "gram_s": 0.0, "write_s": max(b["write_s"] for b in every),
                   "total_s": time.perf_counter() - t0}
        return run.write_json(layout.spectrum(prefix), spectrum_record(spec, dim, "float32", blocks, timings,
                                                                         "sampler"))
    return None


def read_streamed_gram(run, manifest: Manifest) -> Optional[np.ndarray]:
    """The run's streamed Gram (T×T, relative to θ0; verified against the manifest), or None when it has none.

    Raises:
        StorageError: the file is missing, corrupted or not a Gram of the trajectory's snapshot count.
    """
    # heavy: torch loads here, not when this module is imported
    import torch


    entry = manifest.stages.get("sample", {}).get("stream_gram")
    if not entry:
        return None
    fix = "rebuild from the snapshots with basis.gram=posthoc"
    try:
        state = run.read_torch(entry["path"], manifest.shards.get(entry["path"], entry["sha256"]))
    except StorageError as exc:
        raise StorageError(f"{str(exc).rstrip('.')}; or {fix}") from None
    K = state.get("gram") if isinstance(state, dict) else None
    T = manifest.num_snapshots
    if not isinstance(K, torch.Tensor) or K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape[0] != T:
        raise StorageError(f"{run.path(entry['path'])} is not the {T}×{T} Gram of this trajectory: {fix}")
    return K.double().numpy()
