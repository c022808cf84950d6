"""ViT UV fine-tuning (SL2O §4.3's shape of result): Momentum†, Adam† and the learned optimizer on U, V and the head,
against full fine-tuning; and where a UV step's time goes.

What it measures
    The transfer task of the shipped configs: a ViT trained on Fashion-MNIST classes 0–4 (``vit_fashion_mnist_base``,
    full-parameter AdamW, 'raysub sample'; or --base RUN) is adapted to classes 5–9 (``vit_fashion_mnist_uv``: its
    weights are W0, each attention projection gets W0 + U V at rank r = 16, and only U, V and the head train, through
    the identity projection: d = every trainable parameter).
      1. the learned optimizer φ is meta-trained on UV optimizees of this task ('raysub l2o meta-train': Ray actors,
         unrolls of T steps, φ selected on the validation split);
      2. meta-test (`raysub.l2o.metatest.meta_test`, one process): Momentum† and Adam† get their lr picked from a grid
         by validation accuracy after N steps (--val-seeds optimizees, never test); then φ and both run H·N steps on
         --seeds new optimizees (data orders) each;
      3. the reference, full fine-tuning: every parameter of the ViT (no U, V) from the same W0 with momentum SGD
         (psgd on the identity projection: θ = θ0 + z over all N), its lr picked the same way, the same optimizees;
      4. per optimizer: SL2O §4.1's convergence step and the test accuracy after H·N steps, mean ± std over seeds;
      5. step time, UV vs full fine-tuning, one thread, alternating rounds: forward (the merged W0 + U V included),
         backward, optimizer (projection, psgd's update, θ written), median over steps; and the cost of forming
         every W0 + U V alone (inside the UV forward).
    Figures (last line, one JSON object): trainable_fraction (UV-trainable ÷ all parameters of the ViT), uv_acc_gap_pts
    (full fine-tuning − UV Momentum† test accuracy, points; goal ≤ 1.0), l2o_over_momentum_steps_vit (convergence steps,
    φ ÷ Momentum†; SL2O's ViT-B/16: 0.81; goal ≤ 0.7), uv_step_over_full_step, the time breakdown and the load.

Outputs under --out: base/ (the base run), l2o/ (meta-training run: φ, its history and plots), vit_uv.json (everything),
loss_curves.png (smoothed training loss per optimizer), vit_uv.md (the table).

How long it takes (2 CPU cores, load ≈ 1, measured): base 1.5 min, meta-training 3.4 min, meta-test and full
fine-tuning 6.3 min at the defaults (N = 100, H = 3, 3 seeds, 2 validation seeds, 4-point grids): 11.5 min, 10 with
--base. --quick runs the same code on digits with a tiny ViT in about a minute (a smoke test, not a result).

    python jobs/bench/vit_uv.py                              # the figures of the closing note
    python jobs/bench/vit_uv.py --base runs/vit_fashion_mnist_base --out runs/bench_vit_uv
    python jobs/bench/vit_uv.py --quick --out /tmp/vit_uv_quick
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List

from raysub.bench.harness import print_figures
from raysub.runs.manifest import Manifest
from raysub.report.tables import meta_test_table
from raysub.config import load_config
from raysub.cli import resolve_config
from raysub.errors import RaysubError

GRIDS = {"psgd": [0.01, 0.03, 0.1, 0.3], "adam": [3e-4, 1e-3, 3e-3, 1e-2]}
FULL_GRID = [0.01, 0.03, 0.1, 0.3]
QUICK_BASE = ["data.name=digits", "data.root=null", "data.classes=[0,1,2,3,4]", "data.batch_size=32",
              "model.options={patch: null, dim: 32, depth: 2, heads: 2}", "sgd.lr=0.01", "sgd.epochs=6",
              "sgd.lr_milestones=[]",
              "sample.epochs=1", "sample.snapshots_per_epoch=4", "basis.dim=2"]
QUICK_UV = ["data.name=digits", "data.root=null", "data.classes=[5,6,7,8,9]", "data.batch_size=32",
            "data.val_fraction=0.2", "model.options={patch: null, dim: 32, depth: 2, heads: 2}", "model.uv.rank=4",
            "train.batch_size=32", "l2o.meta_steps=6", "l2o.validate_every=3", "l2o.unroll=5", "l2o.steps=20"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_vit_uv", help="output directory")
    p.add_argument("--base", default=None,
                   help="a finished base run (default: train vit_fashion_mnist_base in OUT/base)")
    p.add_argument("--steps", type=int, default=100, help="N: lr picks after N steps (and meta-training's horizon)")
    p.add_argument("--horizon", type=int, default=3, help="H: meta-test runs are H·N steps")
    p.add_argument("--seeds", type=int, default=3, help="meta-test optimizees (≥ 3 for mean ± std)")
    p.add_argument("--val-seeds", type=int, default=2, help="validation optimizees of the lr picks")
    p.add_argument("--meta-steps", type=int, default=None, help="meta-training φ updates (default: the config's)")
    p.add_argument("--timing-steps", type=int, default=20, help="steps per timing round (3 rounds per variant)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the one-process parts")
    p.add_argument("--quick", action="store_true", help="digits, a tiny ViT, short runs: a smoke test")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# step time

def time_steps(task, steps: int, batch) -> Dict[str, List[float]]:
    """Per step of psgd on ``task`` (lr 0: θ stays, the arithmetic is the same): forward (the loss included),
    backward, optimizer (projection, the update, θ written). Seconds per step."""
    # heavy: torch loads here, not when this module is imported
    import torch
    import torch.nn.functional as F

    # heavy: torch loads here, not when this module is imported
    from raysub.optim import build_optimizer

    cfg = task.cfg
    sub = task.sub
    z = task.new_z()
    opt = build_optimizer("psgd", z, cfg.train)
    opt.set_lr(0.0)
    x, y = batch
    out = {"forward": [], "backward": [], "optimizer": []}
    sub.model.train()
    sub.set_z(z)
    for _ in range(steps):
        t0 = time.perf_counter()
        sub.flat.zero_grad()
        loss = F.cross_entropy(sub.forward(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        with torch.no_grad():
            g = sub.projection.project(sub.flat.grad_N)
            opt.step(z, g, loss.detach(), None)
            sub.set_z(z)
        t3 = time.perf_counter()
        out["forward"].append(t1 - t0)
        out["backward"].append(t2 - t1)
        out["optimizer"].append(t3 - t2)
    return out


def step_breakdown(tasks: Dict[str, Any], batch, steps: int, rounds: int = 3) -> Dict[str, Dict[str, float]]:
    """Median ms per phase of each task's step, the tasks timed in alternating rounds after a warm-up."""
    for task in tasks.values():
        time_steps(task, 3, batch)
    samples = {name: {"forward": [], "backward": [], "optimizer": []} for name in tasks}
    for _ in range(rounds):
        for name, task in tasks.items():
            for k, v in time_steps(task, steps, batch).items():
                samples[name][k] += v
    out = {}
    for name, s in samples.items():
        med = {k: 1000 * statistics.median(v) for k, v in s.items()}
        med["step"] = sum(med.values())
        out[name] = med
    return out


