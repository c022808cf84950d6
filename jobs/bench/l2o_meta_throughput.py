"""Benchmark: meta-training throughput of the learned optimizer (`raysub l2o meta-train`), 1 actor vs 2.

What it measures
    The same meta-training (default: scikit-learn digits, the quickstart MLP, a dense random projection d = 15,
    batch 128, 4 optimizees, T = 10, N = 200, hidden 20) run with ``l2o.actors=1`` and ``l2o.actors=2`` on one
    local Ray cluster. Meta-steps per second = meta-steps after the first ``--warmup`` / the wall time they took
    (from ``history.json``'s per-meta-step wall clock: actor start-up and the final meta-validation excluded).
    Each meta-step is 4 optimizees × T = 40 forward/backward passes plus the learner's Adam step and ``ray.put``.

How long it takes
    About a minute on 2 cores (measured on this 2-core machine: 25.1 meta-steps/s with 1 actor, 37.6 with 2: 1.50×).

How to run
    locally:      python jobs/bench/l2o_meta_throughput.py [--meta-steps 30] [--warmup 5] [key=value ...]

Output: one line per actor count and, as the last line of stdout, one JSON object
{meta_steps_per_s_1, meta_steps_per_s_2, speedup_2_over_1, ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile


DEFAULTS = ["data.val_fraction=0.1", "train.projection=dense", "train.dim=15", "data.batch_size=128",
            "data.augment=false", "l2o.steps=200", "l2o.unroll=10", "l2o.optimizees=4",
            "l2o.validation_optimizees=1", "cluster.num_cpus=4"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meta-steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from raysub.cli import QUICKSTART
    from raysub.config import load_config
    from raysub.l2o.meta_train import meta_train

    root = tempfile.mkdtemp(prefix="raysub-l2o-bench-")
    out = {"meta_steps": args.meta_steps, "warmup": args.warmup, "cpus": os.cpu_count()}
    try:
        for actors in (1, 2):
            cfg = load_config(QUICKSTART, [f"run_dir={root}/a{actors}", *DEFAULTS, *args.overrides,
                                           f"l2o.actors={actors}", f"l2o.meta_steps={args.meta_steps}",
                                           f"l2o.validate_every={args.meta_steps}"])
            rows = meta_train(cfg, say=lambda *a: None)["meta"]
            w = args.warmup
            rate = (len(rows) - w) / (rows[-1]["wall_s"] - rows[w - 1]["wall_s"])
            out[f"meta_steps_per_s_{actors}"] = rate
            print(f"actors={actors}: {rate:.2f} meta-steps/s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["speedup_2_over_1"] = out["meta_steps_per_s_2"] / out["meta_steps_per_s_1"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
