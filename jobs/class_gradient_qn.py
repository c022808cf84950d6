"""Class-gradient quasi-Newton vs. plain SGD on Fashion-MNIST / LeNet-5 (Tuddenham, Prügel-Bennett & Hare).

What it measures
    One Ray Train run (DDP over --workers CPU workers, gloo) trains the same seeded LeNet-5 θ0 on Fashion-MNIST
    (global batch 128, no momentum, constant lr η) with several optimizers side by side, all implemented by
    `raysub.cgqn.ClassGradientQN` (same forward / batched-VJP / all-reduce code path):
      sgd        plain SGD, θ' = θ − η g (the class-gradient correction off);
      qn         class-gradient quasi-Newton, eq. 15–17 of the paper at the SAME η and γ (--mode: "orthonormal",
                 the exact eigen-system of the paper's low-rank Hessian inside span{c_k}, or "paper", eq. 15
                 literally), no damping unless --damping;
      qn_damped  the same with damping δ (--damped-arm, default 1; 0 leaves this arm out): 1/(λ + δ) instead of
                 1/λ, a Levenberg–Marquardt floor that matters only while λ_k is tiny (early training, where the
                 undamped step can blow up).
    Every arm sees the same batches in the same order (raysub.loop.epoch_batches): each global batch is stepped
    by every arm in turn (the order rotating every step), so machine load hits all arms alike and the per-step
    cost ratio (median step time qn ÷ sgd) is measured in the same run. An arm whose loss becomes non-finite is
    recorded as diverged and stops. Per epoch: test loss/accuracy of each arm, and (rank 0, diagnostics) the
    paper's curvature estimate λ̄_k next to the true Gauss–Newton curvature v_kᵀ H_GN v_k on 512 training
    examples, and the mean |cos| between class gradients. At the end: loss/accuracy on the full training set.

Output (--out, default runs/class_gradient_qn): train_loss.csv (per step: minibatch loss and step time of each
arm), epochs.csv (per epoch: mean step loss, test loss and accuracy), curves.png (smoothed training loss vs step,
test accuracy vs epoch), results.json (everything, with the configuration). The last line of stdout is one JSON
object: qn_test_acc, sgd_test_acc, qn_final_train_loss, sgd_final_train_loss (full training set at the end),
qn_over_sgd_step_time, the same for qn_damped, divergence steps, and the output paths. A diverged arm's
accuracies and losses are null.

How long it takes
    About 100 s per epoch with 2 workers on a (busy) 2-core machine, plus ~1 minute of Ray start-up and
    shut-down: 5 epochs took 9.5 minutes. A quasi-Newton step costs one forward and C+1 = 11 batched backward
    passes (measured ≈ 5.6× an SGD step); the undamped qn arm diverges within a few steps at η = 0.05, so the
    damped arm is usually the only quasi-Newton arm that keeps running. --steps-per-epoch N caps the steps of
    each epoch for a quick check.

How to run
    locally (starts a throwaway Ray cluster on this machine):
        python jobs/class_gradient_qn.py --epochs 5 --lr 0.05 --gamma 0.9 --workers 2 --out /tmp/cgqn
    on a running Ray cluster (the driver joins it; the data must exist on every worker node):
        export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265
        export RAY_AUTH_MODE=token   # token-auth clusters (the client sends ~/.ray/auth_token or RAY_AUTH_TOKEN)
        ray job submit --working-dir . -- python jobs/class_gradient_qn.py --epochs 5 --out /tmp/cgqn
    (--out is written by the driver; under `ray job submit` pass an absolute path.)

Bad input (lr ≤ 0, γ outside (0, 1), a missing data directory, ...) prints one line and exits 2 before anything
is started or written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

PROG = "class_gradient_qn"
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(argv):
    p = _Parser(prog=f"python jobs/{PROG}.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate η, the same for every arm (default 0.05)")
    p.add_argument("--gamma", type=float, default=0.9, help="EMA factor γ in (0, 1) (default 0.9, the paper's)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--out", default="runs/class_gradient_qn", help="output directory")
    p.add_argument("--data-root", default=DEFAULT_ROOT, help=f"Fashion-MNIST IDX files (default {DEFAULT_ROOT})")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seeds θ0 and the data order (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="coupled L2 decay for every arm (default 0)")
    p.add_argument("--mode", choices=["orthonormal", "paper"], default="orthonormal",
                   help="quasi-Newton variant (see raysub/cgqn.py; default orthonormal)")
    p.add_argument("--damping", type=float, default=0.0, help="damping of the qn arm (default 0, the paper's)")
    p.add_argument("--damped-arm", type=float, default=1.0,
                   help="damping δ of the extra qn_damped arm (default 1; 0 leaves the arm out)")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="cap on steps per epoch (0: all; quick checks)")
    return p.parse_args(argv)


def validate(args) -> List[str]:
    problems = []
    if not (math.isfinite(args.lr) and args.lr > 0):
        problems.append(f"--lr {args.lr:g} must be > 0")
    if not (0 < args.gamma < 1):
        problems.append(f"--gamma {args.gamma:g} must be in (0, 1)")
    if args.epochs < 1:
        problems.append(f"--epochs {args.epochs} must be ≥ 1")
    if args.workers < 1:
        problems.append(f"--workers {args.workers} must be ≥ 1")
    elif args.batch_size < 1 or args.batch_size % args.workers:
        problems.append(f"--batch-size {args.batch_size} must be a positive multiple of --workers {args.workers}")
    for flag, value in (("--weight-decay", args.weight_decay), ("--damping", args.damping),
                        ("--damped-arm", args.damped_arm)):
        if not (math.isfinite(value) and value >= 0):
            problems.append(f"{flag} {value:g} must be ≥ 0")
    if args.steps_per_epoch < 0:
        problems.append(f"--steps-per-epoch {args.steps_per_epoch} must be ≥ 0")
    if not os.path.isdir(args.data_root):
        problems.append(f"--data-root {args.data_root}: no such directory (apt-get install dataset-fashion-mnist, "
                        f"or point --data-root at the four Fashion-MNIST IDX files)")
    else:
        from raysub.data import FashionMNIST

        problems += [p.replace("set data.root=DIR", "pass --data-root DIR") for p in FashionMNIST.problems(args.data_root)]
    return problems


# ----------------------------------------------------------------------------------------- worker side


def _finite(v: float) -> bool:
    return v is not None and math.isfinite(v)


def worker_loop(config: Dict[str, Any]) -> None:
    """Per-worker loop (Ray Train): every arm steps on every global batch; rank 0 reports everything at the end."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from raysub import loop
    from raysub.cgqn import ClassGradientQN
    from raysub.data import load_dataset
    from raysub.models import build_model

    a = config["args"]
    progress = config.get("progress")
    loop.setup_threads()
    rank, world = loop.rank_world()
    device = ray.train.torch.get_device()
    data = load_dataset("fashion-mnist", a["data_root"])
    C = data.num_classes

    torch.manual_seed(a["seed"])
    theta0 = build_model("lenet5", C, data.input_shape).state_dict()
    arms = {"sgd": dict(mode="sgd"), "qn": dict(mode=a["mode"], damping=a["damping"])}
    if a["damped_arm"] > 0:
        arms["qn_damped"] = dict(mode=a["mode"], damping=a["damped_arm"])
    local = a["batch_size"] // world
    probe_x, _ = next(data.batches("train", [torch.arange(local)], augment=False, seed=0))
    models, opts = {}, {}
    for name, kw in arms.items():
        model = build_model("lenet5", C, data.input_shape)
        model.load_state_dict(theta0)
        model.to(device)
        models[name] = model
        opts[name] = ClassGradientQN(model, C, probe_x.to(device), lr=a["lr"], gamma=a["gamma"],
                                     weight_decay=a["weight_decay"], name="lenet5", **kw)

    names = list(arms)
    losses = {n: [] for n in names}
    times = {n: [] for n in names}
    diverged: Dict[str, Optional[int]] = {n: None for n in names}
    epochs: List[Dict[str, Any]] = []
    check_x, check_y = next(data.batches("train", [torch.arange(512)], augment=False, seed=0))

    def evaluate(name, split):
        if diverged[name] is not None:
            return {"loss": None, "acc": None}
        models[name].eval()
        res = loop.evaluate(models[name], data, split, 1024, device)
        models[name].train()
        return res if _finite(res["loss"]) else {"loss": None, "acc": res["acc"]}

    start_sgd = evaluate("sgd", "test")  # every arm starts from the same θ0
    start = {n: start_sgd for n in names}
    epochs.append({"epoch": 0, **{n: {"train_loss": None, "test_loss": start[n]["loss"],
                                      "test_acc": start[n]["acc"]} for n in names}})
    t_start = time.perf_counter()
    step = 0
    for epoch in range(a["epochs"]):
        lr = loop.lr_at(epoch, a["lr"], [], 0.1)  # constant: no milestones
        for opt in opts.values():
            opt.lr = lr
        batches = loop.epoch_batches(data.size("train"), a["batch_size"], a["seed"], epoch, rank, world)
        if a["steps_per_epoch"]:
            batches = batches[: a["steps_per_epoch"]]
        first = len(losses["sgd"])
        for x, y in data.batches("train", batches, augment=False, seed=a["seed"] * 100_003 + epoch):
            x, y = x.to(device), y.to(device)
            order = names[step % len(names):] + names[: step % len(names)]
            for name in order:
                if diverged[name] is not None:
                    continue
                t0 = time.perf_counter()
                loss = opts[name].step(x, y)
                times[name].append(time.perf_counter() - t0)
                losses[name].append(loss if math.isfinite(loss) else None)
                if not math.isfinite(loss):
                    diverged[name] = step + 1  # every rank sees the same global loss: they all stop together
            for name in names:
                if diverged[name] is not None and len(losses[name]) < step + 1:
                    losses[name].append(None)
            step += 1
        record: Dict[str, Any] = {"epoch": epoch + 1, "elapsed_s": time.perf_counter() - t_start}
        for name in names:
            ep = [v for v in losses[name][first:] if v is not None]
            test = evaluate(name, "test")
            rec = {"train_loss": sum(ep) / len(ep) if ep and diverged[name] is None else None,
                   "test_loss": test["loss"], "test_acc": test["acc"], "diverged_at_step": diverged[name]}
            if name != "sgd" and rank == 0 and diverged[name] is None:
                d = opts[name].diagnostics()
                chk = opts[name].curvature_check(check_x.to(device), check_y.to(device))
                rec.update(cos_abs_mean=d["cos_abs_mean"], cos_abs_max=d["cos_abs_max"], lambda_paper=chk["lambda"],
                           gn_curvature=chk["gn"], newton_directions=d.get("newton_directions"))
            record[name] = rec
        epochs.append(record)
        if rank == 0 and progress is not None:
            progress.put(record)

    final = {n: {"train": evaluate(n, "train"), "test": evaluate(n, "test")} for n in names}
    sync = {}
    for name in names:
        ref = opts[name].theta_N.clone()
        if world > 1:
            dist.broadcast(ref, 0)
        diff = (ref - opts[name].theta_N).abs().max().reshape(1).double()
        loop.all_reduce_sum_(diff)
        sync[name] = float(diff) if math.isfinite(float(diff)) else None
    metrics: Dict[str, Any] = {"done": True}
    if rank == 0:
        metrics.update(losses=losses, times=times, diverged=diverged, epochs=epochs, final=final,
                       num_params=opts["sgd"].N, steps=step, world=world, rank_param_max_diff=sync,
                       wall_s=time.perf_counter() - t_start)
    # Train V2 keeps only metrics that come with a checkpoint: rank 0 attaches the final θ of every arm.
    loop.report(metrics, {"theta": {n: opts[n].theta_N.clone() for n in names}} if rank == 0 else None)


