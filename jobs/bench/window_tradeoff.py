"""Benchmark: the sampling window's length against end-to-end time and accuracy, and the adaptive window's signal.

What it measures
    One sampled run (default: Fashion-MNIST LeNet-5, the shipped ``fashion_mnist_lenet`` config, 2 Ray Train
    workers, the first 15 epochs snapshotted every 20 steps = 352 snapshots with θ0, then SGD on to 30 epochs
    with the lr decay at 20: the full-SGD reference). Everything below is read from that run; nothing is resampled.

    SGD reference (``summary.json`` results.sgd.history): target = final test accuracy − ``--margin`` (0.5 pt);
    sgd_s = the final epoch's elapsed_s (Ray Train loop time), sgd_s_to_target = elapsed_s of the first epoch
    at or above the target.

    Gram: every snapshot is read once from its verified shard (sha256 against the manifest) and the full T×T
    Gram relative to θ0, K = D Dᵀ with D = W − 1θ0ᵀ, is formed in float64. The Gram of the snapshots of a
    window of w epochs (epoch ≤ w, θ0 included: the first T_w) is its leading T_w×T_w block — exactly what the
    streaming Gram of the sampler holds after w epochs.

    Basis of window w (d = max(--dims)): solve_spectrum on the centred prefix Gram (C K C), then
    U = Dᵀ C V Σ⁻¹ in float64 (the exact product; `BlockGram.write_basis_streamed` computes the same from the
    increments in float32, within ~1e-5°), the smaller d its leading columns.
    basis_s times the in-process equivalent of the basis stage from a streamed Gram: reading the T_w prefix
    snapshots again (verified) + eigh + the GEMM.

    Training, for every window w, optimizer and d: z from 0 at θ0 (the run's theta0.pt) with a
    `MatrixProjection` of that basis, in this process (no Ray), with the run's data order
    (`raysub.pipeline.train._train_epoch`, world = 1: the order the 2-worker run would see) and the package's
    own step (`train_step`) and optimizers (`build_optimizer`); test accuracy after every epoch. elapsed_s is
    cumulative steps + evaluation, like the Ray loop's. Settings (``--set OPT.KEY=VALUE`` overrides any
    ``train.*`` key of one optimizer, e.g. ``--set "pbfgs.optimizer_options={c: 0.2}"`` or ``--set psgd.lr=0.5``):
      psgd   lr 1, momentum 0.9, batch 128, 10 epochs, lr ×0.1 at epoch 7       (fashion_mnist_lenet.yaml)
      pbfgs  batch 1024, c 0.4, β 0.55, 20 backtracks, 10 epochs, no schedule, z in units of the window's std
             along each basis vector (projection_options scale: std)   (fashion_mnist_lenet_pbfgs.yaml)
      adam   lr 0.1, β1 0.9, batch 128, 10 epochs, lr ×0.1 at epoch 7
    ``--late-epochs K`` trains windows beyond ``--late-after`` (8) epochs for K epochs only, the lr milestones
    scaled alike (7 of 10 → 4 of 5); default: all 10. A training stops at its first non-finite batch loss
    (recorded as diverged, final accuracy null).

    Per (w, optimizer, d): final and best test accuracy, the first epoch at the target and the training time to
    it, and end_to_end_s = SGD elapsed_s at epoch w (the window's sampling time) + basis_s + training time to the
    target (null when never reached); end_to_end_over_sgd = that / sgd_s, end_to_end_over_sgd_to_target = that /
    sgd_s_to_target. The SGD run's own epoch times are whatever load the machine had while it ran, so a
    load-robust figure is printed too: one full-parameter SGD epoch (+ evaluation) timed in this process before
    the trainings and after every window's (sgd_epoch_s, their median) prices everything in SGD epochs:
      end_to_end_epochs = w + (basis_s + training time to target) / sgd_epoch_s, over the reference's epochs.

    Stopping signal at every epoch boundary e = 1..15, from the Gram (`raysub.pipeline.stream_gram`), as the
    sampler's `_window_check` computes it: reach_residual(K, s, t, d) — the stopping signal — with s = snapshots
    up to epoch e − 1 and t = the last snapshot of epoch e (null at e = 1: no reference set yet); the rejected
    outside_fraction(K, s, t, d) and subspace_drift(K, s, T_e, d), for every d. The adaptive window per d is
    where the sampler's rule (`stop_decision`, --stop-threshold/--stop-patience, default the config's) ends on
    these signals: the same prefix of the same trajectory the adaptive sampler would write (same θ0 and data
    order), so its rows are the fixed window of that length, flagged "adaptive"; it is added to --windows. Also: residual_k = ‖(I − UUᵀ)(θ_a − θ0)‖ / ‖θ_a − θ0‖ with U the top-d basis of window e and θ_a
    the last snapshot of epoch e + k (k = 1, 2, 3) and of epoch 15 ("end"): how much of where SGD goes next the
    subspace θ0 + span(U) cannot reach (null beyond the sampled epochs). A snapshot is taken every 20 steps, so
    "the last snapshot of an epoch" is up to 19 steps before its end.

How long it takes (2-core VM shared with other jobs)
    About 10 s per training epoch of LeNet-5 on 60k examples (P-BFGS more with its line search): 7 windows ×
    3 optimizers × 2 dims × 10 epochs ≈ 40-70 minutes; ``--late-epochs`` and ``--windows`` trim it.
    If --run does not exist it is sampled first (`raysub.pipeline.run.stage_sample`, ~12 minutes more).

How to run
    python jobs/bench/window_tradeoff.py --run runs/bench_window --out runs/bench_window_tradeoff
        [--windows 2,3,4,6,8,10,15] [--optimizers psgd,pbfgs,adam] [--dims 15,40] [--late-epochs 5]
        [--set pbfgs.optimizer_options={c: 0.4, beta: 0.55}] [--extra-targets 0.89,0.895] [--threads 2]
        [--overwrite]
    python jobs/bench/window_tradeoff.py --out runs/bench_window_tradeoff --replot --extra-targets 0.895,0.90
        (no training: the extra targets' figures from OUT/table.json, and the plot redrawn)

Output: OUT/table.json (every row, the signal, the reference), OUT/tradeoff.png (its time panel shows SGD's target,
or the highest --extra-targets target some window reaches when none reaches SGD's), one progress line per
training, a table, the load average (/proc/loadavg) at start and end, and as the last line one JSON object
(windows, best_window_per_optimizer, rows_file, signal per epoch, sgd_test_acc, target_acc, sgd_s,
sgd_s_to_target, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

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


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return fh.read().strip()
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------------------------
# the trajectory, its Gram and the prefix bases

def read_trajectory(run, manifest: Dict[str, Any], count: Optional[int] = None):
    """The first ``count`` (all) snapshots as a T×N float32 array, every shard verified against the manifest.

    Returns:
        (W_TN, [{"snapshot", "step", "epoch"}] of the T snapshots).
    """
    from raysub.pipeline.sample import collect_trajectory
    from raysub.storage import decode_vector

    blocks, _ = collect_trajectory(run, manifest["shards"])
    blocks = sorted(blocks, key=lambda b: b["start"])
    T = len(blocks[0]["snapshots"]) if count is None else count
    W_TN = np.empty((T, blocks[-1]["stop"]), dtype=np.float32)
    for b in blocks:
        for i, s in enumerate(b["snapshots"][:T]):
            decode_vector(run.read_buffer(s["path"], manifest["shards"][s["path"]]), out=W_TN[i, b["start"]:b["stop"]])
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
    from raysub.pipeline.basis import solve_spectrum
    from raysub.pipeline.stream_gram import centre_gram

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
    from raysub.pipeline.stream_gram import reach_residual

    return reach_residual(K_TT, count, a, dim)


def adaptive_windows(signal: Sequence[Dict[str, Any]], dims: Sequence[int], threshold: float, patience: int,
                     min_snapshots: int = 0) -> Dict[int, int]:
    """Per d: the epoch at which the sampler's adaptive rule ends the window on ``signal`` (the last epoch when
    it never fires); ``min_snapshots`` 0 means d + 1, as the config's."""
    from raysub.pipeline.stream_gram import stop_decision

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
    from raysub.pipeline.stream_gram import outside_fraction, subspace_drift

    last = max(sizes)
    rows = []
    for e in range(1, last + 1):
        s, n_e = sizes[e - 1], sizes[e]
        row: Dict[str, Any] = {"epoch": e, "num_snapshots": n_e}
        for d in dims:
            ok = s >= 2 and n_e > s  # what `_window_check` requires: a reference set and a new snapshot
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
    from raysub.errors import ConfigError

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
    from raysub.config import Config, merge, parse_overrides
    from raysub.errors import ConfigError
    from raysub.optim.base import check_optimizer

    merged = merge(merge(base, parse_overrides(TRAIN_DEFAULTS[optimizer])), parse_overrides(user))
    cfg = Config.from_dict(merged)
    problems = check_optimizer(cfg.train.optimizer, cfg.train.optimizer_options)
    if problems:
        raise ConfigError(problems)
    return cfg


