"""Benchmark: raysub's Ray Train sampler vs a plain torchrun-style DDP loop, images/s on the same model and data.

What it measures, how long it takes and its figures: `raysub/bench/ddp_overhead.py` (``--help``).
"""
import sys

from raysub.bench.ddp_overhead import main

if __name__ == "__main__":
    sys.exit(main())
