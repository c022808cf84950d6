"""Torch-free linear algebra of the DLDR basis — what the basis stage (`raysub.pipeline.basis`) and the sampler's
streamed Gram (`raysub.pipeline.stream_gram`) both need.

- Gram space: `centre_gram` (C K C), `solve_spectrum` (eigh, the top components, the sign convention);
- the basis from the Gram: `increment_coefficients` and `basis_tile` (U_b = Σ_s q_s Δ_s, float32 GEMMs);
- the record: `spectrum_record` (``spectrum.json``); a stored basis is read through the run-directory service
  (`raysub.runs.basis`).

Shape suffixes: ``_TT`` T×T over the snapshots, ``_TD`` / ``_DT`` snapshots × basis components, ``_Tn`` a tile of
n coordinates, ``_DN`` the basis over all N parameters. The math is in `raysub.pipeline.basis` and
`raysub.pipeline.stream_gram`'s docstrings.

No torch here: the basis stage's block actors import this module, and importing torch in each of them cost ~1 s of
CPU per actor (`increment_coefficients` and `basis_tile` take torch tensors too, recognised without importing it).
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from raysub.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------
# Gram space


def centre_gram(K_TT: np.ndarray) -> np.ndarray:
    """C K C: the Gram of the mean-centred snapshots, from the Gram of any common offset (here θ0)."""
    row = K_TT.mean(axis=0, keepdims=True)
    return K_TT - row - row.T + K_TT.mean()


def solve_spectrum(gram_TT: np.ndarray, dim: int) -> Dict[str, Any]:
    """eigh of the summed Gram; the top ``dim`` components with the sign convention applied.

    Raises:
        ConfigError: ``dim`` ≥ T, or ``dim`` exceeds the numerical rank of the trajectory.
    """
    T = gram_TT.shape[0]
    if not 0 < dim < T:
        raise ConfigError(f"basis.dim={dim} must be in [1, {T - 1}] for {T} snapshots (the centred trajectory has "
                          f"rank ≤ {T - 1}): lower basis.dim or sample more snapshots")
    evals, evecs = np.linalg.eigh(gram_TT)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0.0, None), evecs[:, order]
    tol = evals[0] * T * np.finfo(np.float64).eps * 10 if evals[0] > 0 else 1.0
    rank = int((evals > tol).sum())
    if dim > rank:
        raise ConfigError(f"basis.dim={dim} exceeds the numerical rank {rank} of the trajectory (snapshots are "
                          f"linearly dependent): lower basis.dim to ≤ {rank}")
    V_TD = evecs[:, :dim].copy()
    pivot = np.abs(V_TD).argmax(axis=0)
    V_TD *= np.sign(V_TD[pivot, np.arange(dim)])
    sigma = np.sqrt(evals)
    total = evals.sum()
    return {"eigenvalues": evals, "singular_values": sigma, "V": V_TD,
            "explained_variance_ratio": evals / total if total > 0 else np.zeros_like(evals), "rank": rank}


# ---------------------------------------------------------------------------------------------------------
# the basis from the Gram: U_b = D_bᵀ C V_D Σ_D⁻¹ from the block a rank (or a basis actor) holds

def _is_tensor(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def increment_coefficients(proj_TD):
    """Q (D×(T−1), float32, numpy or torch like ``proj_TD``): U_b = Σ_s Q[:, s−1] Δ_s with Δ_s = θ_s − θ_{s−1}.

    The Gram was taken relative to θ0, so the centring moves into the projection: W̃ = C W = C X with
    X_t = θ_t − θ0, hence U_b = X_bᵀ P, P = C V_D Σ_D⁻¹. Writing X_t = Σ_{s≤t} Δ_s turns this into
    U_b = Σ_s q_s Δ_s with q_s = Σ_{t≥s} p_t (a reverse cumulative sum, s = 1..T−1; X_0 = 0 drops out).
    Summing increments instead of positions is what makes a float32 GEMM accurate here: the positions of an SGD
    trajectory are strongly correlated, so Σ_t p_t X_t of a small-σ component cancels terms ~σ_1/σ_d times its
    size, while the increments are close to uncorrelated and barely cancel. Measured against a float64 GEMM
    (digits MLP, T = 21, d = 15; the benchmark's planted trajectory, T = 100, d = 40): largest principal angle
    6.6e-6° and 1.4e-5° (float32 GEMM of positions: 8.9e-5° and 4.6e-5°), each basis vector within 1.3e-7 and
    2.5e-7 — the rounding of the stored float32 basis itself. It runs ~5× faster than the float64 GEMM it
    replaces (`jobs/bench/basis.py`).
    """
    if _is_tensor(proj_TD):
        P = proj_TD.double() - proj_TD.double().mean(dim=0, keepdim=True)
        Q = P.flip(0).cumsum(0).flip(0)[1:]
        return Q.t().contiguous().float()
    P = np.asarray(proj_TD, dtype=np.float64)
    P = P - P.mean(axis=0, keepdims=True)
    Q = np.cumsum(P[::-1], axis=0)[::-1][1:]
    return np.ascontiguousarray(Q.T, dtype=np.float32)


def basis_tile(coef_DT, W_Tn):
    """Columns of U_b for one tile of snapshots W_Tn (T×n, float32): Q (W_Tn[1:] − W_Tn[:−1]), float32
    throughout (`increment_coefficients`)."""
    return coef_DT @ (W_Tn[1:] - W_Tn[:-1])


# ---------------------------------------------------------------------------------------------------------
# the stored basis: spectrum.json and its shards

def spectrum_record(spec: Dict[str, Any], dim: int, dtype: str, blocks: List[Dict[str, Any]],
                    timings: Dict[str, float], gram_source: str) -> Dict[str, Any]:
    """``spectrum.json``'s contents: the solved spectrum, the basis shards (``blocks``: block, start, stop, path,
    sha256, ...), the timings and where the Gram came from ("posthoc" or "stream")."""
    return {
        "dim": dim,
        "num_snapshots": int(len(spec["eigenvalues"])),
        "rank": spec["rank"],
        "dtype": dtype,
        "eigenvalues": spec["eigenvalues"].tolist(),
        "singular_values": spec["singular_values"].tolist(),
        "explained_variance_ratio": spec["explained_variance_ratio"].tolist(),
        "explained_variance_top_dim": float(spec["explained_variance_ratio"][:dim].sum()),
        "right_singular_vectors": spec["V"].tolist(),
        "blocks": blocks,
        "gram_source": gram_source,
        "timings": timings,
    }
