"""Benchmark: the sampling window's length against end-to-end time and accuracy, and the adaptive window's signal.

What it measures, how long it takes and its figures: `raysub/bench/window_tradeoff.py` (``--help``).
"""
import sys

from raysub.bench.window_tradeoff import main

if __name__ == "__main__":
    sys.exit(main())
