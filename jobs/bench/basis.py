"""Benchmark: raysub's distributed DLDR basis vs. a plain read of the trajectory vs. the DLDR reference PCA.

What it measures, how long it takes and its figures: `raysub/bench/basis.py` (``--help``).
"""
import sys

from raysub.bench.basis import main

if __name__ == "__main__":
    sys.exit(main())
