"""Benchmark: one P-SGD step (raysub's subspace step) vs. one plain SGD step, same model and batch, CPU.

What it measures, how long it takes and its figures: `raysub/bench/step.py` (``--help``).
"""
import sys

from raysub.bench.step import main

if __name__ == "__main__":
    sys.exit(main())
