"""Benchmark: the random projection families (dense, sparse, fastfood, fastjl) at LeNet-to-ResNet-18 sizes, CPU.

What it measures
    For every family and every (n, d) on the grid n ∈ {61,706 (LeNet-5, "62k"), 1,048,576 ("1M"),
    11,689,512 (ResNet-18, "11.7M")} × d ∈ {100, 1000, 10000}, each projection built by raysub's own factory
    ``PROJECTIONS.get(family)(n, d, seed, dtype=torch.float32, **options)``:
      build s         wall time of that factory call (drawing the random factors; for stored dense, the N×D matrix).
      lift+project ms one ``lift(z)`` (z ∈ R^d) plus one ``project(g)`` (g ∈ R^n), both random; after one
                      warm-up call pair, the median over repetitions (``--reps``, fewer for slow cases but at
                      least 3; each repetition times lift and project back to back).
      peak MB         every case runs in a fresh subprocess (this script re-invoked with ``--case family n d``);
                      peak RSS (getrusage ru_maxrss) at the end minus the child's RSS after importing torch,
                      allocating z and g and running a tiny instance once (to page in code), before the build.
                      It covers the build's transients, the stored factors and lift/project's working memory
                      (lift's N-sized output included).
      held MB         RSS right after the build (and a glibc malloc_trim) minus that same baseline: what the
                      projection keeps.
      ×dense          lift+project time / dense's at the same (n, d), stored or streamed as the mode column
                      says; "—" where dense was not measured.
      load            the 1-minute load average when the case ended (other processes skew the timings).
      adj err         |⟨lift(z), g⟩ − ⟨z, project(g)⟩| / (‖lift(z)‖·‖g‖): a check that the timed code is an
                      exact adjoint pair (float32 round-off expected).
    dense keeps P (N·D float32) when it fits ``--dense-max-bytes`` (default 4 GiB, so n=1M, d=1000 is stored:
    the paper's dense) and otherwise streams it from its seed, redrawing N·D normals on every call; streamed
    cases with N·D above ``--max-streamed`` (default 2e9) are not run and show as "skipped". Stored matrices
    that would not fit half the machine's available RAM are streamed instead. Nothing shown was not measured.

How long it takes
    About 5-10 minutes for the full grid on an idle 2-core CPU, mostly dense (stored n=1M, d=1000: ~40 s to
    build; streamed n=11.7M, d=100: ~1 min); ``--quick`` (n=62k and 1M, d=100 and 1000) ~1.5 minutes. Each
    case has a ``--timeout``. Timings need an idle machine: 2 OpenMP threads on busy cores are many times slower.

How to run
    python jobs/bench/projections.py [--quick] [--sizes 62k,1M] [--dims 100,1000] [--families ...] [--threads 2]

Output: a table, and as the last line of stdout one JSON object with ``{family}_ms_n{tag}_d{d}``,
``{family}_peak_mb_n{tag}_d{d}``, ``{family}_over_dense_n{tag}_d{d}`` (tag 62k / 1M / 11.7M) where measured,
``dense_mode_n{tag}_d{d}`` and the raw per-case records under ``cases``.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = {"62k": 61_706, "1M": 1_048_576, "11.7M": 11_689_512}
DIMS = [100, 1000, 10000]
FAMILIES = ["dense", "sparse", "fastfood", "fastjl"]
MB = 2**20


def tag_of(n: int) -> str:
    return next((t for t, v in SIZES.items() if v == n), str(n))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def trim() -> None:
    """glibc's malloc_trim(0): freed heap memory is otherwise kept in RSS (not an issue for the peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def dense_mode(n: int, d: int, args) -> str:
    """How the dense factory will hold P: stored if N·D·4 ≤ the budget, else streamed."""
    return "stored" if n * d * 4 <= args.dense_max_bytes else "streamed"


# ------------------------------------------------------------------------------------- child: one case