def merge_ms(model, repeats: int = 50) -> float:
    """ms to form every W0 + U V of ``model`` once (the part of a UV forward that full fine-tuning does not do)."""
    # heavy: torch loads here, not when this module is imported
    import torch

    # heavy: torch loads here, not when this module is imported
    from raysub.models.lowrank import LowRankLinear

    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    with torch.no_grad():
        for m in layers:
            m.merged_weight()
        t0 = time.perf_counter()
        for _ in range(repeats):
            for m in layers:
                m.merged_weight()
    return 1000 * (time.perf_counter() - t0) / repeats


# ---------------------------------------------------------------------------------------------------------
# the figures

def figures(record: Dict[str, Any], timing: Dict[str, Dict[str, float]], counts: Dict[str, int]) -> Dict[str, Any]:
    """The closing note's figures from a record (`run` builds it): pure arithmetic, unit-tested."""
    opt = record["optimizers"]
    mom, full, l2o = opt["psgd"]["summary"], opt["full"]["summary"], opt["l2o"]["summary"]
    return {
        "trainable_fraction": counts["uv_trainable"] / counts["vit_params"],
        "uv_trainable": counts["uv_trainable"], "vit_params": counts["vit_params"],
        "uv_acc_gap_pts": 100 * (full["test_acc"]["mean"] - mom["test_acc"]["mean"]),
        "l2o_over_momentum_steps_vit": l2o["convergence_step"]["mean"] / mom["convergence_step"]["mean"],
        "l2o_over_momentum_steps_censored": bool(l2o["not_converged"] or mom["not_converged"]),
        # context: how much of it an adaptive step alone gives (φ starts as Adam; Adam† is tuned on validation)
        "l2o_over_adam_steps_vit": l2o["convergence_step"]["mean"] / opt["adam"]["summary"]["convergence_step"]["mean"],
        "uv_step_over_full_step": timing["uv"]["step"] / timing["full"]["step"],
        "uv_step_ms": {k: round(v, 3) for k, v in timing["uv"].items()},
        "full_step_ms": {k: round(v, 3) for k, v in timing["full"].items()},
        **{f"test_acc_{k}": {m: round(100 * v, 3) for m, v in o["summary"]["test_acc"].items()}
           for k, o in opt.items()},
        **{f"conv_step_{k}": {m: round(v, 2) for m, v in o["summary"]["convergence_step"].items()}
           for k, o in opt.items()},
        "lrs": {k: o["lr"] for k, o in opt.items() if o["lr"] is not None},
        "seeds": len(record["seeds"]),
    }