def build_subspace_task(cfg, data, theta0_state, basis_DN: np.ndarray):
    """A `Task` at the run's θ0 with a `MatrixProjection` of ``basis_DN`` (float32), no Ray."""
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
    from raysub.projections.dldr import coordinate_scales

    scale = dict(cfg.train.projection_options).get("scale", "none")
    spectrum = {"singular_values": list(spec["singular_values"]), "num_snapshots": count}
    return coordinate_scales(spectrum, dim, scale)[:, None]


class _NonFinite(Exception):
    pass


class _StopOnNonFinite:
    """An optimizer that raises at the first non-finite batch loss: a diverged run stops there instead of
    finishing its epoch on NaNs (which run ~10x slower on CPU)."""

    def __init__(self, opt):
        self.opt = opt

    def step(self, z_D, g_D, loss, closure=None):
        if not math.isfinite(float(loss)):
            raise _NonFinite()
        return self.opt.step(z_D, g_D, loss, closure)

    def __getattr__(self, name):
        return getattr(self.opt, name)


def scaled_schedule(cfg, epochs: int):
    """``cfg`` trained for ``epochs`` instead of ``cfg.train.epochs``, its lr milestones scaled alike (7 of 10 → 4
    of 5), so a shortened run still ends on the decayed lr."""
    import copy

    out = copy.deepcopy(cfg)
    if epochs != cfg.train.epochs:
        out.train.lr_milestones = [max(1, int(round(m * epochs / cfg.train.epochs + 1e-9)))
                                   for m in cfg.train.lr_milestones]
        out.train.epochs = epochs
    return out


