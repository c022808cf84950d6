"""Benchmark: intrinsic-dimension sweep throughput, 2 concurrent trials vs 1, on this machine.

What it measures
    The same `raysub sweep` (default: the shipped ``sweep_digits`` config, 2 seeds, coarse grid only, no
    refinement — 26 trials: 2 full-training baselines + 3 families × 4 dims × 2 seeds, 10 epochs each) is run twice on one
    local Ray cluster with as many logical CPUs as the machine has cores: once with ``sweep.max_concurrent=1``
    and once with as many concurrent trials as the cluster fits (2 on a 2-core machine). Each run is a fresh
    sweep directory. Throughput = trials / sweep wall time (Tune start-up, trial actors, data loading and
    training included: what a user waits for), in trials per hour; parallel efficiency = (throughput with k
    concurrent / throughput with 1) / k. The two runs alternate (1, k, 1, k, ... ``--repeats`` times) and the
    medians are compared, so load from other processes hits both alike.

How long it takes
    About 5 minutes with the defaults on 2 cores (measured: 178 s with 1 concurrent trial, 112 s with 2) (``--epochs`` scales trial length; longer trials amortize the
    per-trial start-up and raise the efficiency).

How to run
    locally:      python jobs/bench/sweep_throughput.py [--config sweep_digits] [--epochs 10] [--repeats 1]
    on a cluster: ray job submit --working-dir . -- python jobs/bench/sweep_throughput.py

Output: one line per sweep run, a table, and as the last line of stdout one JSON object (trials_per_hour_1,
trials_per_hour_2 — or _k —, parallel_efficiency, trial counts and wall times).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="sweep_digits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    from raysub.cli import resolve_config
    from raysub.config import load_config
    from raysub.pipeline.sweep import run_sweep

    cpus = os.cpu_count() or 1
    root = tempfile.mkdtemp(prefix="raysub-sweep-bench-")
    walls = {}
    trials = None
    try:
        for rep in range(args.repeats):
            for conc in (1, cpus):
                run_dir = os.path.join(root, f"c{conc}-r{rep}")
                cfg = load_config(resolve_config(args.config), [
                    f"run_dir={run_dir}", f"train.epochs={args.epochs}", "sweep.refine=0",
                    f"sweep.max_concurrent={conc}", f"cluster.num_cpus={cpus}"])
                summary = run_sweep(cfg, say=lambda _line: None)
                trials = len(summary["trials"])
                assert summary["max_concurrent"] == conc, summary["max_concurrent"]
                walls.setdefault(conc, []).append(summary["wall_s"])
                print(f"[bench] {conc} concurrent: {trials} trials in {summary['wall_s']:.1f}s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    tph = {c: trials / statistics.median(w) * 3600 for c, w in walls.items()}
    eff = tph[cpus] / tph[1] / cpus
    print(f"{'concurrent':>10}  {'trials':>6}  {'wall s':>7}  {'trials/hour':>11}")
    for c in sorted(tph):
        print(f"{c:>10}  {trials:>6}  {statistics.median(walls[c]):>7.1f}  {tph[c]:>11.0f}")
    print(f"parallel efficiency with {cpus} concurrent: {eff:.2f}")
    figures = {"trials": trials, "epochs_per_trial": args.epochs, "cpus": cpus,
               **{f"trials_per_hour_{c}": round(v, 1) for c, v in tph.items()},
               **{f"wall_s_{c}": round(statistics.median(w), 1) for c, w in walls.items()},
               "parallel_efficiency": round(eff, 3)}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
