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
    (`raysub.pipeline.train.train_epoch`, world = 1: the order the 2-worker run would see) and the package's
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
    sampler's `window_check` computes it: reach_residual(K, s, t, d) — the stopping signal — with s = snapshots
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
from typing import Any, Dict, List, Sequence

import numpy as np

from raysub.bench.harness import loadavg
from raysub.config import Config, SampleConfig, load_config
from raysub.errors import ConfigError
from raysub.pipeline.run import stage_sample
from raysub.runs import layout
from raysub.runs.manifest import Manifest
from raysub.storage import RunDir, strict_json
from raysub.bench.window_logic import (  # noqa: F401  re-exported: the benchmark's logic, imported from here by its tests
    RESIDUAL_AHEAD,
    SAMPLE_OVERRIDES,
    TRAIN_DEFAULTS,
    adaptive_windows,
    best_windows,
    build_subspace_task,
    displacements,
    end_to_end,
    extra_target,
    first_reaching,
    gram_theta0,
    optimizer_overrides,
    prefix_basis,
    read_trajectory,
    residual_outside,
    sgd_reference,
    stop_signals,
    timed_basis,
    train_config,
    window_scales,
    window_sizes,
)
from raysub.bench.window_runs import (  # noqa: F401  re-exported: the benchmark's runs, imported from here by its tests
    panel_target,
    plot,
    scaled_schedule,
    sgd_epoch_probe,
    tradeoff_table,
    train_subspace,
)

# ---------------------------------------------------------------------------------------------------------

def ensure_sampled(run_path: str, say) -> None:
    """Sample the reference run when ``run_path`` does not exist (the protocol's command)."""
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "raysub", "configs",
                                   "fashion_mnist_lenet.yaml"), SAMPLE_OVERRIDES + [f"run_dir={run_path}"])
    say(f"[sample] {run_path} does not exist: sampling it ({' '.join(SAMPLE_OVERRIDES)})")
    stage_sample(cfg, say=say)


def main(argv=None) -> int:
    # heavy: torch (and raysub.data, which imports it) loads here, not when this module is imported
    import torch

    from raysub.data import open_dataset

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
    manifest = Manifest.peek(run)
    if not manifest.stages.get("sample", {}).get("complete"):
        print(f"error: {run.uri} has no complete sample stage (manifest stages.sample.complete)", file=sys.stderr)
        return 2
    base = manifest.config
    summary = manifest.summary or run.read_json(layout.SUMMARY)
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
