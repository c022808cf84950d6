"""Benchmark: the quickstart (`raysub run`, embedded digits config) on a local disk vs on S3, side by side.

What it measures
    The wall time of the whole `raysub run` — sampling on Ray Train with its checkpoints, the basis stage, P-SGD —
    with ``run_dir`` on this machine's disk and with ``run_dir=s3://...`` on a real S3-protocol server on loopback
    (moto's threaded server, started here on 127.0.0.1, stopped at the end). Both runs share one Ray session, the
    same config and seed; the order alternates over ``--repeats`` pairs so that load drift hits both alike. Every
    file the run writes and reads (shards, manifest, basis, Ray Train's checkpoints through its storage_filesystem,
    the lock's heartbeat) goes through the S3 protocol and its HTTP round trips; loopback has no network latency,
    so the ratio is raysub's own overhead on object storage (requests, the lock's 1 s settle time), a floor for a
    real bucket. It also checks that both runs reached the same test accuracies (they must: same seed).

How long it takes
    About 2-3 minutes per pair on a 2-core CPU with the defaults (the quickstart is ~1 minute).

How to run
    python jobs/bench/s3_roundtrip.py [--repeats 1] [key=value ...]     (needs moto[server]: pip install -e .[test])

Output: a table, the load average, and as the last line one JSON object: ``local_s``, ``s3_s`` (medians),
``s3_over_local``, the per-pair walls and accuracies.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time


BUCKET = "raysub-bench"


def _run(run_dir: str, overrides) -> float:
    from raysub.cli import main

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", *overrides, f"run_dir={run_dir}"])
    if rc != 0:
        raise SystemExit(f"s3_roundtrip: raysub run {run_dir} failed (exit {rc})")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=1, help="local/s3 pairs (alternating order)")
    p.add_argument("overrides", nargs="*", help="config overrides for both runs (key=value)")
    args = p.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "raysub-bench")  # before Ray starts: its workers inherit them
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "raysub-bench")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    import boto3
    from moto.server import ThreadedMotoServer

    from raysub.config import load_config
    from raysub.engine.cluster import ensure_ray
    from raysub.runs import layout
    from raysub.storage import RunDir

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        query = f"?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        ensure_ray(load_config(None, args.overrides))
        load0 = os.getloadavg()[0]
        rows = []
        with tempfile.TemporaryDirectory(prefix="s3bench-") as tmp:
            for r in range(args.repeats):
                local, remote = f"{tmp}/local{r}", f"s3://{BUCKET}/run{r}{query}"
                order = [("local", local), ("s3", remote)][:: 1 if r % 2 == 0 else -1]
                walls = {}
                for name, run_dir in order:
                    walls[name] = _run(run_dir, args.overrides)
                    print(f"pair {r + 1}: {name:5s} {walls[name]:6.1f} s  (load {os.getloadavg()[0]:.2f})", flush=True)
                acc = {name: {m: v["test_acc"] for m, v in RunDir(d).read_json(layout.SUMMARY)["results"].items()}
                       for name, d in (("local", local), ("s3", remote))}
                if acc["local"] != acc["s3"]:
                    raise SystemExit(f"s3_roundtrip: the s3 run's accuracies {acc['s3']} differ from the local "
                                     f"run's {acc['local']}")
                rows.append({"local_s": walls["local"], "s3_s": walls["s3"], "test_acc": acc["local"]})
    finally:
        server.stop()
    local_s = statistics.median(r["local_s"] for r in rows)
    s3_s = statistics.median(r["s3_s"] for r in rows)
    load1 = os.getloadavg()[0]
    print(f"\nquickstart wall: local disk {local_s:.1f} s, S3 on loopback {s3_s:.1f} s, ratio {s3_s / local_s:.3f}; "
          f"load average {load0:.2f} -> {load1:.2f} on {os.cpu_count()} CPUs")
    print(json.dumps({"local_s": round(local_s, 2), "s3_s": round(s3_s, 2), "s3_over_local": round(s3_s / local_s, 3),
                      "pairs": rows, "loadavg_start": load0, "loadavg_end": load1}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
