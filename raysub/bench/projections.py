"""Benchmark: the random projection families (dense, sparse, fastfood, fastjl) at LeNet-to-ResNet-18 sizes, CPU.

What it measures
    For every (n, d) on the grid n ∈ {61,706 (LeNet-5, "62k"), 1,048,576 ("1M"), 11,689,512 (ResNet-18, "11.7M")}
    × d ∈ {100, 1000, 10000}, each projection built by raysub's own factory
    ``PROJECTIONS.get(family)(n, d, seed, dtype=torch.float32, **options)``. dense gets raysub's default
    ``max_bytes`` (1 GiB) unless ``--dense-max-bytes`` says otherwise: it is *stored* (one GEMV per call) when
    N·D·4 bytes fit and *streamed* from its seed (N·D normals redrawn per call) when not, and every key and row
    that involves dense names the mode it ran in.
      build s         wall time of that factory call (drawing the random factors; for stored dense, the N×D matrix).
      lift+project ms one ``lift(z)`` (z ∈ R^d) plus one ``project(g)`` (g ∈ R^n), both random.
      ×dense          the ratio to dense, timed side by side: one process per (n, d) builds dense and every family,
                      warms each up with one call pair, then runs repetitions in which every family is timed once,
                      in an order rotated every repetition, so that load from other processes hits all of them
                      alike. ×dense is the median of the per-repetition ratios; ms the median per family
                      (``--reps`` repetitions at most, fewer for slow cases but at least 3).
      load            the 1-minute load average at the start and the end of that process's timed repetitions.
      peak MB         one more fresh process per (family, n, d) (``--no-memory`` skips them): peak RSS (getrusage
                      ru_maxrss) after the build and one lift+project, minus the RSS after importing torch,
                      allocating z and g and running a tiny instance once (to page in code). It covers the
                      build's transients, the stored factors and lift/project's working memory (lift's N-sized
                      output included).
      held MB         RSS right after the build (and a glibc malloc_trim) minus that same baseline: what the
                      projection keeps.
      adj err         |⟨lift(z), g⟩ − ⟨z, project(g)⟩| / (‖lift(z)‖·‖g‖), in the memory process: the
                      timed code is an exact adjoint pair (float32 round-off expected).
    Streamed dense cases with N·D above ``--max-streamed`` (default 2e9) are not run ("skipped"; the other
    families are still timed, without a ratio). A stored matrix that would not fit half the machine's available
    RAM is streamed instead. Nothing shown was not measured.

How long it takes
    ``--quick`` (n = 62k and 1M, d = 100 and 300; 1M × 300 is streamed dense) about 2-3 minutes on an idle
    2-core CPU, half of it in the memory processes. The full grid takes 10-20 minutes, mostly streamed dense
    (n = 1M, d = 1000 and n = 11.7M, d = 100: ~1e9 normals per call). Each process has a ``--timeout``. Timings
    need an idle machine: 2 OpenMP threads on busy cores are many times slower (the load column says how busy).

How to run
    python jobs/bench/projections.py [--quick] [--sizes 62k,1M] [--dims 100,1000] [--families ...] [--threads 2]
    python jobs/bench/projections.py --sizes 1M --dims 1000 --dense-max-bytes 4294967296   # the paper's stored P

Output: a table, and as the last line of stdout one JSON object with, per case (tag n62k / n1M / n11.7M):
``{family}_ms_n{tag}_d{d}``, ``dense_{mode}_ms_n{tag}_d{d}``, ``{family}_over_dense_{mode}_n{tag}_d{d}`` (mode
stored or streamed), ``{family}_peak_mb_...`` / ``dense_{mode}_peak_mb_...``, ``loadavg_n{tag}_d{d}`` ([start,
end] of the timed repetitions), and the raw per-case records under ``groups`` and ``memory``.
"""
from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from raysub.bench.harness import print_figures, rotated

ROOT = Path(__file__).resolve().parents[2]  # the checkout: the cases' processes run there

