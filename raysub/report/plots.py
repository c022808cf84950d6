"""PNG plots of a run: explained variance of the trajectory PCA, test accuracy against epoch per method, the
sweep, meta-training and meta-test curves, the sampling window's stop signal."""
from __future__ import annotations

import io
from typing import Any, Dict, Sequence

import numpy as np

from raysub.metrics import smoothed
from raysub.runs import layout


def _save(run, rel: str, fig) -> None:
    # heavy: matplotlib loads here, not when this module is imported
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    run.write_bytes(rel, buf.getvalue())


def _figure():
    # heavy: matplotlib loads here, not when this module is imported (the Agg backend chosen before pyplot)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0))


def plot_explained_variance(run, ratio: Sequence[float], dim: int) -> None:
    """Bars: explained-variance ratio per component; line: cumulative; the kept components highlighted."""
    fig, ax = _figure()
    ratio = np.asarray(ratio)
    k = np.arange(1, len(ratio) + 1)
    ax.bar(k, ratio, color=["tab:blue" if i <= dim else "tab:gray" for i in k], label="per component")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax2 = ax.twinx()
    ax2.plot(k, np.cumsum(ratio), color="tab:red", marker=".", label="cumulative")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative")
    ax.axvline(dim + 0.5, color="k", lw=0.8, ls="--")
    ax.set_title(f"trajectory PCA: top {dim} explain {100 * ratio[:dim].sum():.1f}%")
    _save(run, layout.PLOT_EXPLAINED_VARIANCE, fig)


def plot_accuracy(run, summary: Dict[str, Any]) -> None:
    """Test accuracy against epoch for every method with a history; the snapshot window shaded."""
    fig, ax = _figure()
    for name, r in summary["results"].items():
        hist = r.get("history")
        if not hist:
            continue
        label = f"{name} (d={r['dim']:,})"
        ax.plot([h["epoch"] for h in hist], [100 * h["test_acc"] for h in hist], marker=".", label=label)
    window = summary["results"].get("sgd@sample")
    if window:
        ax.axvspan(0, window["epochs"], color="gray", alpha=0.15, label="snapshot window")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{summary.get('model', '')} on {summary.get('dataset', '')}")
    _save(run, layout.PLOT_ACCURACY, fig)