def run_case(family: str, n: int, d: int, args) -> dict:
    import torch

    from raysub.projections import PROJECTIONS

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed + 1)
    z, g = torch.randn(d, generator=gen), torch.randn(n, generator=gen)
    options = {"max_bytes": args.dense_max_bytes} if family == "dense" else {}
    # Run a tiny instance of the same family (same dense mode) once first: the first calls page in ~10 MB of
    # library code and start the thread pool, which would otherwise be counted as the projection's memory.
    tiny = PROJECTIONS.get(family)(4096, 16, args.seed, dtype=torch.float32,
                                   **({"max_bytes": 0} if family == "dense" and dense_mode(n, d, args) == "streamed"
                                      else options))
    tiny.project(tiny.lift(torch.ones(16)))
    del tiny
    trim()
    base = rss_bytes()  # torch imported, z and g allocated (and touched), code paged in
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    t0 = time.perf_counter()
    proj = PROJECTIONS.get(family)(n, d, args.seed, dtype=torch.float32, **options)
    build_s = time.perf_counter() - t0
    trim()  # hand the build's freed temporaries back to the OS, so that "held" is what the projection keeps
    held = rss_bytes() - base

    def once():
        t0 = time.perf_counter()
        x = proj.lift(z)
        t1 = time.perf_counter()
        y = proj.project(g)
        t2 = time.perf_counter()
        return x, y, t1 - t0, t2 - t1

    x, y, a, b = once()  # warm-up (allocator, thread pool, FWHT Hadamard cache)
    adj = abs(float(x.double() @ g.double()) - float(z.double() @ y.double())) / float(x.norm() * g.norm())
    del x, y
    # enough repetitions for a stable median, but not minutes of them for the slow streamed cases
    reps = max(3, min(args.reps, int(args.case_seconds / max(a + b, 1e-6))))
    lifts, projs = [], []
    for _ in range(reps):
        _, _, a, b = once()
        lifts.append(a)
        projs.append(b)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mode = type(proj).__name__
    return {"family": family, "n": n, "d": d, "mode": mode, "build_s": build_s, "reps": reps,
            "ms": 1e3 * statistics.median([a + b for a, b in zip(lifts, projs)]),
            "lift_ms": 1e3 * statistics.median(lifts), "project_ms": 1e3 * statistics.median(projs),
            "peak_mb": (peak - base) / MB, "held_mb": held / MB, "base_rss_mb": base / MB,
            "base_peak_mb": base_peak / MB, "adjoint_rel_err": adj, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------- parent: the grid


def spawn(family: str, n: int, d: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", family, str(n), str(d),
           "--threads", str(args.threads), "--dense-max-bytes", str(args.dense_max_bytes), "--reps", str(args.reps),
           "--case-seconds", str(args.case_seconds), "--seed", str(args.seed)]
    rec = {"family": family, "n": n, "d": d}
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**rec, "status": f"timeout (>{args.timeout:.0f}s)"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stderr[-2000:])
        return {**rec, "status": f"error (rc={out.returncode})"}
    return {**json.loads(lines[-1]), "status": "ok", "wall_s": time.perf_counter() - t0, "load": os.getloadavg()[0]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated n: tags (62k,1M,11.7M) or integers")
    ap.add_argument("--dims", default=",".join(map(str, DIMS)), help="comma-separated d (default 100,1000,10000)")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--quick", action="store_true", help="n=62k,1M and d=100,1000 only")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every case (default 2)")
    ap.add_argument("--dense-max-bytes", type=int, default=4 << 30, help="store dense's P up to this size "
                    "(default 4 GiB); larger ones are streamed from the seed")
    ap.add_argument("--max-streamed", type=float, default=2e9, help="skip streamed dense cases with N·D above this")
    ap.add_argument("--reps", type=int, default=15, help="timed lift+project repetitions per case (at most)")
    ap.add_argument("--case-seconds", type=float, default=10.0, help="cap on timed seconds per case (≥3 reps)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per case subprocess (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", nargs=3, metavar=("FAMILY", "N", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.case:  # child: one case, one JSON line
        print(json.dumps(run_case(args.case[0], int(args.case[1]), int(args.case[2]), args)), flush=True)
        return

    sizes = [SIZES[s] if s in SIZES else int(s) for s in args.sizes.split(",") if s]
    dims = [int(s) for s in args.dims.split(",") if s]
    if args.quick:
        sizes, dims = [SIZES["62k"], SIZES["1M"]], [100, 1000]
    families = [f for f in args.families.split(",") if f]
    for f in families:
        if f not in FAMILIES:
            ap.error(f"unknown family {f!r}: pick from {', '.join(FAMILIES)}")
    # a stored dense P must fit comfortably (materialize also holds float64 blocks): cap at half the free RAM
    avail = mem_available()
    args.dense_max_bytes = min(args.dense_max_bytes, avail // 2)
    load0 = os.getloadavg()
    print(f"[bench.projections] {len(sizes)}×{len(dims)} sizes × {len(families)} families, {args.threads} threads, "
          f"dense stored up to {args.dense_max_bytes / 2**30:.2f} GiB (RAM available {avail / 2**30:.1f} GiB); "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on {os.cpu_count()} CPUs", flush=True)

    if args.threads > 1 and load0[0] > 0.5 * os.cpu_count():
        print("[bench.projections] warning: the CPUs are busy; several OpenMP threads on busy cores make "
              "timings slow and erratic (--threads 1 is steadier)", flush=True)
    t_start = time.perf_counter()
    res = {}
    for n in sizes:
        for d in dims:
            for fam in families:
                if d > n:
                    continue
                if fam == "dense" and dense_mode(n, d, args) == "streamed" and n * d > args.max_streamed:
                    res[fam, n, d] = {"family": fam, "n": n, "d": d, "status": f"skipped (streamed N·D={n * d:.1e})"}
                else:
                    res[fam, n, d] = spawn(fam, n, d, args)
                r = res[fam, n, d]
                print(f"[bench.projections] {fam} n={tag_of(n)} d={d}: " + (
                    f"{r['ms']:.2f} ms, build {r['build_s']:.2f}s, peak {r['peak_mb']:.0f} MB ({r['mode']})"
                    if r["status"] == "ok" else r["status"]), flush=True)

    # the table
    modes = {"MatrixProjection": "stored", "StreamedDenseProjection": "streamed"}
    fig = {"threads": args.threads, "dense_max_bytes": args.dense_max_bytes, "max_streamed": args.max_streamed}
    print()
    print(f"lift(z) + project(g), float32, CPU, {args.threads} threads; median over repetitions after a warm-up; "
          "peak/held MB = RSS over the child's baseline (torch + z + g)")
    hdr = (f"{'family':9s} {'n':>6s} {'d':>6s} {'mode':9s} {'build s':>8s} {'lift+proj ms':>13s} {'peak MB':>8s} "
           f"{'held MB':>8s} {'×dense':>8s} {'adj err':>8s} {'load':>5s}")
    print("-" * len(hdr))
    print(hdr)
    print("-" * len(hdr))
    for (fam, n, d), r in res.items():
        tag = tag_of(n)
        if r["status"] != "ok":
            print(f"{fam:9s} {tag:>6s} {d:6d} {'':9s} {r['status']}")
            continue
        dense = res.get(("dense", n, d), {})
        ratio = r["ms"] / dense["ms"] if dense.get("status") == "ok" else None
        mode = modes.get(r["mode"], "")
        rtxt = "—" if ratio is None else f"{ratio:.3g}"
        print(f"{fam:9s} {tag:>6s} {d:6d} {mode:9s} {r['build_s']:8.2f} {r['ms']:13.2f} {r['peak_mb']:8.0f} "
              f"{r['held_mb']:8.0f} {rtxt:>8s} {r['adjoint_rel_err']:8.1e} {r['load']:5.2f}")
        key = f"n{tag}_d{d}"
        fig[f"{fam}_ms_{key}"] = r["ms"]
        fig[f"{fam}_peak_mb_{key}"] = r["peak_mb"]
        fig[f"{fam}_build_s_{key}"] = r["build_s"]
        if fam == "dense":
            fig[f"dense_mode_{key}"] = mode
        elif ratio is not None:
            fig[f"{fam}_over_dense_{key}"] = ratio
    print("-" * len(hdr))
    load1 = os.getloadavg()
    print(f"load average (1 min): {load0[0]:.2f} at start, {load1[0]:.2f} at end, {os.cpu_count()} CPUs; "
          f"wall {time.perf_counter() - t_start:.0f}s")
    fig.update({"loadavg_start": load0[0], "loadavg_end": load1[0], "wall_s": time.perf_counter() - t_start,
                "cases": [dict(r, n_tag=tag_of(r["n"])) for r in res.values()]})
    print(json.dumps(fig), flush=True)


if __name__ == "__main__":
    main()
