"""Benchmark: the random projection families (dense, sparse, fastfood, fastjl) at LeNet-to-ResNet-18 sizes, CPU.

What it measures, how long it takes and its figures: `raysub/bench/projections.py` (``--help``).
"""
import sys

from raysub.bench.projections import main

if __name__ == "__main__":
    sys.exit(main())
