"""The window trade-off benchmark's logic (`raysub.bench.window_tradeoff`): the trajectory's window prefixes
and their bases, the stopping signals, the time-to-target bookkeeping and the optimizers' configs."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from raysub.config import Config, merge, parse_overrides
from raysub.errors import ConfigError
from raysub.pipeline.basis import solve_spectrum
from raysub.pipeline.stream_gram import (centre_gram, outside_fraction, reach_residual, stop_decision,
                                         subspace_drift)
from raysub.runs.manifest import Manifest
from raysub.storage import decode_vector

# Shapes: T snapshots, N parameters, D basis components.

SAMPLE_OVERRIDES = ["sample.epochs=15", "sample.snapshot_every_steps=20", "sgd.epochs=30"]
TRAIN_DEFAULTS: Dict[str, List[str]] = {
    "psgd": ["train.optimizer=psgd", "train.lr=1.0", "train.momentum=0.9", "train.batch_size=128",
             "train.epochs=10", "train.lr_milestones=[7]", "train.lr_gamma=0.1", "train.weight_decay=0.0",
             "train.optimizer_options={}"],
    "pbfgs": ["train.optimizer=pbfgs", "train.batch_size=1024", "train.epochs=10", "train.lr_milestones=[]",
              "train.optimizer_options={c: 0.4, beta: 0.55, max_backtracks: 20, y_same_batch: false}",
              "train.projection_options={scale: std}"],
    "adam": ["train.optimizer=adam", "train.lr=0.1", "train.momentum=0.9", "train.batch_size=128",
             "train.epochs=10", "train.lr_milestones=[7]", "train.lr_gamma=0.1", "train.weight_decay=0.0",
             "train.optimizer_options={}"],
}
RESIDUAL_AHEAD = (1, 2, 3)


# ---------------------------------------------------------------------------------------------------------
# the trajectory, its Gram and the prefix bases

def read_trajectory(run, manifest: Manifest, count: Optional[int] = None):
    """The first ``count`` (all) snapshots as a T×N float32 array, every shard verified against the manifest.

    Returns:
        (W_TN, [{"snapshot", "step", "epoch"}] of the T snapshots).
    """
    # heavy: torch (imported by raysub.pipeline.sample) loads here, not when this module is imported
    from raysub.pipeline.sample import collect_trajectory

    blocks, _ = collect_trajectory(run, manifest.shards)
    blocks = sorted(blocks, key=lambda b: b["start"])
    T = len(blocks[0]["snapshots"]) if count is None else count
    W_TN = np.empty((T, blocks[-1]["stop"]), dtype=np.float32)
    for b in blocks:
        for i, s in enumerate(b["snapshots"][:T]):
            decode_vector(run.read_buffer(s["path"], manifest.shards[s["path"]]), out=W_TN[i, b["start"]:b["stop"]])
    meta = [{k: s[k] for k in ("snapshot", "step", "epoch")} for s in blocks[0]["snapshots"][:T]]
    return W_TN, meta


def displacements(W_TN: np.ndarray) -> np.ndarray:
    """D = W − 1θ0ᵀ in float64 (θ0 = snapshot 0), the differences formed exactly from the float32 snapshots."""
    D_TN = W_TN.astype(np.float64)
    D_TN -= D_TN[0].copy()
    return D_TN


def gram_theta0(W_TN: np.ndarray) -> np.ndarray:
    """K = D Dᵀ (T×T, float64), the Gram relative to θ0 that the streaming Gram accumulates."""
    D_TN = displacements(W_TN)
    return D_TN @ D_TN.T


def window_sizes(epochs_T: Sequence[int]) -> Dict[int, int]:
    """{e: the number of snapshots with epoch ≤ e} for e = 0..max (θ0 is epoch 0)."""
    epochs_T = np.asarray(epochs_T)
    return {e: int((epochs_T <= e).sum()) for e in range(int(epochs_T.max()) + 1)}


def prefix_basis(K_TT: np.ndarray, D_TN: np.ndarray, count: int, dim: int):
    """The top-``dim`` DLDR basis of the first ``count`` snapshots from the prefix of the Gram relative to θ0.

    U = D_countᵀ C V Σ⁻¹ (float64), i.e. the principal directions of the centred snapshots 0..count−1.

    Returns:
        (U_DN float64, the `solve_spectrum` record).
    """
    spec = solve_spectrum(centre_gram(K_TT[:count, :count]), dim)
    proj_TD = spec["V"] / spec["singular_values"][:dim]
    proj_DT = np.ascontiguousarray((proj_TD - proj_TD.mean(axis=0, keepdims=True)).T)  # centring moved into V Σ⁻¹
    return proj_DT @ D_TN[:count], spec


def timed_basis(run, manifest, K_TT: np.ndarray, count: int, dim: int):
    """`prefix_basis` from a fresh verified read of the ``count`` prefix snapshots; returns (U_DN, spec, seconds)."""
    t0 = time.perf_counter()
    W_TN, _ = read_trajectory(run, manifest, count)
    U_DN, spec = prefix_basis(K_TT, displacements(W_TN), count, dim)
    return U_DN, spec, time.perf_counter() - t0


def residual_outside(K_TT: np.ndarray, count: int, a: int, dim: int) -> Optional[float]:
    """‖(I − UUᵀ)(θ_a − θ0)‖ / ‖θ_a − θ0‖ with U the top-``dim`` basis of snapshots 0..count−1, from K alone
    (the sampler's `reach_residual`)."""
    return reach_residual(K_TT, count, a, dim)


def adaptive_windows(signal: Sequence[Dict[str, Any]], dims: Sequence[int], threshold: float, patience: int,
                     min_snapshots: int = 0) -> Dict[int, int]:
    """Per d: the epoch at which the sampler's adaptive rule ends the window on ``signal`` (the last epoch when
    it never fires); ``min_snapshots`` 0 means d + 1, as the config's."""
    out = {}
    for d in dims:
        records: List[Dict[str, Any]] = []
        out[d] = signal[-1]["epoch"]
        for s in signal:
            r = s[f"reach_residual_d{d}"]
            before = records[-1]["reach_residual"] if records else None
            records.append({"reach_residual": r, "residual_drop": (before - r) / before if r is not None and before
                            else None})
            if stop_decision(records, threshold, patience, min_snapshots or d + 1, s["num_snapshots"]):
                out[d] = s["epoch"]
                break
    return out


def stop_signals(K_TT: np.ndarray, sizes: Dict[int, int], dims: Sequence[int]) -> List[Dict[str, Any]]:
    """The stopping signals at every epoch boundary e = 1..last (module docstring)."""
    last = max(sizes)
    rows = []
    for e in range(1, last + 1):
        s, n_e = sizes[e - 1], sizes[e]
        row: Dict[str, Any] = {"epoch": e, "num_snapshots": n_e}
        for d in dims:
            ok = s >= 2 and n_e > s  # what `window_check` requires: a reference set and a new snapshot
            row[f"outside_fraction_d{d}"] = outside_fraction(K_TT, s, n_e - 1, d) if ok else None
            row[f"reach_residual_d{d}"] = residual_outside(K_TT, s, n_e - 1, d) if ok else None
            drift = subspace_drift(K_TT, s, n_e, d) if ok else {"max_angle_deg": None, "mean_cos2": None}
            row[f"max_angle_deg_d{d}"] = drift["max_angle_deg"]
            row[f"mean_cos2_d{d}"] = drift["mean_cos2"]
            ahead = {f"residual_k{k}_d{d}": (residual_outside(K_TT, n_e, sizes[e + k] - 1, d) if e + k <= last
                                             else None) for k in RESIDUAL_AHEAD}
            row.update(ahead)
            row[f"residual_end_d{d}"] = residual_outside(K_TT, n_e, sizes[last] - 1, d)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# reference and targets

def first_reaching(history: Sequence[Dict[str, Any]], target: float) -> Optional[Dict[str, Any]]:
    """The first epoch's record with test_acc ≥ ``target`` (None: never)."""
    for h in history:
        if h.get("test_acc") is not None and h["test_acc"] >= target:
            return h
    return None


def sgd_reference(summary: Dict[str, Any], margin: float) -> Dict[str, Any]:
    hist = summary["results"]["sgd"]["history"]
    target = hist[-1]["test_acc"] - margin
    hit = first_reaching(hist, target)
    return {"sgd_test_acc": hist[-1]["test_acc"], "target_acc": target, "sgd_epochs": hist[-1]["epoch"],
            "sgd_s": hist[-1]["elapsed_s"], "sgd_epochs_to_target": hit["epoch"] if hit else None,
            "sgd_s_to_target": hit["elapsed_s"] if hit else None,
            "elapsed_at_epoch": {h["epoch"]: h["elapsed_s"] for h in hist},
            "test_acc_at_epoch": {h["epoch"]: h["test_acc"] for h in hist}}


def end_to_end(window_s: float, basis_s: float, history: Sequence[Dict[str, Any]], target: float,
               ref: Dict[str, Any], sgd_epoch_s: Optional[float] = None, window: Optional[int] = None
               ) -> Dict[str, Any]:
    """The pipeline's time to the target: sampling window + basis + training until the first epoch at the target."""
    hit = first_reaching(history, target)
    out: Dict[str, Any] = {"epoch_to_target": hit["epoch"] if hit else None,
                           "train_s_to_target": hit["elapsed_s"] if hit else None, "end_to_end_s": None,
                           "end_to_end_over_sgd": None, "end_to_end_over_sgd_to_target": None,
                           "end_to_end_epochs": None, "end_to_end_epochs_over_sgd": None}
    if hit is None:
        return out
    total = window_s + basis_s + hit["elapsed_s"]
    out.update(end_to_end_s=total, end_to_end_over_sgd=total / ref["sgd_s"],
               end_to_end_over_sgd_to_target=(total / ref["sgd_s_to_target"] if ref["sgd_s_to_target"] else None))
    if sgd_epoch_s and window is not None:
        epochs = window + (basis_s + hit["elapsed_s"]) / sgd_epoch_s
        out.update(end_to_end_epochs=epochs, end_to_end_epochs_over_sgd=epochs / ref["sgd_epochs"])
    return out


def extra_target(rows: Sequence[Dict[str, Any]], summary: Dict[str, Any], target: float, ref: Dict[str, Any],
                 sgd_epoch_s: Optional[float]) -> Dict[str, Any]:
    """The end-to-end figures of every row for another absolute ``target``, against SGD's own time to it."""
    hit = first_reaching(summary["results"]["sgd"]["history"], target)
    ref_t = {**ref, "target_acc": target, "sgd_s_to_target": hit["elapsed_s"] if hit else None,
             "sgd_epochs_to_target": hit["epoch"] if hit else None}
    per = [{**{k: r[k] for k in ("window", "optimizer", "dim", "final_acc")},
            **end_to_end(r["window_s"], r["basis_s"], r["history"], target, ref_t, sgd_epoch_s, r["window"])}
           for r in rows]
    return {"sgd_epochs_to_target": ref_t["sgd_epochs_to_target"], "sgd_s_to_target": ref_t["sgd_s_to_target"],
            "rows": per, "best_window_per_optimizer": best_windows(per)}


# ---------------------------------------------------------------------------------------------------------
# training in one process

def optimizer_overrides(sets: Sequence[str], optimizers: Sequence[str]) -> Dict[str, List[str]]:
    """``OPT.KEY=VALUE`` items → {opt: ["train.KEY=VALUE", ...]}, the user's own (applied over `TRAIN_DEFAULTS`)."""
    out: Dict[str, List[str]] = {o: [] for o in optimizers}
    problems = []
    for item in sets:
        head, _, rest = item.partition(".")
        if head not in out or "=" not in rest:
            problems.append(f"--set {item!r}: expected OPT.KEY=VALUE with OPT one of {', '.join(out)} "
                            f"(KEY a train.* key, e.g. pbfgs.optimizer_options={{c: 0.2}})")
            continue
        out[head].append(f"train.{rest}")
    if problems:
        raise ConfigError(problems)
    return out


def train_config(base: Dict[str, Any], optimizer: str, user: Sequence[str] = ()):
    """The run's config with ``optimizer``'s `TRAIN_DEFAULTS`, then the user's ``train.*`` overrides over them
    (a separate merge, so ``optimizer_options={c: 0.2}`` changes c and keeps the other defaults); checked:
    unknown keys, wrong types, bad optimizer options."""
    # heavy: torch (imported by raysub.optim.base) loads here, not when this module is imported
    from raysub.optim.base import check_optimizer

    merged = merge(merge(base, parse_overrides(TRAIN_DEFAULTS[optimizer])), parse_overrides(user))
    cfg = Config.from_dict(merged)
    problems = check_optimizer(cfg.train.optimizer, cfg.train.optimizer_options)
    if problems:
        raise ConfigError(problems)
    return cfg


def build_subspace_task(cfg, data, theta0_state, basis_DN: np.ndarray):
    """A `Task` at the run's θ0 with a `MatrixProjection` of ``basis_DN`` (float32), no Ray."""
    # heavy: torch (and the raysub modules below, which import it) loads here, not when this module is imported
    import torch

    from raysub.engine.flat import flatten_params
    from raysub.engine.task import Task
    from raysub.models import model_for
    from raysub.projections.base import MatrixProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = model_for(cfg, data, init=False)  # the run's architecture (UV included); θ0 is loaded next
    model.load_state_dict(theta0_state)
    theta0_N = flatten_params(model)
    projection = MatrixProjection(torch.from_numpy(np.ascontiguousarray(basis_DN)).float())
    return Task.from_parts(model, theta0_N, projection, data, cfg)


def window_scales(spec: Dict[str, Any], count: int, dim: int, cfg) -> np.ndarray:
    """The dldr projection's coordinate scales (``train.projection_options.scale``) for a window of ``count``
    snapshots: a column per basis vector, as `raysub.projections.dldr` applies them to a stored basis."""
    # heavy: torch (imported by raysub.projections.dldr) loads here, not when this module is imported
    from raysub.projections.dldr import coordinate_scales

    scale = dict(cfg.train.projection_options).get("scale", "none")
    spectrum = {"singular_values": list(spec["singular_values"]), "num_snapshots": count}
    return coordinate_scales(spectrum, dim, scale)[:, None]


def best_windows(rows: Sequence[Dict[str, Any]], key: str = "end_to_end_over_sgd") -> Dict[str, Any]:
    """Per optimizer (over its dims), and per optimizer×d: the row with the smallest ``key`` (None: no row
    reached the target; then the window of the best final accuracy is named instead)."""
    out: Dict[str, Any] = {}
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["optimizer"], []).append(r)
        groups.setdefault(f"{r['optimizer']}_d{r['dim']}", []).append(r)
    for name, rs in groups.items():
        reached = [r for r in rs if r.get(key) is not None]
        if reached:
            b = min(reached, key=lambda r: r[key])
            out[name] = {"window": b["window"], "dim": b["dim"], key: b[key], "final_acc": b["final_acc"]}
        else:
            b = max(rs, key=lambda r: r["final_acc"] or 0.0)
            out[name] = {"window": None, "dim": b["dim"], key: None, "best_final_acc_window": b["window"],
                         "final_acc": b["final_acc"]}
    return out