SIZES = {"62k": 61_706, "1M": 1_048_576, "11.7M": 11_689_512}
DIMS = [100, 1000, 10000]
QUICK_SIZES, QUICK_DIMS = ["62k", "1M"], [100, 300]
FAMILIES = ["dense", "sparse", "fastfood", "fastjl"]
MODES = {"MatrixProjection": "stored", "StreamedDenseProjection": "streamed"}
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


def dense_default_max_bytes() -> int:
    """raysub's own default for dense's ``max_bytes`` (read from the factory, not copied here)."""
    # heavy: torch, pyarrow load here, not when this module is imported
    from raysub.projections import PROJECTIONS

    return inspect.signature(PROJECTIONS.get("dense")).parameters["max_bytes"].default


def dense_mode(n: int, d: int, args) -> str:
    """How the dense factory will hold P: stored if N·D·4 ≤ the budget, else streamed."""
    return "stored" if n * d * 4 <= args.dense_max_bytes else "streamed"


def build(family: str, n: int, d: int, args):
    # heavy: torch loads here, not when this module is imported
    import torch

    # heavy: torch, pyarrow load here, not when this module is imported
    from raysub.projections import PROJECTIONS

    options = {"max_bytes": args.dense_max_bytes} if family == "dense" else {}
    return PROJECTIONS.get(family)(n, d, args.seed, dtype=torch.float32, **options)


def inputs(n: int, d: int, args):
    # heavy: torch loads here, not when this module is imported
    import torch

    gen = torch.Generator().manual_seed(args.seed + 1)
    return torch.randn(d, generator=gen), torch.randn(n, generator=gen)


# ----------------------------------------------------------------- child: one (n, d), every family side by side


def time_group(families, n: int, d: int, args) -> dict:
    """Build every family, then time lift+project in interleaved repetitions (order rotated per repetition)."""
    # heavy: torch loads here, not when this module is imported
    import torch

    torch.set_num_threads(args.threads)
    z, g = inputs(n, d, args)
    projs, builds = {}, {}
    for fam in families:
        t0 = time.perf_counter()
        projs[fam] = build(fam, n, d, args)
        builds[fam] = time.perf_counter() - t0

    def once(proj) -> float:
        t0 = time.perf_counter()
        proj.lift(z)
        proj.project(g)
        return time.perf_counter() - t0

    round_s = sum(once(p) for p in projs.values())  # warm-up (allocator, thread pool, FWHT Hadamard cache)
    # enough repetitions for a stable median, but not minutes of them for the slow streamed cases
    reps = max(3, min(args.reps, int(args.case_seconds / max(round_s, 1e-6))))
    load0 = os.getloadavg()[0]
    times = {fam: [] for fam in families}
    for r in range(reps):
        for fam in rotated(families, r):
            times[fam].append(once(projs[fam]))
    load1 = os.getloadavg()[0]
    out = {"n": n, "d": d, "reps": reps, "loadavg": [load0, load1], "threads": torch.get_num_threads(),
           "families": {}}
    for fam in families:
        rec = {"build_s": builds[fam], "ms": 1e3 * statistics.median(times[fam]), "mode": MODES.get(
            type(projs[fam]).__name__, "")}
        if "dense" in times and fam != "dense":
            rec["over_dense"] = statistics.median(a / b for a, b in zip(times[fam], times["dense"]))
        out["families"][fam] = rec
    return out


# ------------------------------------------------------------------ child: one (family, n, d), memory alone


def memory_case(family: str, n: int, d: int, args) -> dict:
    # heavy: torch loads here, not when this module is imported
    import torch

    torch.set_num_threads(args.threads)
    z, g = inputs(n, d, args)
    # Run a tiny instance of the same family (same dense mode) once first: the first calls page in ~10 MB of
    # library code and start the thread pool, which would otherwise be counted as the projection's memory.
    tiny_args = argparse.Namespace(**{**vars(args), "dense_max_bytes": 0 if dense_mode(n, d, args) == "streamed"
                                      else args.dense_max_bytes})
    tiny = build(family, 4096, 16, tiny_args)
    tiny.project(tiny.lift(torch.ones(16)))
    del tiny
    trim()
    base = rss_bytes()  # torch imported, z and g allocated (and touched), code paged in
    proj = build(family, n, d, args)
    trim()  # hand the build's freed temporaries back to the OS, so that "held" is what the projection keeps
    held = rss_bytes() - base
    x, y = proj.lift(z), proj.project(g)
    adj = abs(float(x.double() @ g.double()) - float(z.double() @ y.double())) / float(x.norm() * g.norm())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"family": family, "n": n, "d": d, "mode": MODES.get(type(proj).__name__, ""),
            "peak_mb": (peak - base) / MB, "held_mb": held / MB, "adjoint_rel_err": adj}