def train_subspace(task, epochs: Optional[int] = None, on_epoch=None) -> Dict[str, Any]:
    """Train z from 0 with ``task.cfg.train``, the run's data order, test accuracy after every epoch.

    Returns:
        {"history": [{"epoch", "train_loss", "test_acc", "test_loss", "train_s", "eval_s", "elapsed_s"}],
         "diverged": None or the epoch whose loss or z became non-finite}.
    """
    import torch

    from raysub.engine import loop
    from raysub.engine.task import evaluate_task
    from raysub.optim import build_optimizer
    from raysub.pipeline.train import _train_epoch

    cfg = task.cfg
    z_D = task.new_z()
    opt = _StopOnNonFinite(build_optimizer(cfg.train.optimizer, z_D, cfg.train))
    history, elapsed = [], 0.0
    for epoch in range(cfg.train.epochs if epochs is None else epochs):
        opt.set_lr(loop.lr_at(epoch, cfg.train.lr, cfg.train.lr_milestones, cfg.train.lr_gamma))
        t0 = time.perf_counter()
        try:
            losses, _ = _train_epoch(task, z_D, opt, epoch, 0, 1)
        except _NonFinite:
            return {"history": history, "diverged": epoch + 1}
        train_s = time.perf_counter() - t0
        if not all(math.isfinite(v) for v in losses) or not bool(torch.isfinite(z_D).all()):
            return {"history": history, "diverged": epoch + 1}
        t1 = time.perf_counter()
        test = evaluate_task(task, z_D, "test", cfg.data.eval_batch_size)
        eval_s = time.perf_counter() - t1
        elapsed += train_s + eval_s
        record = {"epoch": epoch + 1, "train_loss": sum(losses) / max(len(losses), 1), "test_acc": test["acc"],
                  "test_loss": test["loss"], "train_s": train_s, "eval_s": eval_s, "elapsed_s": elapsed}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return {"history": history, "diverged": None}


