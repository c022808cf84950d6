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
      acc_gap_best_10n_pts           the best tuned baseline's mean test accuracy after the full run minus φ's,
                                     in points (goal ≤ 0.3); test_acc_end: every optimizer's;
      l2o_over_momentum_steps        mean convergence step (SL2O §4.1, over the full run) of φ ÷ Momentum†'s.
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
                   [--seeds 3] [--procs 2] [--out DIR] [key=value ...]
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
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--val-seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--procs", type=int, default=1, help="runs at once in forked processes (1 thread each)")
    parser.add_argument("--out", help="where meta_test.json and loss_curves.png go (default: a temporary dir)")
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
    from raysub.storage import RunDir, strict_json

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
    horizons = [int(h) for h in args.horizons.split(",") if h]
    schedules = [x for x in args.schedules.split(",") if x]
    try:
        cfg = load_config(resolve_config(args.config), [*TASK, f"train.basis_run={args.basis_run}",
                                                         f"run_dir={out.uri}", *l2o, *args.overrides])
        if args.weights:  # verified before anything is written
            # heavy: torch, pyarrow load here, not when this module is imported
            from raysub.l2o.weights import weights_problems

            problems = [f"--weights: {p}" for p in weights_problems(args.weights)]
            if problems:
                raise ConfigError(problems)
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
                                    processes=args.procs)
    except RaysubError as exc:
        print(f"l2o_meta_test bench: error: {'; '.join(exc.problems)}", file=sys.stderr, flush=True)
        return 2
    wall = time.perf_counter() - t0
    record["trained_on"] = metatest.trained_on(args.weights) if args.weights else "adam_like (hand-built)"
    out.write_json("meta_test.json", record)
    plot_meta_test(out, record)
    print(meta_test_table(record), flush=True)
    load1 = os.getloadavg()[0]
    print(f"wall {wall:.0f} s; load average {load0:.2f} at start, {load1:.2f} at end; {out.arg('meta_test.json')}",
          flush=True)
    m = record["metrics"]
    print(json.dumps(strict_json({**m, "steps": steps, "horizons": record["horizons"], "seed_list": record["seeds"],
                      "lrs": {n: s["lr"] for n, s in record["lr_selection"].items()},
                      "schedules": {n: s["schedule"] for n, s in record["lr_selection"].items()},
                      "lr_at_grid_edge": [n for n, s in record["lr_selection"].items() if s["at_edge"]],
                      "weights": record["weights"], "trained_on": record["trained_on"], "wall_s": wall,
                      "threads": args.threads, "procs": args.procs, "loadavg": [load0, load1], "out": out.uri})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