# ----------------------------------------------------------------------------------------- driver side


def _fmt(v, pct=False):
    if v is None:
        return "—"
    return f"{100 * v:.2f}%" if pct else f"{v:.4f}"


def print_epoch(record: Dict[str, Any]) -> None:
    parts = []
    for name, rec in record.items():
        if not isinstance(rec, dict):
            continue
        if rec.get("diverged_at_step") is not None:
            parts.append(f"{name}: diverged at step {rec['diverged_at_step']}")
        else:
            parts.append(f"{name}: train {_fmt(rec['train_loss'])} test {_fmt(rec['test_loss'])} "
                         f"{_fmt(rec['test_acc'], pct=True)}")
    print(f"[{PROG}] epoch {record['epoch']} ({record['elapsed_s']:.0f} s) | " + " | ".join(parts), flush=True)


def smooth(values: List[Optional[float]], window: int) -> List[Optional[float]]:
    """Trailing moving average over the last ``window`` finite values (None stays None)."""
    out, buf = [], []
    for v in values:
        if v is None:
            out.append(None)
            continue
        buf.append(v)
        if len(buf) > window:
            buf.pop(0)
        out.append(sum(buf) / len(buf))
    return out


def plot(path: str, res: Dict[str, Any], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"sgd": "tab:blue", "qn": "tab:red", "qn_damped": "tab:orange"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    window = max(1, res["steps"] // (20 * max(1, args.epochs)))
    ymax = 2.5
    for name, series in res["losses"].items():
        xs = [i + 1 for i, v in enumerate(series) if v is not None]
        raw = [v for v in series if v is not None]
        sm = [v for v in smooth(series, window) if v is not None]
        label = name
        if res["diverged"][name] is not None:
            label += f" (diverged at step {res['diverged'][name]})"
        if raw:
            ax1.plot(xs, raw, color=colors.get(name), alpha=0.15, lw=0.6)
            ax1.plot(xs, sm, color=colors.get(name), lw=1.6, label=label)
        if res["diverged"][name] is not None:
            ax1.axvline(res["diverged"][name], color=colors.get(name), ls=":", lw=1.2)
            if not raw:
                ax1.plot([], [], color=colors.get(name), label=label)
    steps_per_epoch = res["steps"] / max(1, args.epochs)
    for e in range(1, args.epochs):
        ax1.axvline(e * steps_per_epoch, color="gray", lw=0.5, alpha=0.5)
    ax1.set_ylim(0, ymax)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"training loss (minibatch; line: mean of last {window})")
    ax1.grid(alpha=0.3)
    ax1.legend()
    for name in res["losses"]:
        pts = [(r["epoch"], r[name]["test_acc"]) for r in res["epochs"] if r[name]["test_acc"] is not None]
        if pts:
            ax2.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", color=colors.get(name), label=name)
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.suptitle(f"LeNet-5 on Fashion-MNIST: SGD vs class-gradient QN ({args.mode}), η={args.lr:g}, γ={args.gamma:g}, "
                 f"batch {args.batch_size}, {res['world']} workers")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def summarize(res: Dict[str, Any], args, out: str) -> Dict[str, Any]:
    names = list(res["losses"])
    med = {n: statistics.median(res["times"][n]) if res["times"][n] else None for n in names}
    summary: Dict[str, Any] = {}
    for name in names:
        fin = res["final"][name]
        last = [r[name]["train_loss"] for r in res["epochs"][1:]]
        summary.update({
            f"{name}_test_acc": fin["test"]["acc"] if res["diverged"][name] is None else None,
            f"{name}_test_loss": fin["test"]["loss"],
            f"{name}_final_train_loss": fin["train"]["loss"],
            f"{name}_final_train_acc": fin["train"]["acc"] if res["diverged"][name] is None else None,
            f"{name}_last_epoch_step_loss": last[-1] if last else None,
            f"{name}_diverged_at_step": res["diverged"][name],
            f"{name}_step_ms": 1000 * med[name] if med[name] else None,
        })
    # The step-cost ratio needs enough steps: a QN arm that diverged early has too few, so take the other QN arm
    # (the same computation) when it ran longer.
    ratio_arm = "qn"
    if len(res["times"]["qn"]) < 20 and "qn_damped" in res["times"] \
            and len(res["times"]["qn_damped"]) > len(res["times"]["qn"]):
        ratio_arm = "qn_damped"
    for name in names[1:]:
        summary[f"{name}_over_sgd_step_time"] = med[name] / med["sgd"] if med[name] and med["sgd"] else None
    summary["qn_over_sgd_step_time"] = summary[f"{ratio_arm}_over_sgd_step_time"]
    summary["step_time_ratio_from"] = ratio_arm
    summary.update(steps=res["steps"], epochs=args.epochs, lr=args.lr, gamma=args.gamma, mode=args.mode,
                   damping=args.damping, damped_arm=args.damped_arm if "qn_damped" in names else None,
                   workers=res["world"], num_params=res["num_params"], wall_s=round(res["wall_s"], 1),
                   rank_param_max_diff=res["rank_param_max_diff"],
                   plot=os.path.join(out, "curves.png"), results=os.path.join(out, "results.json"))
    return summary


def write_outputs(out: str, res: Dict[str, Any], summary: Dict[str, Any], args) -> None:
    import csv

    os.makedirs(out, exist_ok=True)
    names = list(res["losses"])
    steps_per_epoch = res["steps"] // max(1, args.epochs)
    with open(os.path.join(out, "train_loss.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", *names, *[f"{n}_ms" for n in names]])
        for i in range(res["steps"]):
            row = [i + 1, i // steps_per_epoch + 1 if steps_per_epoch else 1]
            row += ["" if res["losses"][n][i] is None else f"{res['losses'][n][i]:.6f}" for n in names]
            row += [f"{1000 * res['times'][n][i]:.3f}" if i < len(res["times"][n]) else "" for n in names]
            w.writerow(row)
    with open(os.path.join(out, "epochs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "arm", "train_loss", "test_loss", "test_acc"])
        for r in res["epochs"]:
            for n in names:
                w.writerow([r["epoch"], n, *["" if r[n].get(k) is None else r[n][k]
                                             for k in ("train_loss", "test_loss", "test_acc")]])
    plot(os.path.join(out, "curves.png"), res, args)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"summary": summary, "config": vars(args), "epochs": res["epochs"], "final": res["final"],
                   "diverged": res["diverged"], "losses": res["losses"],
                   "step_times_s": res["times"]}, f, indent=1)


def main(argv=None) -> int:
    from _launch import job_server_address, on_cluster, use_repo_raysub

    use_repo_raysub()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problems = validate(args)
    if job_server_address():
        problems.append(f"RAY_ADDRESS={job_server_address()} is a job-server address: submit with `ray job submit "
                        f"--working-dir . -- python jobs/{PROG}.py ...` or unset RAY_ADDRESS to run here")
    if problems:
        print(f"{PROG}: error: " + "; ".join(problems), file=sys.stderr, flush=True)
        return 2

    from raysub.cluster import ensure_ray, fit_with_progress, make_progress_queue, torch_trainer, unwrap_train_error
    from raysub.config import Config
    from raysub.errors import ConfigError

    out = os.path.abspath(os.path.expanduser(args.out))
    cfg = Config.from_dict({"seed": args.seed,
                            "data": {"name": "fashion-mnist", "root": args.data_root, "batch_size": args.batch_size},
                            "model": {"name": "lenet5"},
                            "cluster": {"num_workers": args.workers, "cpus_per_worker": 1.0,
                                        "address": "auto" if on_cluster() else None}})
    storage = tempfile.mkdtemp(prefix="raysub-cgqn-")
    try:
        ensure_ray(cfg)
        progress = make_progress_queue()
        loop_config = {"args": {k: getattr(args, k) for k in ("epochs", "lr", "gamma", "data_root", "batch_size",
                                                             "seed", "weight_decay", "mode", "damping", "damped_arm",
                                                             "steps_per_epoch")},
                       "progress": progress}
        trainer = torch_trainer(worker_loop, loop_config, cfg, PROG, storage)
        print(f"[{PROG}] {args.workers} workers, {args.epochs} epochs, lr {args.lr:g}, gamma {args.gamma:g}, "
              f"mode {args.mode}, damping {args.damping:g}"
              + (f", damped arm δ={args.damped_arm:g}" if args.damped_arm > 0 else ""), flush=True)
        try:
            result = fit_with_progress(trainer, progress, print_epoch)
        except Exception as exc:
            err = unwrap_train_error(exc)
            if isinstance(err, ConfigError):
                print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
                return 2
            raise
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    res = result.metrics
    summary = summarize(res, args, out)
    write_outputs(out, res, summary, args)
    print(f"[{PROG}] wrote {out}/{{train_loss.csv,epochs.csv,curves.png,results.json}}", flush=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
