"""Benchmark: meta-testing of the learned optimizer φ against Momentum†, Adam† and SGD† tuned for the run's length.

What it measures
    The meta-test protocol of jobs/l2o_meta_test.py (raysub/l2o/metatest.py) at the issue's setting:
    Fashion-MNIST LeNet-5 in its DLDR basis (``--basis-run``, d = 40, ``data.val_fraction=0.1`` as the basis and
    meta-training runs), batch 128. Each baseline (Momentum† = psgd with momentum 0.9, Adam†, SGD†) gets the lr
    and schedule (constant, cosine or step over the run) with the best mean validation accuracy at the end of
    runs of max(h)·N steps (default 10N) on the meta-validation optimizees; then φ and the tuned baselines run
    max(h)·N steps on ``--seeds`` new optimizees (new data-order seeds and z0's, the same for all). From those:
      l2o_speedup_over_momentum[_2n, _5n, _10n], l2o_speedup_over_adam[...]
                                     VeLO: steps the tuned baseline needs to reach φ's smoothed training loss
                                     (trailing mean of 20) at h·N, ÷ h·N, per optimizee then mean (issue 27's goals:
                                     Momentum† ≥ 2 at N and ≥ 1.2 at 5N; Adam† ≥ 1.5 at N, ≥ 1 at 5N and 10N);
                                     ``_lower_bound`` when the baseline never got there in its run;
      l2o_eval_speedup_over_momentum[...], l2o_eval_speedup_over_adam[...]
                                     the same on each run's evaluated curve (the loss of z on 2,048 fixed
                                     training samples every 10 steps, interpolated between evaluations): no
                                     minibatch noise, so a plateau both reach reads ≈ 1, not the noise of
                                     a 20-step mean;
      acc_gap_best_10n_pts           the best tuned baseline's mean test accuracy after the full run minus φ's,
                                     in points (goal ≤ 0.3); test_acc_end: every optimizer's;
      l2o_over_momentum_steps        mean convergence step (SL2O §4.1, over the full run) of φ ÷ Momentum†'s.
    An adam_schedule φ multiplies Adam's step at the lr it was meta-trained with (``--adam-lr weights``), and on a
    transfer task at plain Adam's best constant lr there (``--transfer-adam-lr constant``: φ brings the schedule;
    ``run``: the lr of Adam†'s (lr, schedule) pick; or a number).
    Transfer without re-meta-training (``--transfer mlp``, ``--transfer vit_uv``, after the main meta-test): the
    same φ and protocol on the Fashion-MNIST MLP in its own DLDR basis (``--mlp-basis-run``; runs of max(h)·N) and
    on ViT UV fine-tuning (``vit_fashion_mnist_uv`` from the base ViT ``--vit-base``, d = 33,093; runs of 5N, the
    grids of jobs/bench/vit_uv.py: Momentum† 0.01–0.3, Adam† 3e-4–1e-2), each with its own tuned baselines;
    keys transfer_<task>_<metric> (speedups over Adam† and Momentum†, both kinds; l2o_over_adam_steps, the
    convergence step ÷ Adam†'s; acc_gap_best_pts), records under OUT/transfer_<task>/.
    φ: ``--weights`` (a meta-training run directory or weights.pt; the run its manifest names gives N = l2o.steps,
    z0's σ and the optimizee seeds; weights no run records need --steps), else the hand-built Adam-like φ (a smoke
    test of the protocol, not a learned optimizer).

How long it takes
    Runs of 10N = 1,000 steps: the picks are (Σ grid sizes) × schedules × val-seeds runs (3 baselines × 4 lrs ×
    3 schedules × 2 = 72), the meta-test (1 + baselines) × seeds (12); a 1,000-step LeNet-5 run takes ~20 s on one
    core of this machine, so ~28 min with --procs 1 and about half with --procs 2 (forked processes of one thread;
    the record is the same).

How to run
    locally:       python jobs/bench/l2o_meta_test.py [--basis-run runs/fashion_mnist_lenet] [--weights RUN]
                   [--steps N] [--horizons 1,2,5,10] [--baselines psgd,adam,sgd] [--schedules constant,cosine,step]
                   [--seeds 3] [--procs 2] [--adam-lr weights|constant|run|LR] [--transfer mlp] [--transfer vit_uv]
                   [--mlp-basis-run runs/fashion_mnist_mlp] [--vit-base runs/vit_fashion_mnist_base]
                   [--transfer-adam-lr constant|run|weights|LR] [--transfer-horizons H,...]
                   [--transfer-set key=value ...] [--out DIR]
                   [key=value ...]
    on a cluster:  ray job submit --working-dir . -- python jobs/bench/l2o_meta_test.py --basis-run /shared/fm_lenet
                   (single process, no Ray needed: it runs where the driver lands; the basis run must be there.)

Output: the load average, progress lines, the table, and as the last line of stdout one JSON object
{l2o_speedup_over_momentum[_2n, _5n, _10n], l2o_speedup_over_adam[_2n, _5n, _10n], acc_gap_best_10n_pts,
test_acc_end, l2o_over_momentum_steps, acc_gap_pts, seeds, the lower-bound flags, lrs, schedules, steps,
wall_s, ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from raysub.cli import resolve_config
from raysub.config import load_config
from raysub.errors import ConfigError, RaysubError
from raysub.report.tables import meta_test_table

TASK = ["train.projection=dldr", "train.dim=40", "train.batch_size=128", "data.val_fraction=0.1"]
# transfer without re-meta-training (issue 27): the same φ on other tasks, each with its own tuned baselines
TRANSFERS = ("mlp", "vit_uv")
VIT_GRIDS = {"psgd": [0.01, 0.03, 0.1, 0.3], "adam": [3e-4, 1e-3, 3e-3, 1e-2]}  # jobs/bench/vit_uv.py's
TRANSFER_KEYS = ("l2o_speedup_over_adam", "l2o_eval_speedup_over_adam", "l2o_speedup_over_momentum",
                 "l2o_eval_speedup_over_momentum", "l2o_over_adam_steps", "l2o_over_momentum_steps")


def transfer_task(name: str, args, l2o_overrides):
    """(config, overrides, grids) of a transfer meta-test: the Fashion-MNIST MLP in its own DLDR basis, or the
    ViT UV fine-tuning task of ``vit_fashion_mnist_uv`` from the base ViT ``--vit-base``."""
    from raysub.l2o.metatest import DEFAULT_GRIDS  # local: imports torch

    if name == "mlp":
        return ("fashion_mnist_lenet", [*TASK, "model.name=mlp", f"train.basis_run={args.mlp_basis_run}",
                                        *l2o_overrides], {b: DEFAULT_GRIDS[b] for b in args.baselines.split(",") if b})
    return ("vit_fashion_mnist_uv", [f"train.init_from={args.vit_base}", "cluster.num_workers=1", *l2o_overrides],
            dict(VIT_GRIDS))


def transfer_figures(name: str, record) -> dict:
    """The last line's keys of one transfer meta-test: transfer_<name>_<metric>."""
    m = record["metrics"]
    out = {f"transfer_{name}_{k}": v for k, v in m.items()
           if any(k == key or k.startswith(key + "_") for key in TRANSFER_KEYS)}
    top = max(record["horizons"])
    out[f"transfer_{name}_acc_gap_best_pts"] = m[f"acc_gap_best_{top}n_pts"]
    out[f"transfer_{name}_horizons"] = record["horizons"]
    out[f"transfer_{name}_lrs"] = {n: [s["lr"], s["schedule"]] for n, s in record["lr_selection"].items()}
    out[f"transfer_{name}_l2o_adam_lr"] = record["l2o_adam_lr"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--basis-run", default="runs/fashion_mnist_lenet",
                        help="the DLDR run (LeNet-5 FMNIST, d ≥ 40): raysub run fashion_mnist_lenet data.val_fraction=0.1")
    parser.add_argument("--config", default="fashion_mnist_lenet")
    parser.add_argument("--weights", help="φ: meta-training run dir or weights.pt (default: hand-built Adam-like)")
    parser.add_argument("--steps", type=int, help="N (default: the meta-training run's l2o.steps; required for "
                                                     "weights no run records, and for the hand-built φ: 100)")
    parser.add_argument("--horizons", default="1,2,5,10", help="multiples of N; runs are max·N steps")
    parser.add_argument("--baselines", default="psgd,adam,sgd", help="tuned baselines (psgd = Momentum†)")
    parser.add_argument("--schedules", default="constant,cosine,step",
                        help="lr schedules each baseline's pick tries, over the run's length")
    parser.add_argument("--adam-lr", default="weights", metavar="weights|constant|run|LR",
                        help="adam_schedule φ: the Adam lr its multiplier applies to (default: φ's own)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--val-seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--procs", type=int, default=1, help="runs at once in forked processes (1 thread each)")
    parser.add_argument("--out", help="where meta_test.json and loss_curves.png go (default: a temporary dir)")
    parser.add_argument("--transfer", action="append", default=[], choices=TRANSFERS,
                        help="after the main meta-test, the same φ on another task (repeatable): mlp (the MLP in "
                             "its own DLDR basis, --mlp-basis-run), vit_uv (ViT UV fine-tuning, --vit-base)")
    parser.add_argument("--transfer-adam-lr", default="constant", metavar="constant|run|weights|LR",
                        help="the same for the transfer tasks (default constant: plain Adam's best constant lr on "
                             "that task, as φ's own is on its task)")
    parser.add_argument("--transfer-set", action="append", default=[], metavar="key=value",
                        help="an override of every transfer task's config (repeatable), e.g. data.root=DIR")
    parser.add_argument("--transfer-horizons", help="the transfer meta-tests' multiples of N (default: --horizons "
                                                   "for mlp; those ≤ 5 for vit_uv, whose steps cost ~3× LeNet-5's)")
    parser.add_argument("--mlp-basis-run", default="runs/fashion_mnist_mlp",
                        help="the MLP's DLDR run: raysub run fashion_mnist_lenet model.name=mlp "
                             "run_dir=runs/fashion_mnist_mlp data.val_fraction=0.1")
    parser.add_argument("--vit-base", default="runs/vit_fashion_mnist_base",
                        help="the base ViT: raysub sample vit_fashion_mnist_base")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)

    # heavy: torch loads here, not when this module is imported
    import torch

    # heavy: torch, pyarrow load here, not when this module is imported
    from raysub.l2o import metatest
    from raysub.l2o.lstm import adam_like_params
    from raysub.l2o.setup import opt_config
    from raysub.l2o.weights import save_learned_optimizer
    from raysub.report.plots import plot_meta_test
    from raysub.pipeline.plan import check_train_projection, plan
    from raysub.storage import RunDir, join_uri, strict_json

    torch.set_num_threads(args.threads)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    print(f"machine load average (1 min) {load0:.2f} on {os.cpu_count()} CPUs; torch threads {args.threads}",
          flush=True)
    out = RunDir(args.out or tempfile.mkdtemp(prefix="raysub-l2o-meta-test-"))
    trained = metatest.meta_training_config(args.weights) if args.weights else None
    l2o = []  # the optimizees as meta-training drew them
    if trained is not None:
        l2o = [f"l2o.seed={trained.l2o.seed}", f"l2o.z0_std={trained.l2o.z0_std}",
               f"l2o.validation_optimizees={trained.l2o.validation_optimizees}"]
        print(f"φ's meta-training run {metatest.meta_training_run(args.weights)}: N = l2o.steps = "
              f"{trained.l2o.steps}, optimizee seeds from l2o.seed {trained.l2o.seed}, z0 std {trained.l2o.z0_std:g}",
              flush=True)
    elif args.weights and args.steps is None:  # never a protocol other than φ's without a word
        print(f"l2o_meta_test bench: error: --weights {args.weights}: no meta-training run records these weights "
              f"(its config.yaml gives N and the optimizee seeds): give the run directory, or --steps N and "
              f"l2o.seed=S l2o.z0_std=σ as φ was meta-trained", file=sys.stderr, flush=True)
        return 2
    elif args.weights:
        print(f"warning: --weights {args.weights}: no meta-training run records these weights: N = --steps "
              f"{args.steps}; optimizee seeds and z0 from this config's l2o section", flush=True)
    steps = args.steps or (trained.l2o.steps if trained is not None else 100)
    schedules = [x for x in args.schedules.split(",") if x]
    try:
        horizons = [int(h) for h in args.horizons.split(",") if h]
        cfg = load_config(resolve_config(args.config), [*TASK, f"train.basis_run={args.basis_run}",
                                                         f"run_dir={out.uri}", *l2o, *args.overrides])
        if args.weights:  # verified before anything is written
            # heavy: torch, pyarrow load here, not when this module is imported
            from raysub.l2o.weights import weights_problems

            problems = [f"--weights: {p}" for p in weights_problems(args.weights)]
            if problems:
                raise ConfigError(problems)
        t_cfgs = {}
        for name in dict.fromkeys(args.transfer):  # every transfer task's problems before the first run
            t_config, t_over, t_grids = transfer_task(name, args, l2o)
            t_cfg = load_config(resolve_config(t_config), [*t_over, *args.transfer_set,
                                                            f"run_dir={join_uri(out.uri, 'transfer_' + name)}"])
            # a missing basis or base run: one line, before anything runs (as meta_test checks its own)
            check_train_projection(t_cfg, plan(t_cfg)["num_params"], RunDir(t_cfg.run_dir), own_basis=False)
            t_horizons = ([int(h) for h in args.transfer_horizons.split(",") if h] if args.transfer_horizons
                          else horizons if name == "mlp" else [h for h in horizons if h <= 5] or horizons[:1])
            metatest.check_meta_test(t_cfg, args.weights, steps, t_horizons, args.seeds,
                                     args.val_seeds if args.val_seeds is not None
                                     else t_cfg.l2o.validation_optimizees, t_grids, schedules,
                                     metatest.adam_lr_arg(args.transfer_adam_lr))
            t_cfgs[name] = (t_cfg, t_grids, t_horizons)
        out.makedirs()
        weights = args.weights
        if weights is None:
            config = opt_config(cfg)
            weights = out.path("adam_like_weights.pt")
            save_learned_optimizer(weights, config, adam_like_params(config))
            print("warning: no --weights: the hand-built Adam-like φ (not meta-trained)", flush=True)
        grids = {b: metatest.DEFAULT_GRIDS[b] for b in args.baselines.split(",") if b}
        record = metatest.meta_test(cfg, weights, steps, horizons, args.seeds, args.val_seeds, grids=grids,
                                    say=lambda s: print(s, flush=True), schedules=schedules,
                                    processes=args.procs, phi_adam_lr=metatest.adam_lr_arg(args.adam_lr))
        record["trained_on"] = metatest.trained_on(args.weights) if args.weights else "adam_like (hand-built)"
        out.write_json("meta_test.json", record)
        plot_meta_test(out, record)
        print(meta_test_table(record), flush=True)
        transfers = {}
        for name, (t_cfg, t_grids, t_horizons) in t_cfgs.items():
            print(f"transfer {name}: the same φ, without re-meta-training, N = {steps}, horizons {t_horizons}",
                  flush=True)
            t_out = RunDir(t_cfg.run_dir)
            rec = metatest.meta_test(t_cfg, weights, steps, t_horizons, args.seeds, args.val_seeds, grids=t_grids,
                                     say=lambda s: print(s, flush=True), schedules=schedules, processes=args.procs,
                                     phi_adam_lr=metatest.adam_lr_arg(args.transfer_adam_lr))
            rec["trained_on"] = record["trained_on"]
            t_out.write_json("meta_test.json", rec)
            plot_meta_test(t_out, rec)
            print(meta_test_table(rec), flush=True)
            transfers[name] = rec
    except (RaysubError, ValueError) as exc:  # ours, or a bad number in --horizons / --transfer-horizons
        problems = exc.problems if isinstance(exc, RaysubError) else [f"{exc} (horizons take e.g. 1,2,5)"]
        print(f"l2o_meta_test bench: error: {'; '.join(problems)}", file=sys.stderr, flush=True)
        return 2
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    print(f"wall {wall:.0f} s; load average {load0:.2f} at start, {load1:.2f} at end; {out.arg('meta_test.json')}",
          flush=True)
    m = record["metrics"]
    print(json.dumps(strict_json({**m, "steps": steps, "horizons": record["horizons"], "seed_list": record["seeds"],
                      "lrs": {n: s["lr"] for n, s in record["lr_selection"].items()},
                      "schedules": {n: s["schedule"] for n, s in record["lr_selection"].items()},
                      "lr_at_grid_edge": [n for n, s in record["lr_selection"].items() if s["at_edge"]],
                      "weights": record["weights"], "l2o_adam_lr": record["l2o_adam_lr"],
                      "trained_on": record["trained_on"],
                      **{k: v for name, rec in transfers.items() for k, v in transfer_figures(name, rec).items()},
                      "wall_s": wall,
                      "threads": args.threads, "procs": args.procs, "loadavg": [load0, load1], "out": out.uri})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
