"""Benchmark: peak memory of meta-training with unroll T = 10 vs T = 1 (it must not grow with T × activations).

What it measures
    One optimizee (`raysub.l2o.optimizee.OptimizeeWorker`, in process, no Ray) running meta-training unrolls of T
    steps — the meta-gradient of each unroll through the surrogate Σ_t ⟨stopgrad g_t, z_t(φ)⟩, so only the
    d-dimensional update chain is kept, never T forward graphs — on a model big enough for activations to show:
    the quickstart digits MLP widened to 1024-1024 (1.1M parameters), batch 512, a dense projection d = 15.
    Each T runs in its own fresh Python process (peak RSS, ``ru_maxrss``, is per process): the peak after the
    first unroll and after ``--steps`` steps. Were T graphs retained, the T = 10 peak would exceed T = 1's by
    about 9 × (activations of one batch) ≈ 9 × 512 × 2 × 1024 × 4 B × a few tensors: tens of MiB per layer.

How long it takes
    About 30 s on 2 cores.

How to run
    locally:      python jobs/bench/l2o_memory.py [--steps 100] [--unrolls 1,10]

Output: one line per T and, as the last line of stdout, one JSON object
{peak_rss_mib_t1, peak_rss_mib_t10, rss_ratio_t10_over_t1, ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHILD = r"""
import json, resource, sys, tempfile, time
from raysub.cli import QUICKSTART
from raysub.config import load_config
from raysub.l2o.optimizee import OptimizeeWorker
from raysub.l2o.setup import initial_phi
T, steps = int(sys.argv[1]), int(sys.argv[2])
cfg = load_config(QUICKSTART, [f"run_dir={tempfile.mkdtemp()}", "data.val_fraction=0.1", "train.projection=dense",
      "train.dim=15", "data.batch_size=512", "data.augment=false", "model.options.hidden=[1024,1024]",
      f"l2o.unroll={T}", f"l2o.steps={steps + T}", "l2o.optimizees=1", "l2o.actors=1"])
w = OptimizeeWorker(cfg.to_dict(), [0])
phi = initial_phi(cfg)
w.unroll(phi)
first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
for _ in range(steps // T):
    w.unroll(phi)
print(json.dumps({"T": T, "first_mib": first, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "steps_per_s": (steps // T) * T / (time.perf_counter() - t)}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--unrolls", default="1,10")
    args = parser.parse_args(argv)
    load0 = os.getloadavg()[0]
    print(f"machine load average (1 min) {load0:.2f} on {os.cpu_count()} CPUs", flush=True)
    rows = {}
    for T in (int(t) for t in args.unrolls.split(",")):
        out = subprocess.run([sys.executable, "-c", CHILD, str(T), str(args.steps)], check=True, cwd=ROOT,  # raysub of this checkout
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows[T] = r
        print(f"T={T:<3d} peak RSS {r['peak_mib']:.1f} MiB (after the first unroll {r['first_mib']:.1f} MiB), "
              f"{r['steps_per_s']:.1f} steps/s", flush=True)
    figures = {f"peak_rss_mib_t{T}": r["peak_mib"] for T, r in rows.items()}
    if 1 in rows and 10 in rows:
        figures["rss_ratio_t10_over_t1"] = rows[10]["peak_mib"] / rows[1]["peak_mib"]
        figures["rss_growth_mib_t10_minus_t1"] = rows[10]["peak_mib"] - rows[1]["peak_mib"]
    print(json.dumps({**figures, "steps": args.steps, "loadavg": [load0, os.getloadavg()[0]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
