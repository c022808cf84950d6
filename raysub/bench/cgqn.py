"""Class-gradient quasi-Newton vs. plain SGD (Tuddenham, Prügel-Bennett & Hare): the logic of
``jobs/class_gradient_qn.py`` — the arms' configs, their trainings in one run directory, the table, the plot and
the last-line JSON. What it measures, its outputs and its cost: the job's docstring.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence
import io

from raysub.bench.harness import OneLineParser
from raysub.cli import CONFIG_DIR, resolve_config
from raysub.config import Config, load_config
from raysub.credentials import mask
from raysub.errors import ConfigError, RaysubError
from raysub.engine.cluster import unwrap_train_error
from raysub.launch import cluster_overrides, job_server_address, warn_local_run_dir
from raysub.metrics import smoothed
from raysub.pipeline.plan import validate
from raysub.pipeline.run import stage_train, train_from_config
from raysub.report.tables import format_table
from raysub.runs import layout
from raysub.runs.manifest import Manifest
from raysub.runs.records import read_summary, stored_config
from raysub.storage import RunDir

PROG = "class_gradient_qn"
DESCRIPTION = "Class-gradient quasi-Newton vs. plain SGD on Fashion-MNIST / LeNet-5 (Tuddenham, Prügel-Bennett & Hare)."
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "fashion_mnist_lenet_cgqn.yaml")
ARMS = ("cgqn", "sgd", "cgqn_undamped")
PLOT = "plots/cgqn_vs_sgd.png"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The job's command line: [CONFIG] key=value ..., --arms, --resume, --overwrite (bad input: one line, exit 2)."""
    p = OneLineParser(PROG, prog=f"python jobs/{PROG}.py", description=DESCRIPTION)
    p.add_argument("args", nargs="*", metavar="[CONFIG] key=value",
                   help="YAML config (default: the shipped fashion_mnist_lenet_cgqn), then dotted overrides")
    p.add_argument("--arms", default="cgqn,sgd",
                   help="comma-separated arms, cgqn and sgd plus optionally cgqn_undamped (default cgqn,sgd)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (finished arms are skipped)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    return p.parse_intermixed_args(list(argv))


def parse_arms(text: str) -> List[str]:
    """The arms of ``--arms``, cgqn first (it creates the run directory).

    Raises:
        ConfigError: an unknown arm, or cgqn or sgd missing.
    """
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "cgqn" not in arms or "sgd" not in arms or len(set(arms)) != len(arms):
        raise ConfigError(f"--arms {text}: give cgqn and sgd, optionally cgqn_undamped, each once "
                          f"(known arms: {', '.join(ARMS)})")
    return ["cgqn"] + [a for a in arms if a != "cgqn"]


def arm_configs(cfg, arms: Sequence[str]) -> Dict[str, Any]:
    """One Config per arm: the job's config with the arm's train.optimizer, options and label; each checked.

    Raises:
        ConfigError: every problem of every arm, in one message.
    """

    if cfg.train.optimizer != "cgqn":
        raise ConfigError(f"train.optimizer={cfg.train.optimizer}: this job compares the cgqn optimizer with sgd; "
                          f"leave train.optimizer at cgqn")
    base = cfg.to_dict()
    out: Dict[str, Any] = {}
    problems: List[str] = []
    for arm in arms:
        d = copy.deepcopy(base)
        d["train"]["label"] = arm
        if arm == "sgd":  # the same lr, θ0 and data order; sgd takes no options
            d["train"].update(optimizer="sgd", optimizer_options={})
        elif arm == "cgqn_undamped":
            d["train"]["optimizer_options"] = {**d["train"]["optimizer_options"], "damping": 0.0}
        out[arm] = Config.from_dict(d)
        problems += [p for p in validate(out[arm]) if p not in problems]
    if problems:
        raise ConfigError(problems)
    return out


def run_arms(cfgs: Dict[str, Any], resume: bool, overwrite: bool) -> str:
    """Train every arm into one run directory (the first creates it); returns its URI."""
    first, *rest = cfgs
    train_from_config(cfgs[first], resume=resume, overwrite=overwrite)
    run_uri = cfgs[first].run_dir  # made absolute (a URI) by train_from_config
    for arm in rest:
        cfgs[arm].run_dir = run_uri
        stage_train(run_uri, cfg=cfgs[arm], resume=resume, overwrite=overwrite)
    return run_uri


# ----------------------------------------------------------------------------------------- report


def _finite(v) -> Optional[float]:
    """``v`` as a float, or None when missing or not finite (JSON has no NaN)."""
    return float(v) if v is not None and math.isfinite(float(v)) else None


def arm_rows(summary: Dict[str, Any], arms: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Per arm: test acc, final train loss (mean step loss of the last epoch), convergence step, wall s, steps,
    seconds per step and its ratio to sgd's."""
    rows = {}
    for arm in arms:
        r = summary["results"][arm]
        steps = r.get("steps") or 0
        rows[arm] = {"test_acc": _finite(r["test_acc"]), "final_train_loss": _finite(r["history"][-1]["train_loss"]),
                     "convergence_step": r.get("convergence_step"), "wall_s": r["wall_s"], "steps": steps,
                     "s_per_step": r["wall_s"] / steps if steps else None}
    ref = rows["sgd"]["s_per_step"]
    for row in rows.values():
        row["step_time_vs_sgd"] = row["s_per_step"] / ref if row["s_per_step"] and ref else None
    return rows


def table(rows: Dict[str, Dict[str, Any]]) -> str:
    """The console table of `arm_rows`: one row per arm."""
    def fmt(v, spec):
        if v is None:
            return "—"
        return format(v, ".3e") if spec == ".4f" and abs(v) >= 1e4 else format(v, spec)

    lines = [("arm", "test acc", "final train loss", "convergence step", "wall s", "s/step ÷ sgd")]
    for arm, r in rows.items():
        lines.append((arm, "—" if r["test_acc"] is None else f"{100 * r['test_acc']:.2f}%",
                      fmt(r["final_train_loss"], ".4f"), fmt(r["convergence_step"], "d"), f"{r['wall_s']:.1f}",
                      fmt(r["step_time_vs_sgd"], ".2f")))
    return "\n".join(format_table(lines))


def plot(run, summary: Dict[str, Any], arms: Sequence[str]) -> None:
    """plots/cgqn_vs_sgd.png: training loss per step (faint: raw; line: trailing mean) from curves/LABEL.json,
    and test accuracy per epoch from summary.json's history."""

    import matplotlib  # local: only the report draws, and matplotlib costs a second to import

    matplotlib.use("Agg")
    # heavy: matplotlib loads here, not when this module is imported
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"sgd": "tab:blue", "cgqn": "tab:red", "cgqn_undamped": "tab:orange"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    epochs = max(1, max(summary["results"][a]["epochs"] for a in arms))
    windows = set()
    for arm in arms:
        losses = run.read_json(layout.curve(arm))["train_loss"]
        finite = [(i + 1, v) for i, v in enumerate(losses) if v is not None and math.isfinite(v)]
        window = max(1, len(losses) // (20 * epochs))
        windows.add(window)
        sm = [(i + 1, v) for i, v in enumerate(smoothed(losses, window, skip_nonfinite=True)) if v is not None]
        if finite:
            ax1.plot(*zip(*finite), color=colors.get(arm), alpha=0.15, lw=0.6)
        label = arm + ("" if len(finite) == len(losses) else f" ({len(losses) - len(finite)} non-finite steps)")
        if sm:
            ax1.plot(*zip(*sm), color=colors.get(arm), lw=1.6, label=label)
        hist = summary["results"][arm]["history"]
        pts = [(h["epoch"], 100 * h["test_acc"]) for h in hist if _finite(h["test_acc"]) is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o", color=colors.get(arm), label=arm)
    ax1.set_ylim(0, 2.5)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"training loss (minibatch; line: mean of last {'/'.join(map(str, sorted(windows)))})")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.suptitle(f"{summary['model']} on {summary['dataset']}: SGD vs class-gradient QN (same η = {summary['lr']:g}, "
                 f"θ0 and data order; {summary['num_params']:,} parameters, batch {summary['batch']})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    run.write_bytes(PLOT, buf.getvalue())


def report(run_uri: str, arms: Sequence[str]) -> Dict[str, Any]:
    run = RunDir(run_uri)
    summary = read_summary(run)
    rows = arm_rows(summary, arms)
    plot(run, {**summary, **_names(run)}, arms)
    print(table(rows), flush=True)
    out: Dict[str, Any] = {
        "qn_test_acc": rows["cgqn"]["test_acc"], "sgd_test_acc": rows["sgd"]["test_acc"],
        "qn_final_train_loss": rows["cgqn"]["final_train_loss"],
        "sgd_final_train_loss": rows["sgd"]["final_train_loss"],
        "qn_over_sgd_step_time": rows["cgqn"]["step_time_vs_sgd"],
    }
    if "cgqn_undamped" in rows:
        out.update(undamped_test_acc=rows["cgqn_undamped"]["test_acc"],
                   undamped_final_train_loss=rows["cgqn_undamped"]["final_train_loss"],
                   undamped_over_sgd_step_time=rows["cgqn_undamped"]["step_time_vs_sgd"])
    out["paths"] = {"run_dir": run.uri, "manifest": run.path(layout.MANIFEST), "summary": run.path(layout.SUMMARY),
                    "plot": run.path(PLOT), "curves": {a: run.path(layout.curve(a)) for a in arms}}
    return out


def _names(run) -> Dict[str, Any]:
    """What the plot title names, from the run's config and manifest.json (summary.json has the dataset and
    model only after a sampling stage)."""
    cfg = stored_config(run)
    return {"dataset": cfg["data"]["name"], "model": cfg["model"]["name"], "lr": cfg["train"]["lr"],
            "batch": cfg["train"]["batch_size"] or cfg["data"]["batch_size"],
            "num_params": Manifest.read(run).num_params}


# ----------------------------------------------------------------------------------------- entry point


def main(argv=None) -> int:
    """The job: parse ``argv`` (default ``sys.argv[1:]``), train every arm, print the table and the JSON line;
    returns the exit status (2: bad input, 130: interrupted)."""
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    if job_server_address():
        print(f"{PROG}: error: RAY_ADDRESS={mask(job_server_address())} is a job-server address: submit with `ray job "
              f"submit --working-dir . -- python jobs/{PROG}.py ...` or unset RAY_ADDRESS to run here",
              file=sys.stderr, flush=True)
        return 2

    positionals = list(ns.args)
    config = DEFAULT_CONFIG
    if positionals and "=" not in positionals[0]:
        config, positionals = resolve_config(positionals[0]), positionals[1:]
    try:
        arms = parse_arms(ns.arms)
        cfg = load_config(config, [*positionals, *cluster_overrides(positionals)])
        cfgs = arm_configs(cfg, arms)
        warn_local_run_dir(cfg.run_dir)
        run_uri = run_arms(cfgs, resume=ns.resume, overwrite=ns.overwrite)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with --resume", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:
        err = unwrap_train_error(exc)
        if not isinstance(err, RaysubError):
            raise
        print(f"{PROG}: error: {'; '.join(err.problems)}", file=sys.stderr, flush=True)
        return 2
    out = report(run_uri, arms)
    print(json.dumps(out), flush=True)
    return 0
