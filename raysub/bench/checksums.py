"""Benchmark: the checksum of every shard — XXH3-128 (raysub's), BLAKE3 and sha256 — in GB/s on this machine.

Each algorithm hashes the same buffer (``--mb`` MB of float32 noise, in memory, so the figure is the hash's own
speed, not the disk's) in interleaved rounds; the median of the rounds is reported per algorithm, BLAKE3 with one
thread and with its automatic thread count. The last line is one JSON object: ``checksum_gb_per_s`` (the chosen
algorithm's, XXH3-128), ``sha256_gb_per_s``, ``blake3_gb_per_s`` (1 thread), ``blake3_auto_gb_per_s``, and the load
average at the start and the end.

How to run: python jobs/bench/checksums.py [--mb 1024] [--rounds 5]   (about 20 s at the defaults on 2 cores)
"""
from __future__ import annotations

import hashlib
import statistics
import time
from typing import Dict, List

import numpy as np


def _hashers():
    import blake3
    import xxhash

    return {
        "xxh3_128": lambda b: xxhash.xxh3_128(b).digest(),
        "blake3": lambda b: blake3.blake3(b).digest(),
        "blake3_auto": lambda b: blake3.blake3(b, max_threads=blake3.blake3.AUTO).digest(),
        "sha256": lambda b: hashlib.sha256(b).digest(),
    }


def main(argv=None) -> int:
    from raysub.bench.harness import OneLineParser, loadavg, print_figures, rotated
    from raysub.checksums import CHECKSUM

    ap = OneLineParser("checksums", description="checksum speed per algorithm, GB/s")
    ap.add_argument("--mb", type=int, default=1024, help="buffer size in MB (default 1024)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = ap.parse_args(argv)
    if args.mb <= 0 or args.rounds <= 0:
        ap.error("--mb and --rounds must be > 0")
    buf = memoryview(np.random.default_rng(0).standard_normal(args.mb * (1 << 20) // 8).view(np.uint8))
    gb = buf.nbytes / 1e9
    load0 = loadavg()
    print(f"[checksums] {gb:.2f} GB buffer, {args.rounds} rounds; load {load0}", flush=True)
    hashers = _hashers()
    times: Dict[str, List[float]] = {k: [] for k in hashers}
    for r in range(args.rounds):
        for name in rotated(list(hashers), r):
            t0 = time.perf_counter()
            hashers[name](buf)
            times[name].append(time.perf_counter() - t0)
    speed = {k: gb / statistics.median(v) for k, v in times.items()}
    for k, v in speed.items():
        print(f"[checksums] {k:<12} {v:6.2f} GB/s", flush=True)
    fig = {"algorithm": CHECKSUM, "checksum_gb_per_s": speed[CHECKSUM], "sha256_gb_per_s": speed["sha256"],
           "blake3_gb_per_s": speed["blake3"], "blake3_auto_gb_per_s": speed["blake3_auto"],
           "xxh3_128_gb_per_s": speed["xxh3_128"], "buffer_gb": gb, "loadavg_start": load0, "loadavg_end": loadavg()}
    print_figures(fig)
    return 0