def plot_sweep(run, points: Sequence[Dict[str, Any]], baseline: float, target: float, threshold: float,
               title: str = "intrinsic dimension sweep") -> None:
    """Validation accuracy against d (log axis) per family: mean over seeds with the seeds' range, the baseline
    and the threshold line; d_int is where a family's curve first reaches the line."""
    fig, ax = _figure()
    for family in sorted({p["family"] for p in points}):
        rows = sorted((p for p in points if p["family"] == family), key=lambda p: p["dim"])
        d = np.array([p["dim"] for p in rows])
        mean = np.array([100 * p["val_acc"] for p in rows])
        lo = mean - np.array([100 * p["val_acc_min"] for p in rows])
        hi = np.array([100 * p["val_acc_max"] for p in rows]) - mean
        ax.errorbar(d, mean, yerr=[lo, hi], marker="o", ms=4, capsize=2, label=family)
    ax.axhline(100 * baseline, color="k", lw=0.8, ls=":", label=f"full training {100 * baseline:.1f}%")
    ax.axhline(100 * target, color="tab:red", lw=1.0, ls="--", label=f"{threshold:.0%} of full ({100 * target:.1f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(run, layout.PLOT_SWEEP, fig)


def plot_l2o(run, history: Dict[str, Any]) -> None:
    """Meta-training: the mean per-step training loss of each meta-step's unrolls (left), and the
    meta-validations' accuracy on the held-out split and convergence step (right); the selected φ marked."""
    # heavy: matplotlib loads here, not when this module is imported (the Agg backend chosen before pyplot)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.0))
    meta = [r for r in history["meta"] if r["loss"] is not None]
    ax.plot([r["meta_step"] for r in meta], [r["loss"] for r in meta], lw=0.8)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("unroll training loss (mean per step)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    val = history["validation"]
    steps = [r["meta_step"] for r in val]
    bx.plot(steps, [100 * r["val_acc"] for r in val], marker=".", color="tab:blue", label="val accuracy")
    bx.set_xlabel("meta-step")
    bx.set_ylabel("validation accuracy after N steps (%)")
    best = history.get("best")
    if best:
        bx.axvline(best["meta_step"], color="k", lw=0.8, ls="--", label="selected φ")
    cx = bx.twinx()
    conv = [(r["meta_step"], r["convergence_step"]) for r in val if r["convergence_step"] is not None]
    if conv:
        cx.plot(*zip(*conv), marker="x", color="tab:red", label="convergence step")
    cx.set_ylabel("convergence step (SL2O §4.1)")
    handles = [h for axis in (bx, cx) for h in axis.get_legend_handles_labels()[0]]
    bx.legend(handles=handles, loc="center right", framealpha=0.8)  # both axes' lines in one legend
    bx.grid(alpha=0.3)
    _save(run, layout.PLOT_L2O_CURVES, fig)


def plot_meta_test(run, record: Dict[str, Any], rel: str = "loss_curves.png") -> None:
    """Meta-testing (`raysub.l2o.metatest`): per optimizer the mean over the meta-test optimizees of the smoothed
    training loss (trailing mean of 20) against the step, log y, with the min–max band over optimizees; the
    horizons h·N dashed. When the runs have evaluated curves, a second panel draws those (the loss on the fixed
    training samples, no minibatch noise) the same way."""
    # heavy: matplotlib loads here, not when this module is imported (the Agg backend chosen before pyplot)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_curve = all("curve" in r for o in record["optimizers"].values() for r in o["runs"])
    fig, axes = plt.subplots(1, 2 if with_curve else 1, figsize=(13, 4.5) if with_curve else (7.5, 4.5),
                             squeeze=False)
    panels = [(axes[0][0], "training loss (trailing mean of 20)",
               lambda r: (np.arange(1, len(r["losses"]) + 1), smoothed(r["losses"])))]
    if with_curve:
        cur = record.get("curve") or {}
        panels.append((axes[0][1], f"loss on {cur.get('samples', '?'):,} fixed training samples",
                       lambda r: (np.asarray([s for s, _ in r["curve"]]), [v for _, v in r["curve"]])))
    for ax, ylabel, series in panels:
        for name, o in record["optimizers"].items():
            pairs = [series(r) for r in o["runs"]]
            n = min((len(v) for _, v in pairs), default=0)  # a diverged run ends early: the common part
            if n == 0:
                continue
            arr = np.asarray([v[:n] for _, v in pairs], dtype=float)
            steps = pairs[0][0][:n]
            label = o["label"] + ("" if o["lr"] is None else f" (lr {o['lr']:g}"
                                  + (f" {o['schedule']})" if o.get("schedule") else ")"))
            (line,) = ax.plot(steps, arr.mean(0), lw=1.2, label=label)
            ax.fill_between(steps, arr.min(0), arr.max(0), color=line.get_color(), alpha=0.15, lw=0)
        for h in record["horizons"]:
            ax.axvline(h * record["steps"], color="k", lw=0.6, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"meta-test: {record['task']['model']} {record['task']['projection']} d={record['task']['dim']}, "
                 f"{len(record['seeds'])} optimizees; dashed: h·N, N = {record['steps']}, h = "
                 f"{', '.join(map(str, record['horizons']))}", fontsize=9)
    _save(run, rel, fig)


def plot_stop_signal(run, signals: Sequence[Dict[str, Any]], threshold=None) -> None:
    """The adaptive window's signal per check: the reach residual (where SGD got, outside the previous check's
    top-d subspace) and its relative fall per epoch against the threshold; the window's end marked."""
    pts = [s for s in signals if s.get("reach_residual") is not None]
    if not pts:
        return
    fig, ax = _figure()
    ax.plot([s["epoch"] for s in pts], [s["reach_residual"] for s in pts], marker="o",
            label="reach residual ‖(I−UUᵀ)(θ−θ0)‖/‖θ−θ0‖")
    ax.set_xlabel("epoch (check)")
    ax.set_ylabel("reach residual")
    ax.set_ylim(0, max(s["reach_residual"] for s in pts) * 1.1)
    ends = [s["epoch"] for s in signals if s.get("stop")]
    if ends:
        ax.axvline(ends[0], color="k", lw=0.8, ls=":", label=f"window ends (epoch {ends[0]})")
    ax2 = ax.twinx()
    drops = [s for s in pts if s.get("residual_drop") is not None]
    ax2.plot([s["epoch"] for s in drops], [100 * s["residual_drop"] for s in drops], color="tab:gray", marker=".",
             lw=0.8, label="its fall since the previous check (%)")
    if threshold is not None:
        ax2.axhline(100 * threshold, color="tab:red", ls="--", lw=0.8, label=f"threshold {100 * threshold:g}%")
    ax2.set_ylabel("% fall per epoch")
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("sampling window: does the subspace still gain reach?")
    _save(run, layout.PLOT_STOP_SIGNAL, fig)