def sgd_epoch_probe(cfg, data, theta0_state) -> float:
    """Seconds of one full-parameter SGD epoch (the run's first: batch, lr, momentum, data order) + one test
    evaluation, in this process: the exchange rate between subspace-training time and SGD epochs."""
    import torch

    from raysub.engine import loop
    from raysub.models import model_for
    from raysub.pipeline.sample import full_optimizer

    model = model_for(cfg, data, init=False)
    model.load_state_dict(theta0_state)
    opt = full_optimizer(cfg, model)  # the run's own (sgd.optimizer), over its trainable parameters
    t0 = time.perf_counter()
    model.train()
    batches = loop.epoch_batches(data.size("train"), cfg.data.batch_size, cfg.seed, 0, 0, 1)
    for x, y in data.batches("train", batches, augment=cfg.data.augment, seed=loop.mix_seed(cfg.seed, 0)):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    loop.evaluate(model, data, "test", cfg.data.eval_batch_size, torch.device("cpu"))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# report

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


def tradeoff_table(rows: Sequence[Dict[str, Any]]) -> str:
    def pct(v):
        return "   -  " if v is None else f"{100 * v:6.2f}"

    def num(v, f="{:7.1f}"):
        return "      -" if v is None else f.format(v)

    head = (" w    T  opt    d  final%  best%  ep→t  train→t  basis_s  e2e_s  e2e/sgd  e2e/sgd_tt  e2e_ep/sgd\n"
            "--  ---  -----  --  ------  -----  ----  -------  -------  -----  -------  ----------  ----------")
    lines = [head]
    for r in rows:
        lines.append(f"{r['window']:2d}{'*' if r.get('adaptive') else ' '} {r['num_snapshots']:3d}  {r['optimizer']:<5s}  {r['dim']:2d}  "
                     f"{pct(r['final_acc'])}  {pct(r['best_acc'])[1:]}  "
                     f"{num(r['epoch_to_target'], '{:4d}')[-4:]}  "
                     f"{num(r['train_s_to_target'])}  {num(r['basis_s'])}  {num(r['end_to_end_s'], '{:5.0f}')}  "
                     f"{num(r['end_to_end_over_sgd'], '{:7.3f}')}  {num(r['end_to_end_over_sgd_to_target'], '{:10.3f}')}"
                     f"  {num(r['end_to_end_epochs_over_sgd'], '{:10.3f}')}")
    return "\n".join(lines + ["*: the adaptive window for that d"])


def panel_target(rows, ref, extra=None):
    """(target, rows with its end-to-end figures, SGD's time to it) for the time panel: SGD's own target, or —
    when no row reaches it — the highest ``--extra-targets`` target that some row reaches."""
    if any(r.get("end_to_end_over_sgd") is not None for r in rows) or not extra:
        return ref["target_acc"], rows, ref["sgd_s_to_target"]
    reached = [(float(t), v) for t, v in extra.items()
               if any(r.get("end_to_end_over_sgd") is not None for r in v["rows"])]
    if not reached:
        return ref["target_acc"], rows, ref["sgd_s_to_target"]
    target, v = max(reached, key=lambda tv: tv[0])
    return target, v["rows"], v["sgd_s_to_target"]


