"""Benchmark: checksum speed on this machine — XXH3-128 (raysub's), BLAKE3, sha256 — in GB/s.

What it measures and its figures: `raysub/bench/checksums.py`.
"""
import sys

from raysub.bench.checksums import main

if __name__ == "__main__":
    sys.exit(main())
