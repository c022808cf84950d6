"""Every console table and progress line of raysub, from the records the workflows write (pure: no Ray, no torch).

- `format_table` — the one table layout: header, a dashed rule, rows;
- runs: `format_progress` (one epoch's line), `results_table` (``raysub run``'s table);
- sweeps: `sweep_table`; learned-optimizer tuning: `tune_table`;
- meta-testing: `meta_test_table`, `transfer_table` (and `task_label`, the task's name in both).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

# The sweep's full-training family (P = I), as its table names it; `raysub.pipeline.sweep_plan.BASELINE` is this
# name, so the table and the sweep cannot disagree.
BASELINE = "identity"


def format_table(rows: Sequence[Sequence[str]], align_left: bool = False) -> List[str]:
    """Console table lines: the first row is the header, then a dashed rule, then the rows.

    The first column is left-aligned and the rest right-aligned (numbers); ``align_left``: every column
    left-aligned, trailing spaces stripped (cells of mixed text such as "1.0 ± 0.2").
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    if align_left:
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    else:
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


# ---------------------------------------------------------------------------------------------------------
# runs

def format_progress(r: Dict[str, Any]) -> str:
    """One epoch's progress line of a stage (sample or train): losses, test accuracy, snapshots, stop signal."""
    extra = f"  snapshots {r['num_snapshots']}" if "num_snapshots" in r else ""
    signal = r.get("stop_signal") or {}
    if signal.get("reach_residual") is not None:
        drop = signal.get("residual_drop")
        extra += (f"  reach residual {signal['reach_residual']:.3f}"
                  + (f" (fell {100 * drop:.1f}%)" if drop is not None else "")
                  + ("  [window ends]" if signal.get("stop") else ""))
    width = len(str(r["epochs"]))
    return (f"[{r['stage']}] epoch {r['epoch']:>{width}}/{r['epochs']}  train loss {r['train_loss']:.4f}  "
            f"test loss {r['test_loss']:.4f}  test acc {100 * r['test_acc']:.2f}%{extra}  {r['elapsed_s']:.1f}s")


