"""Benchmark: meta-testing of the learned optimizer φ against tuned Momentum† (SL2O §4.1 and VeLO's speedup).

What it measures, how long it takes and its figures: `raysub/bench/l2o_meta_test.py` (``--help``).
"""
import sys

from raysub.bench.l2o_meta_test import main

if __name__ == "__main__":
    sys.exit(main())