def table(record: Dict[str, Any], counts: Dict[str, int], timing: Dict[str, Dict[str, float]]) -> str:

    lines = [meta_test_table(record), "",
             f"trainable: UV {counts['uv_trainable']:,} (U, V at r = {counts['rank']} on {counts['layers']} layers, "
             f"and "
             f"the head) of the ViT's {counts['vit_params']:,}; full fine-tuning trains all {counts['vit_params']:,}",
             "step time (ms, median, 1 thread): " + "; ".join(
                 f"{name} forward {t['forward']:.2f}" + (f" (W0 + U V: {t['merge_in_forward']:.2f})"
                                                         if "merge_in_forward" in t else "")
                 + f", backward {t['backward']:.2f}, optimizer {t['optimizer']:.2f}, step {t['step']:.2f}"
                 for name, t in timing.items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------

def run(args) -> Dict[str, Any]:
    # heavy: torch loads here, not when this module is imported
    import torch

    # heavy: torch, pyarrow load here, not when this module is imported
    from raysub import pipeline
    from raysub.data import open_dataset
    from raysub.engine.task import build_task
    from raysub.l2o.meta_train import meta_train
    from raysub.l2o.metatest import meta_test, pick_lr, run_optimizee
    from raysub.l2o.seeds import VALIDATION_SERIAL, optimizee_seed
    from raysub.metrics import summarize
    from raysub.report.plots import plot_meta_test
    from raysub.storage import RunDir, join_uri

    out = RunDir(args.out)
    out.makedirs()
    def say(line):
        print(line, flush=True)
    t_start = time.perf_counter()
    load = os.getloadavg()

    base_uri = args.base
    if base_uri is None:  # the base ViT: full-parameter AdamW with 'raysub sample' on Ray Train
        base_cfg = load_config(_shipped("vit_fashion_mnist_base"),
                               (QUICK_BASE if args.quick else []) + [f"run_dir={join_uri(out.uri, 'base')}"])
        pipeline.stage_sample(base_cfg, resume=True, say=say)
        base_uri = base_cfg.run_dir
    base_acc = Manifest.read(RunDir(base_uri)).summary["results"]["sgd"]["test_acc"]

    # one process for the meta-test; meta-training's actors are the l2o section's (l2o.actors)
    over = (QUICK_UV if args.quick else [f"l2o.steps={args.steps}"]) + [
        f"train.init_from={base_uri}", f"run_dir={join_uri(out.uri, 'l2o')}", "cluster.num_workers=1"]
    if args.meta_steps:
        over.append(f"l2o.meta_steps={args.meta_steps}")
    cfg = load_config(_shipped("vit_fashion_mnist_uv"), over)
    steps = cfg.l2o.steps
    t0 = time.perf_counter()
    meta_train(cfg, resume=True, say=say)  # φ on UV optimizees of this task, selected on validation
    meta_s = time.perf_counter() - t0

    torch.set_num_threads(args.threads)
    grids = {k: v for k, v in GRIDS.items()}
    t0 = time.perf_counter()
    record = meta_test(cfg, cfg.run_dir, steps, horizons=(1, args.horizon), seeds=args.seeds, val_seeds=args.val_seeds,
                       grids=grids, say=say)

    # the reference: full fine-tuning of every ViT parameter from the same W0, the same optimizees
    full_cfg = load_config(_shipped("vit_fashion_mnist_uv"), over + ["model.uv.rank=null", "train.optimizer=psgd",
                                                                     f"run_dir={join_uri(out.uri, 'full')}"])
    full_task = build_task(full_cfg, data=open_dataset(full_cfg))  # no θ0 there: W0 from train.init_from
    val_list = [optimizee_seed(cfg, VALIDATION_SERIAL + j) for j in range(args.val_seeds)]
    total = args.horizon * steps
    pick = pick_lr(FULL_GRID, lambda lr, seed: run_optimizee(full_cfg, full_task, "psgd", lr, {}, seed, 0.0, steps,
                                                             splits=("val",)), val_list)
    say(f"lr pick full fine-tuning (val acc after N={steps}): "
        + "  ".join(f"{r['lr']:g}: {100 * r['val_acc']:.2f}%" for r in pick["rows"]) + f"  → lr {pick['lr']:g}")
    runs = []
    for seed in record["seeds"]:
        r = run_optimizee(full_cfg, full_task, "psgd", pick["lr"], {}, seed, 0.0, total,
                          eval_at=[steps, total])
        r.pop("z")
        runs.append(r)
        say(f"Full FT seed {seed}: test acc {100 * r['test_acc']:.2f}%  conv step {r['convergence_step']}  "
            f"{r['wall_s']:.1f}s")
    record["optimizers"]["full"] = {"label": "Full FT (momentum)", "lr": pick["lr"], "runs": runs,
                                    "summary": summarize(runs), "lr_selection": pick}
    test_s = time.perf_counter() - t0

    uv_task = build_task(cfg, run=RunDir(cfg.run_dir), data=open_dataset(cfg))
    x, y = next(uv_task.data.batches("train", [torch.arange(cfg.train.batch_size)], augment=False, seed=0))
    timing = step_breakdown({"uv": uv_task, "full": full_task}, (x, y), args.timing_steps)
    timing["uv"]["merge_in_forward"] = merge_ms(uv_task.model)  # inside uv's forward: not added to its step again
    counts = {"uv_trainable": uv_task.dim, "vit_params": full_task.dim, "rank": cfg.model.uv.rank,
              "layers": sum(1 for k in uv_task.model.state_dict() if k.endswith(".U"))}
    fig = figures(record, timing, counts)
    fig.update({"base_test_acc": base_acc, "meta_train_s": round(meta_s, 1), "meta_test_s": round(test_s, 1),
                "total_s": round(time.perf_counter() - t_start, 1), "steps_n": steps, "horizon": args.horizon,
                "loadavg_start": [round(v, 2) for v in load], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
                "quick": bool(args.quick)})
    text = table(record, counts, timing)
    say(text)
    record["figures"], record["timing"], record["counts"] = fig, timing, counts
    out.write_json("vit_uv.json", record)
    out.write_text("vit_uv.md", "```\n" + text + "\n```\n")
    plot_meta_test(out, record)
    return fig


def _shipped(name: str) -> str:

    return resolve_config(name)


def main(argv=None) -> int:

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        fig = run(args)
    except RaysubError as exc:
        print(f"vit_uv: error: {exc}", file=sys.stderr)
        return 2
    print_figures(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