def results_table(summary: Dict[str, Any]) -> str:
    """The console table of a run's results; a diverged training shows as ``diverged (epoch E)``, never as an
    accuracy."""
    rows = [("method", "dim", "test acc", "epochs", "wall s")]
    for name, r in summary["results"].items():
        acc = (f"diverged (epoch {r['diverged'].get('epoch')})" if r.get("diverged")
               else f"{100 * r['test_acc']:.2f}%")
        rows.append((name, f"{r['dim']:,}", acc, str(r["epochs"]), f"{r['wall_s']:.1f}"))
    lines = format_table(rows)
    t = summary.get("timings", {})
    lines.append(f"timings: sample {t.get('sample_s', 0):.1f}s (snapshot window)  basis {t.get('basis_s', 0):.1f}s  "
                 f"train {t.get('train_s', 0):.1f}s" + (f"  total {t['total_s']:.1f}s" if "total_s" in t else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# sweeps and tuning

def sweep_table(summary: Dict[str, Any]) -> str:
    """The console table of a sweep: per family its intrinsic dimension, accuracies, trials and time."""
    rows = [("family", "d_int", "val acc", "test acc", "trials", "trial s")]
    b = summary["baseline"]
    if b.get("trials"):
        rows.append((f"full ({BASELINE})", f"{summary['num_params']:,}", f"{100 * b['val_acc']:.2f}%",
                     f"{100 * b['test_acc']:.2f}%", str(b["trials"]), f"{b['train_s']:.0f}"))
    for f, r in summary["families"].items():
        if r["d_int"] is None:
            d_int, val, test = f"> {r['max_dim']:,}", "—", "—"
        else:
            d_int, val, test = f"{r['d_int']:,}", f"{100 * r['val_acc']:.2f}%", f"{100 * r['test_acc']:.2f}%"
        rows.append((f, d_int, val, test, str(r["trials"]), f"{r['train_s']:.0f}"))
    lines = format_table(rows)
    lines.append(f"d_int{round(100 * summary['threshold'])}: smallest d whose mean validation accuracy over "
                 f"{len(summary['seeds'])} seed(s) reaches {summary['threshold']:.0%} of the baseline "
                 f"({100 * summary['target']:.2f}%); sweep wall time {summary['wall_s']:.0f}s")
    diverged = [f"{t['family']} d={t['dim']:,} seed {t['seed']} (epoch {t['diverged']})"
                for t in summary["trials"] if "diverged" in t]
    if diverged:
        lines.append(f"diverged, so failing their d: {', '.join(diverged)}")
    return "\n".join(lines)


def tune_table(summary: Dict[str, Any]) -> str:
    """The console table: one row per trial (its point, best φ's val acc and convergence step, meta-steps done,
    ASHA's stop), the best marked ``*``."""
    keys = summary["space_keys"]
    rows = [("trial", *keys, "val acc", "conv step", "final loss", "meta-steps", "stopped", "s")]
    best = summary["best"]["trial"] if summary["best"] else None

    def cell(v) -> str:  # a choice: a number, a name (rule, estimator), or a list (features, a horizon range)
        if isinstance(v, list):
            v = [str(x) for x in v]
            return "".join(v) if all(len(x) == 1 for x in v) else "-".join(v)
        return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    for r in summary["trials"]:
        point = [cell(r["point"][k]) for k in keys] if r["point"] else ["?"] * len(keys)
        if "best" in r:
            cs, fl = r["best"]["convergence_step"], r["best"].get("final_loss")
            stats = (f"{100 * r['best']['val_acc']:.2f}%", "never" if cs is None else f"{cs:.1f}",
                     "" if fl is None else f"{fl:.4f}",
                     f"{r['meta_steps']}/{summary['meta_steps']}", "ASHA" if r["stopped_early"] else "",
                     f"{r['meta_train_s']:.0f}")
        else:
            stats = ("error", "", "", "", "", "")
        rows.append(((r["trial"] + (" *" if r["trial"] == best else "")), *point, *stats))
    lines = format_table(rows)
    lines.append(f"val acc and conv step: the trial's best φ (mean over {summary['validation_optimizees']} "
                 f"validation optimizees of {summary['steps']} steps; conv step 'never' = did not converge); "
                 f"* best: {summary.get('selection') or 'fastest conv step within the tolerance of the most accurate'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# meta-testing

def task_label(task: Dict[str, Any]) -> str:
    """"fashion-mnist lenet5 dldr d=40" from a record's ``task`` (or any mapping with those keys)."""
    return f"{task['data']} {task['model']} {task['projection']} d={task['dim']}"


def _pm(ms: Dict[str, float], scale: float = 1.0, fmt: str = ".1f") -> str:
    return f"{scale * ms['mean']:{fmt}} ± {scale * ms['std']:{fmt}}"


def meta_test_table(record: Dict[str, Any]) -> str:
    """The console table of a meta-test record (`raysub.l2o.metatest.meta_test`): per optimizer its lr,
    convergence step and test accuracy (mean ± std over the meta-test optimizees; ≥: some never converged,
    counted at the run's length), and φ's speedups over Momentum† (and Adam†) at each horizon (≥: a lower bound),
    then those on the evaluated curve when the record has them."""
    adam = record.get("speedups_adam")
    over = " over Mom† / Adam†" if adam else ""
    heads = ["optimizer", "lr", "conv step", "test acc % (end)"] + [f"speedup {h}N{over}" for h in record["horizons"]]
    rows = []

    def cell(sp):
        return ("≥ " if sp["lower_bound"] else "") + f"{sp['mean']:.2f}"

    for name, o in record["optimizers"].items():
        s = o["summary"]
        conv = ("≥ " if s["not_converged"] else "") + _pm(s["convergence_step"])
        lr = "φ" if o["lr"] is None else f"{o['lr']:g}" + (f" {o['schedule']}" if o.get("schedule") else "")
        cells = [o["label"] + (f" ({s['diverged']} diverged)" if s["diverged"] else ""), lr, conv,
                 _pm(s["test_acc"], 100, ".2f")]
        for h in record["horizons"]:
            both = cell(record["speedups"][f"{h}n"]) + (f" / {cell(adam[f'{h}n'])}" if adam else "")
            cells.append(both if name == "l2o" else "")
        rows.append(cells)
    lines = format_table([heads] + rows, align_left=True)
    ev = record.get("eval_speedups")
    if ev and "psgd" in ev:  # the same speedups on the evaluated curve (no minibatch noise)
        cur = record["curve"]
        lines.append(f"speedup on the evaluated training loss ({cur['samples']:,} fixed training samples every "
                     f"{cur['every']} steps) over Mom†{' / Adam†' if 'adam' in ev else ''}: " + "; ".join(
                         f"{h}N {cell(ev['psgd'][f'{h}n'])}" + (f" / {cell(ev['adam'][f'{h}n'])}" if "adam" in ev
                                                                  else "") for h in record["horizons"]))
    return "\n".join(lines)


def transfer_table(records: Sequence[Dict[str, Any]]) -> str:
    """The transfer table (SL2O Table 3, with our metrics) of several meta-test records, in markdown: one row
    per (meta-trained on → meta-tested on)."""
    hs = sorted({h for r in records for h in r["horizons"]})
    out = ["| meta-trained on | meta-tested on | N | seeds | L2O test acc % | Momentum† test acc % | gap (pts) | "
           "conv step L2O / Mom† | " + " | ".join(f"speedup {h}N" for h in hs) + " |",
           "|---" * (8 + len(hs)) + "|"]
    for r in records:
        o, m = r["optimizers"]["l2o"]["summary"], r["optimizers"]["psgd"]["summary"]
        sp = [("≥ " if r["speedups"][f"{h}n"]["lower_bound"] else "") + f"{r['speedups'][f'{h}n']['mean']:.2f}"
              if f"{h}n" in r["speedups"] else "–" for h in hs]
        ratio = r["metrics"]["l2o_over_momentum_steps"]
        out.append(f"| {r.get('trained_on') or '?'} | {task_label(r['task'])} | {r['steps']} | {len(r['seeds'])} | "
                   f"{_pm(o['test_acc'], 100, '.2f')} | {_pm(m['test_acc'], 100, '.2f')} | "
                   f"{r['metrics']['acc_gap_pts']:.2f} | "
                   f"{'~' if r['metrics']['l2o_over_momentum_steps_censored'] else ''}{ratio:.2f} | "
                   + " | ".join(sp) + " |")
    out.append("\nMean ± std over the meta-test optimizees; test accuracy after the full run; gap = Momentum† − "
               "L2O. ≥: Momentum† never reached φ's smoothed loss within its run (a lower bound); ~: some run "
               "never converged (SL2O §4.1), counted at its length.")
    return "\n".join(out)
