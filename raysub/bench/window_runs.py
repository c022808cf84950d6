"""The window trade-off benchmark's training and report (`raysub.bench.window_tradeoff`): subspace training
of one window's basis in this process, the SGD epoch probe, the best windows, the table and the plot."""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional, Sequence
import copy

import numpy as np


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
    # heavy: torch loads here, not when this module is imported
    import torch

    # heavy: torch, pyarrow load here, not when this module is imported
    from raysub.engine import loop
    from raysub.engine.task import evaluate_task
    from raysub.optim import build_optimizer
    from raysub.pipeline.train import train_epoch

    cfg = task.cfg
    z_D = task.new_z()
    opt = _StopOnNonFinite(build_optimizer(cfg.train.optimizer, z_D, cfg.train))
    history, elapsed = [], 0.0
    for epoch in range(cfg.train.epochs if epochs is None else epochs):
        opt.set_lr(loop.lr_at(epoch, cfg.train.lr, cfg.train.lr_milestones, cfg.train.lr_gamma))
        t0 = time.perf_counter()
        try:
            losses, _ = train_epoch(task, z_D, opt, epoch, 0, 1)
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
    # heavy: torch loads here, not when this module is imported
    import torch

    # heavy: torch, pyarrow load here, not when this module is imported
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
    # heavy: matplotlib loads here, not when this module is imported
    import matplotlib

    matplotlib.use("Agg")
    # heavy: matplotlib loads here, not when this module is imported
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
