"""Class-gradient quasi-Newton vs. plain SGD on Fashion-MNIST / LeNet-5 (Tuddenham, Prügel-Bennett & Hare).

What it measures
    Two (or three) trainings of the same seeded LeNet-5 θ0 on Fashion-MNIST in ONE run directory, each a normal
    raysub training (Ray Train DDP over cluster.num_workers CPU workers, the loop of raysub.pipeline.train, the
    optimizer chosen from the registry) with the config's batch (128), constant lr η (0.05), no momentum, the
    identity projection (full parameters: z = θ − θ0) and the same data order:
      cgqn           the registered `cgqn` optimizer (raysub.optim.cgqn): eq. 15–17 of the paper, with the
                     config's train.optimizer_options (shipped: γ = 0.9, mode orthonormal, damping 1);
      sgd            the registered `sgd` optimizer at the same η (θ' = θ − η g);
      cgqn_undamped  (only with --arms cgqn,sgd,cgqn_undamped) cgqn with damping 0, the paper's own setting; it
                     usually blows up within a few steps (see raysub/optim/cgqn.py).
    The arms now run one after the other (not interleaved step by step as this job used to), so machine load hits
    them at different times: the step-time ratio (wall s / steps of each arm, qn ÷ sgd) is only meaningful on a
    quiet machine. Per arm: test accuracy per epoch, training loss per step, convergence step (SL2O §4.1).

Outputs (the run directory, run_dir — default runs/fashion_mnist_lenet_cgqn): manifest.json, config.yaml,
theta0.pt, summary.json (results.cgqn, results.sgd, … with their per-epoch history), curves/LABEL.json (training
loss per step), train/LABEL.pt (the trained z), plots/test_accuracy.png and plots/cgqn_vs_sgd.png (smoothed
training loss per step; test accuracy per epoch). It prints the progress lines of every arm, then a table (arm,
test acc, final train loss, convergence step, wall s, seconds per step ÷ sgd's), and as its last stdout line one
JSON object: qn_test_acc, sgd_test_acc, qn_final_train_loss, sgd_final_train_loss, qn_over_sgd_step_time (and
undamped_* with the third arm; non-finite values are null), paths.

How long it takes
    Not timed end to end in this version; from the measured step costs: a cgqn step is the loop's own forward/
    backward plus one forward and C+1 = 11 batched backward passes for the class sums — on LeNet-5, one thread,
    batch 64 (one worker's share), 81 ms against 12 ms for an SGD step (≈ 7×; the earlier interleaved job
    measured 5.6× when the class sums also gave the gradient). With 2 workers on a 2-core machine that is
    roughly 45–60 s per cgqn epoch (468 steps, plus the all-reduce of (C+1)·N floats) and 10–15 s per SGD epoch,
    plus evaluation and ~20–30 s of Ray and trainer start-up per arm: the shipped 5 epochs should take about
    6–8 minutes. train.epochs=1 for a quick check.

How to run
    locally (starts a throwaway Ray cluster on this machine):
        python jobs/class_gradient_qn.py
        python jobs/class_gradient_qn.py train.epochs=1 run_dir=/tmp/cgqn --overwrite
        python jobs/class_gradient_qn.py --arms cgqn,sgd,cgqn_undamped run_dir=/tmp/cgqn3
        python jobs/class_gradient_qn.py data.name=digits model.name=mlp train.epochs=1 run_dir=/tmp/cgqn_smoke
    on a running Ray cluster (the driver joins it; the data must exist on every worker node; run_dir absolute or
    a URI every node reaches):
        export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265
        export RAY_AUTH_MODE=token   # token-auth clusters (the client sends ~/.ray/auth_token or RAY_AUTH_TOKEN)
        ray job submit --working-dir . -- python jobs/class_gradient_qn.py run_dir=/tmp/cgqn --overwrite

    python jobs/class_gradient_qn.py [CONFIG] [key=value ...] [--arms LIST] [--resume | --overwrite]
    CONFIG defaults to raysub/configs/fashion_mnist_lenet_cgqn.yaml (a path or a shipped name); overrides are
    dotted keys as for every raysub command. --resume continues an interrupted run (finished arms are skipped),
    --overwrite replaces the run directory.

Bad input (γ outside (0, 1), an unknown option, a missing data directory, an existing run directory without
--resume/--overwrite, …) prints one line and exits 2 before anything is started or written.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

PROG = "class_gradient_qn"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "raysub", "configs", "fashion_mnist_lenet_cgqn.yaml")
ARMS = ("cgqn", "sgd", "cgqn_undamped")
PLOT = "plots/cgqn_vs_sgd.png"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = _Parser(prog=f"python jobs/{PROG}.py", description=__doc__.split("\n\n")[0])
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
    from raysub.errors import ConfigError

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
    from raysub.config import Config
    from raysub.errors import ConfigError
    from raysub.pipeline.plan import validate

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
    from raysub.pipeline.run import stage_train, train_from_config

    first, *rest = cfgs
    train_from_config(cfgs[first], resume=resume, overwrite=overwrite)
    run_uri = cfgs[first].run_dir  # made absolute (a URI) by train_from_config
    for arm in rest:
        cfgs[arm].run_dir = run_uri
        stage_train(run_uri, cfg=cfgs[arm], resume=resume, overwrite=overwrite)
    return run_uri


# ----------------------------------------------------------------------------------------- report


def _finite(v) -> Optional[float]:
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
    from raysub.pipeline.run import format_table

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
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from raysub.metrics import smoothed

    colors = {"sgd": "tab:blue", "cgqn": "tab:red", "cgqn_undamped": "tab:orange"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    epochs = max(1, max(summary["results"][a]["epochs"] for a in arms))
    windows = set()
    for arm in arms:
        losses = run.read_json(f"curves/{arm}.json")["train_loss"]
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
    from raysub.pipeline.records import read_summary
    from raysub.storage import RunDir

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
    out["paths"] = {"run_dir": run.uri, "manifest": run.path("manifest.json"), "summary": run.path("summary.json"),
                    "plot": run.path(PLOT), "curves": {a: run.path(f"curves/{a}.json") for a in arms}}
    return out


def _names(run) -> Dict[str, Any]:
    """What the plot title names, from the run's config and manifest.json (summary.json has the dataset and
    model only after a sampling stage)."""
    from raysub.pipeline.records import stored_config

    cfg = stored_config(run)
    return {"dataset": cfg["data"]["name"], "model": cfg["model"]["name"], "lr": cfg["train"]["lr"],
            "batch": cfg["train"]["batch_size"] or cfg["data"]["batch_size"],
            "num_params": run.read_json("manifest.json")["num_params"]}


# ----------------------------------------------------------------------------------------- entry point


def main(argv=None) -> int:
    from _launch import cluster_overrides, job_server_address, use_repo_raysub, warn_local_run_dir

    use_repo_raysub()
    from raysub.credentials import mask

    ns = parse_args(sys.argv[1:] if argv is None else argv)
    if job_server_address():
        print(f"{PROG}: error: RAY_ADDRESS={mask(job_server_address())} is a job-server address: submit with `ray job "
              f"submit --working-dir . -- python jobs/{PROG}.py ...` or unset RAY_ADDRESS to run here",
              file=sys.stderr, flush=True)
        return 2

    from raysub.cli import resolve_config
    from raysub.config import load_config
    from raysub.engine.cluster import unwrap_train_error
    from raysub.errors import RaysubError

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


if __name__ == "__main__":
    sys.exit(main())