# ----------------------------------------------------------------------------------- parent: the grid


def spawn(child_args, args) -> dict:
    cmd = [sys.executable, "-m", "raysub.bench.projections", *child_args, "--threads", str(args.threads),
           "--dense-max-bytes", str(args.dense_max_bytes), "--reps", str(args.reps),
           "--case-seconds", str(args.case_seconds), "--seed", str(args.seed)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout (>{args.timeout:.0f}s)"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stderr[-2000:])
        return {"status": f"error (rc={out.returncode})"}
    return {**json.loads(lines[-1]), "status": "ok"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated n: tags (62k,1M,11.7M) or integers")
    ap.add_argument("--dims", default=",".join(map(str, DIMS)), help="comma-separated d (default 100,1000,10000)")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--quick", action="store_true", help="n=62k,1M and d=100,300 only (about 2-3 minutes)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak/held memory processes")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process (default 2)")
    ap.add_argument("--dense-max-bytes", type=int, default=None, help="dense's max_bytes: store P up to this size, "
                    "stream it above (default: raysub's own default, 1 GiB)")
    ap.add_argument("--max-streamed", type=float, default=2e9, help="skip streamed dense cases with N·D above this")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per (n, d) (at most)")
    ap.add_argument("--case-seconds", type=float, default=10.0, help="cap on timed seconds per (n, d) (≥3 reps)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per process (default 600)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-group", nargs=3, metavar=("FAMILIES", "N", "D"), help=argparse.SUPPRESS)
    ap.add_argument("--memory-case", nargs=3, metavar=("FAMILY", "N", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.time_group:  # child: one JSON line
        fams, n, d = args.time_group
        print(json.dumps(time_group(fams.split(","), int(n), int(d), args)), flush=True)
        return
    if args.memory_case:
        fam, n, d = args.memory_case
        print(json.dumps(memory_case(fam, int(n), int(d), args)), flush=True)
        return

    sizes = [SIZES[s] if s in SIZES else int(s) for s in args.sizes.split(",") if s]
    dims = [int(s) for s in args.dims.split(",") if s]
    if args.quick:
        sizes, dims = [SIZES[s] for s in QUICK_SIZES], QUICK_DIMS
    families = [f for f in args.families.split(",") if f]
    for f in families:
        if f not in FAMILIES:
            ap.error(f"unknown family {f!r}: pick from {', '.join(FAMILIES)}")
    if args.dense_max_bytes is None:
        args.dense_max_bytes = dense_default_max_bytes()
    # a stored dense P must fit comfortably (materialize also holds float64 blocks): cap at half the free RAM
    avail = mem_available()
    args.dense_max_bytes = min(args.dense_max_bytes, avail // 2)
    load0 = os.getloadavg()
    print(f"[bench.projections] {len(sizes)}×{len(dims)} sizes × {len(families)} families, {args.threads} threads, "
          f"dense stored up to {args.dense_max_bytes / 2**30:.2f} GiB, streamed above (RAM available "
          f"{avail / 2**30:.1f} GiB); load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    if args.threads > 1 and load0[0] > 0.5 * os.cpu_count():
        print("[bench.projections] warning: the CPUs are busy; several OpenMP threads on busy cores make "
              "timings slow and erratic (--threads 1 is steadier)", flush=True)

    t_start = time.perf_counter()
    groups, memory = {}, {}
    for n in sizes:
        for d in dims:
            if d > n:
                continue
            fams = list(families)
            if "dense" in fams and dense_mode(n, d, args) == "streamed" and n * d > args.max_streamed:
                fams.remove("dense")
                memory["dense", n, d] = {"status": f"skipped (streamed N·D={n * d:.1e})"}
            if not fams:
                continue
            groups[n, d] = spawn(["--time-group", ",".join(fams), str(n), str(d)], args)
            grp = groups[n, d]
            print(f"[bench.projections] n={tag_of(n)} d={d}: " + (", ".join(
                f"{f} {r['ms']:.2f} ms" + (f" ({r['mode']})" if r["mode"] else "")
                for f, r in grp["families"].items()) + f"; load {grp['loadavg'][0]:.2f}→{grp['loadavg'][1]:.2f}"
                if grp["status"] == "ok" else grp["status"]), flush=True)
            for fam in fams if not args.no_memory else []:
                memory[fam, n, d] = spawn(["--memory-case", fam, str(n), str(d)], args)

    fig = {"threads": args.threads, "dense_max_bytes": args.dense_max_bytes, "max_streamed": args.max_streamed}
    print()
    print(f"lift(z) + project(g), float32, CPU, {args.threads} threads; per (n, d) every family timed side by side "
          "in one process (interleaved repetitions, median); ×dense: median of per-repetition ratios to dense in the "
          "mode shown; load: 1-min load average at start→end of those repetitions; peak/held MB: RSS over a fresh "
          "process's baseline (torch + z + g)")
    hdr = (f"{'family':9s} {'n':>6s} {'d':>6s} {'mode':9s} {'build s':>8s} {'lift+proj ms':>13s} {'×dense':>8s} "
           f"{'load':>11s} {'peak MB':>8s} {'held MB':>8s} {'adj err':>8s}")
    print("-" * len(hdr))
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        for d in dims:
            tag, key = tag_of(n), f"n{tag_of(n)}_d{d}"
            grp = groups.get((n, d))
            if grp is None:
                continue
            if grp["status"] != "ok":
                print(f"{'(all)':9s} {tag:>6s} {d:6d} {grp['status']}")
                continue
            load = f"{grp['loadavg'][0]:.2f}→{grp['loadavg'][1]:.2f}"
            fig[f"loadavg_{key}"] = grp["loadavg"]
            dense_mode_run = grp["families"].get("dense", {}).get("mode")
            for fam in families:
                r, mem = grp["families"].get(fam), memory.get((fam, n, d), {})
                if r is None:
                    print(f"{fam:9s} {tag:>6s} {d:6d} {mem.get('status', '')}")
                    continue
                name = f"dense_{r['mode']}" if fam == "dense" else fam
                ratio = r.get("over_dense")
                rtxt = "—" if ratio is None else f"{ratio:.3g}"
                mtxt = (f"{mem['peak_mb']:8.0f} {mem['held_mb']:8.0f} {mem['adjoint_rel_err']:8.1e}"
                        if mem.get("status") == "ok" else f"{mem.get('status', '—'):>8s}")
                print(f"{fam:9s} {tag:>6s} {d:6d} {r['mode']:9s} {r['build_s']:8.2f} {r['ms']:13.2f} {rtxt:>8s} "
                      f"{load:>11s} {mtxt}")
                fig[f"{name}_ms_{key}"] = r["ms"]
                fig[f"{name}_build_s_{key}"] = r["build_s"]
                if ratio is not None:
                    fig[f"{fam}_over_dense_{dense_mode_run}_{key}"] = ratio
                if mem.get("status") == "ok":
                    fig[f"{name}_peak_mb_{key}"] = mem["peak_mb"]
    print("-" * len(hdr))
    load1 = os.getloadavg()
    print(f"load average (1 min): {load0[0]:.2f} at start, {load1[0]:.2f} at end, {os.cpu_count()} CPUs; "
          f"wall {time.perf_counter() - t_start:.0f}s")
    fig.update({"loadavg_start": load0[0], "loadavg_end": load1[0], "wall_s": time.perf_counter() - t_start,
                "groups": [dict(g, n=n, d=d, n_tag=tag_of(n)) for (n, d), g in groups.items()],
                "memory": [dict(m, family=f, n=n, d=d) for (f, n, d), m in memory.items()]})
    print_figures(fig)


if __name__ == "__main__":
    main()