def plot(path: str, rows, signal, ref, dims, adaptive=None, extra=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    target, trows, sgd_to = panel_target(rows, ref, extra)
    for key in sorted({(r["optimizer"], r["dim"]) for r in trows}):
        rs = sorted([r for r in trows if (r["optimizer"], r["dim"]) == key], key=lambda r: r["window"])
        ax.plot([r["window"] for r in rs], [r["end_to_end_over_sgd"] if r["end_to_end_over_sgd"] is not None
                                             else np.nan for r in rs], marker="o", label=f"{key[0]} d={key[1]}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    if sgd_to:
        ax.axhline(sgd_to / ref["sgd_s"], color="gray", lw=0.8, ls=":", label="SGD to target")
    ax.set_xlabel("sampling window (epochs)")
    ax.set_ylabel("end-to-end time to target ÷ full SGD")
    why = "" if target == ref["target_acc"] else f"; SGD's {100 * ref['target_acc']:.2f}% reached by none"
    ax.set_title(f"time to {100 * target:.2f}% (missing: not reached{why})", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for key in sorted({(r["optimizer"], r["dim"]) for r in rows}):
        rs = sorted([r for r in rows if (r["optimizer"], r["dim"]) == key], key=lambda r: r["window"])
        ax.plot([r["window"] for r in rs], [100 * (r["final_acc"] or np.nan) for r in rs], marker="o",
                label=f"{key[0]} d={key[1]}")
    ax.axhline(100 * ref["target_acc"], color="k", lw=0.8, ls="--", label="target")
    ax.axhline(100 * ref["sgd_test_acc"], color="gray", lw=0.8, ls=":", label="SGD final")
    ax.set_xlabel("sampling window (epochs)")
    ax.set_ylabel("final test accuracy (%)")
    ax.legend(fontsize=7)
    ax = axes[2]
    ep = [s["epoch"] for s in signal]
    for d, color in zip(dims, ("tab:blue", "tab:red", "tab:green")):
        ax.plot(ep, [s[f"reach_residual_d{d}"] if s[f"reach_residual_d{d}"] is not None else np.nan
                     for s in signal], marker="o", color=color, label=f"reach residual d={d} (the stop signal)")
        ax.plot(ep, [s[f"outside_fraction_d{d}"] if s[f"outside_fraction_d{d}"] is not None else np.nan
                     for s in signal], marker=".", lw=0.6, color=color, alpha=0.5, label=f"outside fraction d={d}")
        if adaptive and d in adaptive:
            ax.axvline(adaptive[d], color=color, lw=0.8, ls="-.", label=f"adaptive window d={d}")
        ax.plot(ep, [s[f"residual_k1_d{d}"] if s[f"residual_k1_d{d}"] is not None else np.nan for s in signal],
                ls="--", color=color, label=f"residual of θ(e+1) d={d}")
        ax.plot(ep, [s[f"residual_end_d{d}"] for s in signal], ls=":", color=color, label=f"residual of θ(15) d={d}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch e (window end)")
    ax.set_ylabel("signal")
    ax.set_title("stopping signals")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------

def ensure_sampled(run_path: str, say) -> None:
    """Sample the reference run when ``run_path`` does not exist (the protocol's command)."""
    from raysub.config import load_config
    from raysub.pipeline.run import stage_sample

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "raysub", "configs",
                                   "fashion_mnist_lenet.yaml"), SAMPLE_OVERRIDES + [f"run_dir={run_path}"])
    say(f"[sample] {run_path} does not exist: sampling it ({' '.join(SAMPLE_OVERRIDES)})")
    stage_sample(cfg, say=say)


def main(argv=None) -> int:
    import torch

    from raysub.data import open_dataset
    from raysub.config import Config
    from raysub.errors import ConfigError
    from raysub.storage import RunDir, strict_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/bench_window", help="a sampled run directory (sampled here if absent)")
    p.add_argument("--out", default="runs/bench_window_tradeoff")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--windows", default="2,3,4,6,8,10,15")
    p.add_argument("--optimizers", default="psgd,pbfgs,adam")
    p.add_argument("--dims", default="15,40")
    p.add_argument("--margin", type=float, default=0.005, help="target = SGD final accuracy − margin")
    p.add_argument("--extra-targets", default="",
                   help="more absolute test-accuracy targets (e.g. 0.89,0.895): end-to-end time and best window "
                        "for each too, for when SGD's own target is out of every window's reach")
    p.add_argument("--late-epochs", type=int, default=None,
                   help="train windows beyond --late-after epochs for this many epochs only (default: all)")
    p.add_argument("--late-after", type=int, default=8)
    p.add_argument("--set", action="append", default=[], metavar="OPT.KEY=VALUE",
                   help="override a train.* key of one optimizer, e.g. pbfgs.optimizer_options={c: 0.2}")
    p.add_argument("--stop-threshold", type=float, default=None, help="adaptive rule (default: sample config's)")
    p.add_argument("--stop-patience", type=int, default=None, help="adaptive rule (default: sample config's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-sgd-probe", action="store_true", help="skip the in-process SGD epoch timing")
    p.add_argument("--replot", action="store_true",
                   help="no training: recompute --extra-targets from --out's table.json and redraw its plot")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.replot:
        return replot(os.path.abspath(args.out), [float(t) for t in args.extra_targets.split(",") if t])

    def say(msg: str) -> None:
        print(msg, flush=True)

    windows = [int(w) for w in args.windows.split(",")]
    optimizers = [o for o in args.optimizers.split(",") if o]
    dims = sorted(int(d) for d in args.dims.split(","))
    unknown = [o for o in optimizers if o not in TRAIN_DEFAULTS]
    if unknown:
        print(f"error: --optimizers {','.join(unknown)}: choose from {', '.join(TRAIN_DEFAULTS)}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    if os.path.exists(out) and os.listdir(out) and not args.overwrite:
        print(f"error: {out} already exists: pass --overwrite or another --out", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    load_start = loadavg()
    say(f"[window] load average at start: {load_start}")
    if not os.path.exists(args.run):
        ensure_sampled(args.run, say)
    run = RunDir(args.run)
    manifest = run.read_json("manifest.json")
    if not manifest.get("stages", {}).get("sample", {}).get("complete"):
        print(f"error: {run.uri} has no complete sample stage (manifest stages.sample.complete)", file=sys.stderr)
        return 2
    base = manifest["config"]
    summary = manifest.get("summary") or run.read_json("summary.json")
    try:
        overrides = optimizer_overrides(args.set, optimizers)
        cfgs = {o: train_config(base, o, overrides[o]) for o in optimizers}
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for o, c in cfgs.items():
        t = c.train
        say(f"[window] {o}: lr {t.lr:g}, momentum {t.momentum:g}, batch {t.batch_size or c.data.batch_size}, "
            f"{t.epochs} epochs, milestones {list(t.lr_milestones)} ×{t.lr_gamma:g}, options {dict(t.optimizer_options)}")
    ref = sgd_reference(summary, args.margin)
    say(f"[window] SGD: {100 * ref['sgd_test_acc']:.2f}% after {ref['sgd_epochs']} epochs in {ref['sgd_s']:.1f}s; "
        f"target {100 * ref['target_acc']:.2f}% reached at epoch {ref['sgd_epochs_to_target']} "
        f"({ref['sgd_s_to_target']}s)")

    t0 = time.perf_counter()
    W_TN, meta = read_trajectory(run, manifest)
    K_TT = gram_theta0(W_TN)
    del W_TN
    sizes = window_sizes([m["epoch"] for m in meta])
    say(f"[window] {len(meta)} snapshots × {K_TT.shape[0]} Gram in {time.perf_counter() - t0:.1f}s; snapshots up to "
        f"epoch e: {sizes}")
    bad = [w for w in windows if w not in sizes or w == 0]
    if bad:
        print(f"error: --windows {bad}: the run samples epochs 1..{max(sizes)}", file=sys.stderr)
        return 2
    signal = stop_signals(K_TT, sizes, dims)
    from raysub.config import SampleConfig

    rule = {"threshold": SampleConfig.stop_threshold if args.stop_threshold is None else args.stop_threshold,
            "patience": SampleConfig.stop_patience if args.stop_patience is None else args.stop_patience}
    adaptive = adaptive_windows(signal, dims, rule["threshold"], rule["patience"])
    windows = sorted(set(windows) | set(adaptive.values()))
    say(f"[signal] adaptive rule (reach residual falls < {100 * rule['threshold']:g}% at {rule['patience']} "
        f"successive checks) ends the window at: " + ", ".join(f"d={d}: epoch {w}" for d, w in adaptive.items()))
    for s in signal:
        say("[signal] epoch {:2d}  T={:3d}  ".format(s["epoch"], s["num_snapshots"]) + "  ".join(
            f"d={d}: reach={_fmt(s[f'reach_residual_d{d}'])} ρ={_fmt(s[f'outside_fraction_d{d}'])} "
            f"angle={_fmt(s[f'max_angle_deg_d{d}'], '{:.1f}')} "
            f"res(e+1)={_fmt(s[f'residual_k1_d{d}'])} res(15)={_fmt(s[f'residual_end_d{d}'])}" for d in dims))

    base_cfg = Config.from_dict(base)
    data = open_dataset(base_cfg)
    theta0_state = run.read_theta0()
    probes = []
    if not args.no_sgd_probe:
        probes.append(sgd_epoch_probe(base_cfg, data, theta0_state))
        say(f"[window] one full-parameter SGD epoch + evaluation in this process: {probes[-1]:.1f}s")

    rows: List[Dict[str, Any]] = []
    dmax = max(dims)
    for w in windows:
        count = sizes[w]
        U_DN, spec, basis_s = timed_basis(run, manifest, K_TT, count, dmax)
        say(f"[basis] window {w} epochs: {count} snapshots, d={dmax} explains "
            f"{100 * spec['explained_variance_ratio'][:dmax].sum():.1f}% ({basis_s:.2f}s)")
        for opt in optimizers:
            for d in dims:
                cfg = cfgs[opt]
                if args.late_epochs and w > args.late_after:
                    cfg = scaled_schedule(cfg, args.late_epochs)
                epochs = cfg.train.epochs
                task = build_subspace_task(cfg, data, theta0_state, U_DN[:d] * window_scales(spec, count, d, cfg))
                tw = time.perf_counter()
                res = train_subspace(task)
                hist = res["history"]
                final = hist[-1]["test_acc"] if hist and res["diverged"] is None else None
                row = {"window": w, "num_snapshots": count, "optimizer": opt, "dim": d, "epochs": epochs,
                       "lr_milestones": list(cfg.train.lr_milestones),
                       "explained_variance": float(spec["explained_variance_ratio"][:d].sum()),
                       "final_acc": final, "best_acc": max((h["test_acc"] for h in hist), default=None),
                       "diverged": res["diverged"], "basis_s": basis_s, "window_s": ref["elapsed_at_epoch"][w],
                       "sgd_acc_at_window": ref["test_acc_at_epoch"][w],
                       "train_s_total": hist[-1]["elapsed_s"] if hist else None,
                       "epoch_s_mean": (float(np.mean([h["train_s"] + h["eval_s"] for h in hist])) if hist else None),
                       "adaptive": adaptive[d] == w, "history": hist}
                row.update(end_to_end(row["window_s"], basis_s, hist, ref["target_acc"], ref, None, w))
                rows.append(row)
                say(f"[train] w={w:2d} {opt:<5s} d={d:2d}: final {_fmt(final, '{:.4f}')} best "
                    f"{_fmt(row['best_acc'], '{:.4f}')} target at epoch {row['epoch_to_target']} "
                    f"e2e/sgd {_fmt(row['end_to_end_over_sgd'], '{:.3f}')} ({time.perf_counter() - tw:.0f}s, "
                    f"load {loadavg().split()[0]})")
        if not args.no_sgd_probe:
            probes.append(sgd_epoch_probe(base_cfg, data, theta0_state))
            say(f"[window] SGD epoch probe: {probes[-1]:.1f}s")
    sgd_epoch_s = float(np.median(probes)) if probes else None
    for r in rows:  # priced in in-process SGD epochs, now that the probe has its second reading
        r.update(end_to_end(r["window_s"], r["basis_s"], r["history"], ref["target_acc"], ref, sgd_epoch_s,
                            r["window"]))
    extra = {}
    for target in [float(t) for t in args.extra_targets.split(",") if t]:
        extra[f"{target:g}"] = extra_target(rows, summary, target, ref, sgd_epoch_s)
    load_end = loadavg()
    best = best_windows(rows)
    best_epochs = best_windows(rows, "end_to_end_epochs_over_sgd") if sgd_epoch_s else None
    os.makedirs(out, exist_ok=True)
    ref_out = {k: v for k, v in ref.items() if k not in ("elapsed_at_epoch", "test_acc_at_epoch")}
    record = {"run": run.uri, "windows": windows, "optimizers": optimizers, "dims": dims,
              "train_settings": {o: c.to_dict()["train"] for o, c in cfgs.items()},
              "train_overrides": overrides, "late_epochs": args.late_epochs, "late_after": args.late_after,
              "reference": {**ref_out, "sgd_history": summary["results"]["sgd"]["history"]},
              "sgd_epoch_s_in_process": probes, "rows": rows, "signal": signal,
              "best_window_per_optimizer": best, "best_window_per_optimizer_epochs": best_epochs,
              "extra_targets": extra, "adaptive_window": adaptive, "adaptive_rule": rule,
              "load_average": {"start": load_start, "end": load_end}, "threads": args.threads,
              "wall_s": time.perf_counter() - t0}
    with open(os.path.join(out, "table.json"), "w") as fh:
        json.dump(strict_json(record), fh, indent=1, allow_nan=False)
    plot(os.path.join(out, "tradeoff.png"), rows, signal, ref, dims, adaptive, extra)
    say("")
    say(tradeoff_table(rows))
    say(f"[window] load average at start: {load_start}; at end: {load_end}; wall {time.perf_counter() - t0:.0f}s")
    last = {"windows": windows, "adaptive_window": adaptive, "adaptive_rule": rule,
            "adaptive_rows": [{k: r[k] for k in ("optimizer", "dim", "window", "final_acc", "end_to_end_over_sgd",
                                                 "end_to_end_over_sgd_to_target", "end_to_end_epochs_over_sgd")
                               if k in r} for r in rows if r["adaptive"]],
            "best_window_per_optimizer": best,
            "best_window_per_optimizer_epochs": best_epochs, "rows_file": os.path.join(out, "table.json"),
            "plot": os.path.join(out, "tradeoff.png"),
            "signal": {s["epoch"]: {k: v for k, v in s.items() if k != "epoch"} for s in signal},
            "sgd_test_acc": ref["sgd_test_acc"], "target_acc": ref["target_acc"], "sgd_s": ref["sgd_s"],
            "sgd_s_to_target": ref["sgd_s_to_target"], "sgd_epochs_to_target": ref["sgd_epochs_to_target"],
            "sgd_epoch_s_in_process": sgd_epoch_s, "late_epochs": args.late_epochs,
            "extra_targets": {t: v["best_window_per_optimizer"] for t, v in extra.items()},
            "load_average": {"start": load_start, "end": load_end}}
    print(json.dumps(strict_json(last), allow_nan=False))
    return 0


def replot(out: str, targets: Sequence[float]) -> int:
    """``--replot``: the extra targets' figures from a finished run's table.json (rows and SGD history are all in
    it), written back to it, and the plot redrawn; prints the best window per optimizer for each target."""
    from raysub.storage import strict_json

    path = os.path.join(out, "table.json")
    if not os.path.exists(path):
        print(f"error: --replot needs {path}: run the benchmark with this --out first", file=sys.stderr)
        return 2
    with open(path) as fh:
        record = json.load(fh)
    ref = record["reference"]
    summary = {"results": {"sgd": {"history": ref["sgd_history"]}}}
    probes = record.get("sgd_epoch_s_in_process") or []
    sgd_epoch_s = float(np.median(probes)) if probes else None
    extra = dict(record.get("extra_targets") or {})
    for target in targets:
        extra[f"{target:g}"] = extra_target(record["rows"], summary, target, ref, sgd_epoch_s)
    record["extra_targets"] = extra
    with open(path, "w") as fh:
        json.dump(strict_json(record), fh, indent=1, allow_nan=False)
    adaptive = {int(d): w for d, w in (record.get("adaptive_window") or {}).items()}
    plot(os.path.join(out, "tradeoff.png"), record["rows"], record["signal"], ref, record["dims"], adaptive, extra)
    print(json.dumps(strict_json({t: {"sgd_epochs_to_target": v["sgd_epochs_to_target"],
                                      "best_window_per_optimizer": v["best_window_per_optimizer"]}
                                  for t, v in extra.items()}), allow_nan=False))
    return 0


def _fmt(v, f: str = "{:.4f}") -> str:
    return "-" if v is None else f.format(v)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main())
