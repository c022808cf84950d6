"""Benchmark: raysub's distributed DLDR basis vs. a plain read of the trajectory vs. the DLDR reference PCA.

What it measures
    A synthetic trajectory of ResNet-18 size (n = 11,689,512 parameters, t = 100 snapshots, 4.7 GB of
    float32) is written exactly as raysub's sampler writes it (`raysub.pipeline.sample._write_snapshot`): the flat
    vector is cut into ``--num-blocks`` contiguous blocks by `raysub.storage.block_bounds` (as 4 DDP ranks
    would), every snapshot of every block is one Arrow shard written with `RunDir.write_bytes(snapshot_rel(b, s),
    encode_vector(values, {...}))`, and every block has its ``index.json`` with the shards' checksums. The
    trajectory is realistic rather than white noise: θ_s = θ0 + Σ_k a_k(s) u_k + ε_s with a planted rank-K
    structure (a_k(s) = c·r^(k-1)·cos(πk(s+½)/t), the principal-component shape of an SGD trajectory; u_k
    random; ε small iid noise), generated block by block in float32 so the generator never holds the matrix.

    Then, side by side in one run (the ratios are what to read; absolute seconds depend on the machine):
      read_s       one plain sequential read of every shard's bytes, one process: pyarrow
                   ``fs.open_input_file(path).read_buffer()`` (one read of the known size, as fast as Python's
                   own open().read()); measured before and after every basis build, median reported. Right
                   after each, the same read through raysub's `RunDir.read_bytes` (no checksum) is timed too
                   (read_bytes_s): it uses ``open_input_stream().read_buffer()``, which pyarrow implements for a
                   stream of unknown size as a Python loop of 256 KiB reads joined into one bytes object
                   (extra copies), several times slower than a plain read of an 11.7 MB shard.
      basis_s      `raysub.pipeline.basis.build_basis(run, dim, blocks, shards)` on Ray (ray.init(num_cpus=cpu_count)),
                   i.e. read (its actors memory-map local shards) + checksum verify + distributed Gram + eigh
                   + writing the D×N basis shards; the slowest actor's load/gram/write split is printed. Peak RAM of
                   a block actor from the record's "blocks" entries: (peak_rss - start_rss) / block_bytes, its
                   peak_rss the kernel's high-water mark (VmHWM, reset when the actor starts where the kernel
                   allows: peak_rss_source). All actors hold their blocks at once, so raysub's peak RAM is the
                   sum of the actors' peaks (raysub_peak_rss_sum_bytes).
      reference_s  the DLDR reference code's way (nblt/DLDR train_psgd.py), in a separate process so its
                   peak RSS is its own: load every snapshot (plain read, as read_s) as one flat vector into
                   a list, W = np.array(W) (t×n float32), PCA(n_components=dim).fit_transform(W) with
                   scikit-learn (which centres W itself), np.save(components_). Its peak RSS is the child's VmHWM from
                   /proc/self/status (ru_maxrss would include the parent's: Linux carries it across exec).
      stream_basis_s  the basis stage from a streamed Gram (`build_basis(..., streamed_gram=K)`, what `raysub
                   basis` does when the sampler stored ``trajectory/gram.pt``): the driver's eigh, then one Ray task
                   per block (a CPU each) reads it once (checksum verified) and writes U_b — no Gram pass. K, the Gram relative to θ0 that
                   the ranks stream, is made beforehand (`streamed_gram`). Timed alternately with basis_s.
      floor_s      the streamed stage's physical floor, measured in the same run: read_s + one plain write of the
                   D×N float32 basis bytes + one float32 GEMM of U_b's shape per block ((D×T)(T×n_b), numpy, this
                   process's threads). stream_basis_over_floor = stream_basis_s / floor_s.
      stream_gram_overhead  sampling wall time with the streaming Gram ÷ without, at ResNet-20 shapes on the CPU and
                   DLDR's CIFAR-10 rate (one snapshot per 390-step epoch, 51 snapshots, adaptive checks at d = 40):
                   SGD steps interleaved in this process with and without a streaming add + window check beside
                   them, and the whole window's adds and checks timed one by one (`stream_overhead`).
    Correctness: the streamed basis against the post-hoc one (stream_sv_max_rel_diff, stream_max_angle_deg: the
    largest principal angle, from its sine). The reference's singular values and components are compared with raysub's (max relative
    singular-value difference, largest principal angle between the two D-dimensional subspaces), so the
    comparison is against the same answer.

    Page cache: the trajectory has just been written, so the reads here (the plain read, raysub's actors,
    the reference) are served from the page cache: these are warm-cache figures. The fraction of the
    trajectory resident in the page cache is checked with mincore(2) before every measurement and printed
    (the reference's ~16 GB can evict it; the read after the reference is therefore kept out of the median).

    CPU contention: the figures are ratios of measurements taken alternately in one run, but a multi-process
    basis build and a single-process read are not slowed alike by other load; the load average is printed.
    Ray runs its workers at nice 15 by default, so on a busy machine the block actors would lose to the
    driver's read; the local Ray instance started here runs them at the driver's priority
    (--ray-worker-niceness, default 0).

How long it takes (2-core AMD EPYC VM, 24 GiB RAM, local disk)
    default size (n = 11.7M, t = 100, 4.7 GB): about 5 minutes on a quiet machine (0.7 min writing the
        trajectory, 1.5 min raysub and the reads, 2.7 min the reference PCA); over 10 minutes when other
        processes load the CPU. Needs ~6.6 GB free in /tmp (trajectory + basis + the reference's components)
        and ~16 GB of free RAM for the reference (--skip-reference to leave it out).
    smoke size (--num-params 200000 --snapshots 20): about 15-40 seconds, mostly Ray start-up.

How to run
    locally:     python jobs/bench/basis.py [--num-params 200000 --snapshots 20] [--dim 40] [--keep]
    on a cluster: ray job submit --working-dir . -- python jobs/bench/basis.py --dir s3://bucket/bench-basis
                 (on a multi-node cluster --dir must be a path or URI every node can reach; the default is
                 a temporary directory under /tmp on the driver node.)

Output: progress lines, a table, and as the last line of stdout one JSON object with the figures
(basis_over_read, peak_ram_over_block, stream_basis_over_posthoc, stream_basis_over_floor, stream_gram_overhead,
stream_sv_max_rel_diff, stream_max_angle_deg, reference_over_raysub_time, reference_over_raysub_ram — the reference's
peak RSS over the sum of raysub's actors' peaks —, raw seconds and bytes, n, t, dim, num_blocks, agreement with
the reference).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from raysub.bench.basis_costs import (  # noqa: F401  re-exported: the job's helpers
    Floor,
    MeasuredBlockGram,
    floor_figures,
    overhead_ratio,
    raysub_memory,
    reference_over_raysub_ram,
    stream_overhead,
)
from raysub.bench.basis_data import (  # noqa: F401  re-exported: the job's helpers
    GOAL_BASIS_OVER_READ,
    GOAL_PEAK_RAM_OVER_BLOCK,
    GOAL_STREAM_GRAM_OVERHEAD,
    GOAL_STREAM_OVER_FLOOR,
    GOAL_STREAM_OVER_POSTHOC,
    RESNET18_PARAMS,
    THETA0_STD,
    compare_bases,
    compare_streamed,
    cross_products,
    gib,
    log,
    max_principal_angle,
    planted_coefficients,
    read_all,
    read_basis_record,
    reference_child,
    resident_fraction,
    run_reference,
    streamed_gram,
    sv_max_rel_diff,
    write_trajectory,
)
from raysub.bench.harness import print_figures
from raysub.storage import RunDir
from raysub.pipeline.basis import build_basis


def init_ray(worker_niceness: int = 0):
    # heavy: ray loads here, not when this module is imported
    import ray

    if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`: connect to the cluster as it is
        ray.init(log_to_driver=False)
    else:
        # address="local": a fresh instance of our own, even if another local Ray instance is running (plain
        # ray.init() would join that one, whose CPUs other jobs may be using, and refuse num_cpus).
        # Ray runs its workers at nice 15 by default; with other load on the machine that would slow the block
        # actors but not the plain read (nice 0 in this process), so the workers get the driver's priority.
        os.environ["RAY_worker_niceness"] = str(worker_niceness)
        ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False, include_dashboard=False)
    return ray


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-params", type=int, default=RESNET18_PARAMS, help="n (default: ResNet-18's 11,689,512)")
    ap.add_argument("--snapshots", type=int, default=100, help="t (default 100)")
    ap.add_argument("--dim", type=int, default=40, help="basis dimension D (default 40; lowered to t//2 if ≥ t)")
    ap.add_argument("--num-blocks", type=int, default=4, help="trajectory blocks, i.e. sampler ranks (default 4)")
    ap.add_argument("--rank", type=int, default=60, help="planted rank K of the trajectory (≤ t-1; default 60)")
    ap.add_argument("--decay", type=float, default=0.9, help="planted amplitude ratio between components")
    ap.add_argument("--scale", type=float, default=0.1, help="amplitude of the leading planted component")
    ap.add_argument("--noise", type=float, default=1e-4, help="std of the iid noise per coordinate and snapshot")
    ap.add_argument("--repeats", type=int, default=2, help="basis builds, each between two reads (default 2; median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="run directory (path or URI); default: a temp dir under /tmp")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    ap.add_argument("--ray-worker-niceness", type=int, default=0,
                    help="niceness of the local Ray instance's workers (Ray's default 15; default here 0, the "
                         "driver's, so the actors and the plain read compete alike for a busy CPU)")
    ap.add_argument("--skip-reference", action="store_true", help="skip the sklearn reference (it needs ~3×t·n·4 "
                                                                   "bytes of RAM)")
    ap.add_argument("--skip-overhead", action="store_true",
                    help="skip stream_gram_overhead (the streaming Gram's cost to a ResNet-20 sampling rank)")
    ap.add_argument("--overhead-rounds", type=int, default=6, help="interleaved step rounds (default 6)")
    ap.add_argument("--overhead-steps-per-snapshot", type=int, default=390,
                    help="steps between snapshots (default 390: DLDR's CIFAR-10, one snapshot per epoch)")
    ap.add_argument("--overhead-snapshots", type=int, default=51, help="window snapshots with θ0 (default 51)")
    ap.add_argument("--reference-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ref-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.reference_child:
        reference_child(args)
        return

    n, t, nblk = args.num_params, args.snapshots, args.num_blocks
    dim = args.dim
    if not 0 < dim < t:
        dim = max(1, t // 2)
        log(f"--dim {args.dim} is not below t={t} snapshots: using dim={dim}")
    rank = min(args.rank, t - 1)
    if rank < dim:
        log(f"note: planted rank {rank} < dim {dim}; components beyond {rank} are noise and may differ")

    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    if load0 > 0.5 * os.cpu_count():
        log(f"warning: load average {load0:.2f} on {os.cpu_count()} CPUs: other processes are using the CPU; "
            "timings will be noisy (the ratios are measured side by side, but a multi-process basis build and a "
            "single-process read are not slowed alike)")
    made_dir = args.dir is None
    uri = args.dir or tempfile.mkdtemp(prefix="raysub-bench-basis-", dir="/tmp")
    run = RunDir(uri)
    if run.exists("trajectory"):
        raise SystemExit(f"{run.uri} already holds a trajectory: pick another --dir or delete it")
    local_tmp = tempfile.mkdtemp(prefix="raysub-bench-basis-ref-", dir="/tmp")
    ref_npy = os.path.join(local_tmp, "components.npy")
    traj_bytes = 4 * n * t
    log(f"n={n:,} parameters, t={t} snapshots ({gib(traj_bytes)} float32), dim={dim}, {nblk} blocks, "
        f"planted rank {rank} (decay {args.decay}), noise {args.noise}; dir {run.uri}")
    try:
        log("writing the trajectory as the sampler does ...")
        tw = time.perf_counter()
        written = write_trajectory(run, n, t, nblk, rank, args.decay, args.scale, args.noise, args.seed)
        write_s = time.perf_counter() - tw
        log(f"wrote {gib(written)} in {write_s:.1f}s")

        # heavy: torch loads here, not when this module is imported
        from raysub.pipeline.sample import collect_trajectory

        blocks, shards = collect_trajectory(run)

        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f}%"

        cache = {}  # label -> fraction of the trajectory's pages in the page cache just before that measurement

        rb_reads = []  # RunDir.read_bytes, measured right after each plain read

        def timed_read(label: str, keep: bool = True) -> float:
            cache[label] = resident_fraction(run, blocks)
            secs = read_all(run, blocks, "plain")
            secs_rb = read_all(run, blocks, "read_bytes")
            if keep:
                rb_reads.append(secs_rb)
            log(f"{label}: read_s = {secs:.2f}s ({written / secs / 2**30:.2f} GiB/s; RunDir.read_bytes "
                f"{secs_rb:.2f}s = {written / secs_rb / 2**30:.2f} GiB/s; page-cache resident before: "
                f"{pct(cache[label])})")
            return secs

        log("page cache: the trajectory was just written, so the reads below are served from the page cache "
            f"(resident now: {pct(resident_fraction(run, blocks))}; checked again before every measurement)")
        log("the streamed Gram (relative to θ0, as the sampling ranks build it) ...")
        tg = time.perf_counter()
        K_stream = streamed_gram(run, blocks)
        log(f"streamed Gram {K_stream.shape[0]}×{K_stream.shape[0]} in {time.perf_counter() - tg:.1f}s (not timed "
            "below: the ranks build it while sampling)")
        floor = Floor(run, n, t, dim, nblk, args.seed)
        reads, basis_runs, records = [], [], []
        stream_runs, stream_records, floor_writes, floor_gemms = [], [], [], []
        read_all(run, blocks)  # warm-up (and pulls back anything evicted)
        read_all(run, blocks, "read_bytes")
        reads.append(timed_read("read 1"))

        log(f"starting Ray (num_cpus={os.cpu_count()}, worker niceness {args.ray_worker_niceness}) ...")
        ray = init_ray(args.ray_worker_niceness)

        for r in range(args.repeats):
            label = f"basis {r + 1}"
            cache[label] = resident_fraction(run, blocks)
            log(f"raysub build_basis (repeat {r + 1}/{args.repeats}; page-cache resident before: "
                f"{pct(cache[label])}) ...")
            t0 = time.perf_counter()
            rec = build_basis(run, dim, blocks, shards, block_class=MeasuredBlockGram)
            basis_runs.append(time.perf_counter() - t0)
            records.append(rec)
            tm = rec["timings"]
            log(f"{label}: basis_s = {basis_runs[-1]:.2f}s (slowest actor: load {tm['load_s']:.2f}s, gram "
                f"{tm['gram_s']:.2f}s, write {tm['write_s']:.2f}s)")
            reads.append(timed_read(f"read {r + 2}"))
            label = f"stream basis {r + 1}"
            cache[label] = resident_fraction(run, blocks)
            t0 = time.perf_counter()
            rec = build_basis(run, dim, blocks, shards, prefix="basis_stream", streamed_gram=K_stream,
                              block_class=MeasuredBlockGram)
            stream_runs.append(time.perf_counter() - t0)
            stream_records.append(rec)
            log(f"{label}: stream_basis_s = {stream_runs[-1]:.2f}s (slowest task: load {rec['timings']['load_s']:.2f}s,"
                f" write {rec['timings']['write_s']:.2f}s; page-cache resident before: {pct(cache[label])})")
            floor_writes.append(floor.write())
            floor_gemms.append(floor.gemm())
            log(f"floor: plain write of the basis bytes {floor_writes[-1]:.2f}s, float32 GEMM of U_b's shape "
                f"{floor_gemms[-1]:.2f}s")
            reads.append(timed_read(f"read {r + 2}b"))
        ray.shutdown()
        del floor
        log("comparing the streamed basis with the post-hoc one ...")
        stream_cmp = compare_streamed(run, records[-1], stream_records[-1], dim)
        log(f"streamed vs post-hoc: max relative singular-value difference {stream_cmp['stream_sv_max_rel_diff']:.2e}, "
            f"largest principal angle {stream_cmp['stream_max_angle_deg']:.2e} deg")

        ref, cmp, read_after_ref = None, None, None
        if not args.skip_reference:
            cache["reference"] = resident_fraction(run, blocks)
            log(f"reference (DLDR's way: t×n matrix in RAM + sklearn PCA) in a subprocess; needs ~"
                f"{gib(3.5 * traj_bytes)} RAM; page-cache resident before: {pct(cache['reference'])} ...")
            ref = run_reference(run, dim, ref_npy, args.seed)
            log(f"reference_s = {ref['total_s']:.2f}s (load {ref['load_s']:.2f}s, pca {ref['pca_s']:.2f}s "
                f"[{ref['svd_solver']}], save {ref['save_s']:.2f}s), peak RSS {gib(ref['peak_rss'])}")
            # the reference's RAM use may have evicted the trajectory: informative only, not in the median
            read_after_ref = timed_read("read after reference", keep=False)
            log("comparing the reference's basis with raysub's ...")
            cmp = compare_bases(run, ref_npy, dim, records[-1]["singular_values"], ref["singular_values"])
            log(f"max relative singular-value difference {cmp['sv_max_rel_diff']:.2e}, largest principal angle "
                f"{cmp['max_principal_angle_deg']:.2e} deg")
        overhead = None
        if not args.skip_overhead:
            log(f"stream_gram_overhead: ResNet-20 sampling steps with and without the streaming Gram (CPU, "
                f"{args.overhead_rounds} interleaved rounds, then a {args.overhead_snapshots}-snapshot window) ...")
            overhead = stream_overhead(steps_per_snapshot=args.overhead_steps_per_snapshot,
                                       snapshots=args.overhead_snapshots, rounds=args.overhead_rounds, dim=40,
                                       seed=args.seed)
            log(f"step {overhead['step_s_without_stream'] * 1e3:.1f} ms without, "
                f"{overhead['step_s_with_stream'] * 1e3:.1f} ms with; the window's adds and checks "
                f"{overhead['stream_window_s']:.3f}s -> overhead {overhead['stream_gram_overhead']:.5f}")
    finally:
        shutil.rmtree(local_tmp, ignore_errors=True)
        if not args.keep:
            if made_dir and "://" not in uri:
                shutil.rmtree(uri, ignore_errors=True)
            else:
                run.delete()
        else:
            log(f"kept {run.uri}")

    # ------------------------------------------------------------------------------------------ figures
    read_s = statistics.median(reads)
    read_bytes_s = statistics.median(rb_reads)
    basis_s = statistics.median(basis_runs)
    rec = records[int(np.argsort(basis_runs)[len(basis_runs) // 2])]
    mem = raysub_memory(rec["blocks"])
    over_block, abs_over_block = mem["peak_ram_over_block"], mem["peak_rss_over_block_abs"]
    actor_peak, block_bytes = mem["raysub_actor_peak_rss_bytes"], mem["block_bytes"]
    evr = rec["explained_variance_top_dim"]
    stream_s = statistics.median(stream_runs)
    srec = stream_records[int(np.argsort(stream_runs)[len(stream_runs) // 2])]
    floor_fig = floor_figures(read_s, statistics.median(floor_writes), statistics.median(floor_gemms), stream_s,
                              basis_s)

    fig = {
        "n": n, "t": t, "dim": dim, "num_blocks": nblk, "planted_rank": rank, "trajectory_bytes": int(written),
        "page_cache": "warm (trajectory written just before; reads served from the page cache)",
        "read_s": read_s, "read_s_all": reads, "basis_s": basis_s, "basis_s_all": basis_runs,
        "basis_load_s": rec["timings"]["load_s"], "basis_gram_s": rec["timings"]["gram_s"],
        "basis_write_s": rec["timings"]["write_s"],
        "basis_over_read": basis_s / read_s, "goal_basis_over_read": GOAL_BASIS_OVER_READ,
        "read_bytes_s": read_bytes_s, "read_bytes_s_all": rb_reads, "basis_over_read_bytes": basis_s / read_bytes_s,
        **mem, "goal_peak_ram_over_block": GOAL_PEAK_RAM_OVER_BLOCK, "explained_variance_top_dim": evr,
        "trajectory_write_s": write_s,
        "page_cache_resident_before": cache, "read_s_after_reference": read_after_ref,
        "ray_worker_niceness": args.ray_worker_niceness,
        "loadavg_start": load0, "loadavg_end": os.getloadavg()[0], "cpus": os.cpu_count(),
    }
    if ref is not None:
        fig.update({
            "reference_s": ref["total_s"], "reference_load_s": ref["load_s"], "reference_pca_s": ref["pca_s"],
            "reference_save_s": ref["save_s"], "reference_svd_solver": ref["svd_solver"],
            "reference_peak_bytes": int(ref["peak_rss"]),
            "reference_rss_after_imports_bytes": int(ref["rss_after_imports"]),
            "reference_over_raysub_time": ref["total_s"] / basis_s,
            "reference_over_raysub_ram": reference_over_raysub_ram(ref["peak_rss"], mem),
            **cmp,
        })
    fig.update({**floor_fig, "stream_basis_s_all": stream_runs, "floor_write_s_all": floor_writes,
                "floor_gemm_s_all": floor_gemms, "stream_basis_load_s": srec["timings"]["load_s"],
                "stream_basis_write_s": srec["timings"]["write_s"], **stream_cmp,
                "goal_stream_basis_over_posthoc": GOAL_STREAM_OVER_POSTHOC,
                "goal_stream_basis_over_floor": GOAL_STREAM_OVER_FLOOR,
                "stream_basis_over_posthoc_ok": floor_fig["stream_basis_over_posthoc"] <= GOAL_STREAM_OVER_POSTHOC,
                "stream_basis_over_floor_ok": floor_fig["stream_basis_over_floor"] <= GOAL_STREAM_OVER_FLOOR})
    if overhead is not None:
        fig.update({**overhead, "goal_stream_gram_overhead": GOAL_STREAM_GRAM_OVERHEAD,
                    "stream_gram_overhead_ok": overhead["stream_gram_overhead"] <= GOAL_STREAM_GRAM_OVERHEAD})
    fig["basis_over_read_ok"] = fig["basis_over_read"] <= GOAL_BASIS_OVER_READ
    fig["peak_ram_over_block_ok"] = over_block <= GOAL_PEAK_RAM_OVER_BLOCK
    fig["wall_s"] = time.perf_counter() - t_start

    rows = [
        ("plain sequential read (median)", f"{read_s:8.2f} s", "  ".join(f"{x:.2f}" for x in reads)
         + f"  ({written / read_s / 2**30:.2f} GiB/s; pyarrow open_input_file().read_buffer())"),
        ("RunDir.read_bytes read (median)", f"{read_bytes_s:8.2f} s", "  ".join(f"{x:.2f}" for x in rb_reads)
         + f"  ({written / read_bytes_s / 2**30:.2f} GiB/s; raysub's reader, no checksum)"),
        ("raysub build_basis (median)", f"{basis_s:8.2f} s", "  ".join(f"{x:.2f}" for x in basis_runs)),
        ("  slowest actor's phases", "", f"load {fig['basis_load_s']:.2f}  gram {fig['basis_gram_s']:.2f}  "
                                         f"write {fig['basis_write_s']:.2f} s (load = read + sha256 + decode)"),
        ("  basis / read", f"{fig['basis_over_read']:8.2f} x",
         f"goal <= {GOAL_BASIS_OVER_READ}: {'met' if fig['basis_over_read_ok'] else 'NOT met'}"),
        ("  basis / RunDir.read_bytes read", f"{fig['basis_over_read_bytes']:8.2f} x", "informative"),
        ("  actor (peak-start) RSS / block", f"{over_block:8.2f} x",
         f"goal <= {GOAL_PEAK_RAM_OVER_BLOCK}: {'met' if fig['peak_ram_over_block_ok'] else 'NOT met'}"
         f"; block {gib(block_bytes)}"),
        ("  actor peak RSS / block", f"{abs_over_block:8.2f} x", f"largest actor peak RSS {gib(actor_peak)}"),
        ("  raysub peak RSS (all actors)", f"{mem['raysub_peak_rss_sum_bytes'] / 2**30:8.2f} GiB",
         f"sum of the {len(mem['raysub_actor_peak_rss_bytes_all'])} actors' peaks (all resident at once); "
         f"{', '.join(mem['raysub_peak_rss_source'])}"),
    ]
    rows += [
        ("streamed basis stage (median)", f"{stream_s:8.2f} s", "  ".join(f"{x:.2f}" for x in stream_runs)
         + f"  (slowest task: load {srec['timings']['load_s']:.2f}, write {srec['timings']['write_s']:.2f})"),
        ("  stream / post-hoc basis", f"{floor_fig['stream_basis_over_posthoc']:8.3f} x",
         f"goal <= {GOAL_STREAM_OVER_POSTHOC}: {'met' if fig['stream_basis_over_posthoc_ok'] else 'NOT met'}"),
        ("  physical floor", f"{floor_fig['floor_s']:8.2f} s",
         f"read {read_s:.2f} + write {floor_fig['floor_write_s']:.2f} + float32 GEMM {floor_fig['floor_gemm_s']:.2f}"),
        ("  stream / floor", f"{floor_fig['stream_basis_over_floor']:8.2f} x",
         f"goal <= {GOAL_STREAM_OVER_FLOOR}: {'met' if fig['stream_basis_over_floor_ok'] else 'NOT met'}"),
        ("  stream vs post-hoc sv rel diff", f"{stream_cmp['stream_sv_max_rel_diff']:8.1e}", "top dim"),
        ("  stream vs post-hoc max angle", f"{stream_cmp['stream_max_angle_deg']:8.1e} deg", "sine-based"),
    ]
    if overhead is not None:
        rows += [
            ("streaming Gram overhead", f"{overhead['stream_gram_overhead']:8.5f} x",
             f"goal <= {GOAL_STREAM_GRAM_OVERHEAD}: {'met' if fig['stream_gram_overhead_ok'] else 'NOT met'}; "
             f"{overhead['overhead_model']} ({overhead['overhead_params']:,} params) batch "
             f"{overhead['overhead_batch']}, {overhead['overhead_snapshots']} snapshots every "
             f"{overhead['overhead_steps_per_snapshot']} steps"),
            ("  step with / without stream", f"{overhead['step_s_with_over_without']:8.3f} x",
             f"{overhead['step_s_with_stream'] * 1e3:.1f} vs {overhead['step_s_without_stream'] * 1e3:.1f} ms "
             "(interleaved rounds; noise)"),
            ("  window's adds + checks", f"{overhead['stream_window_s']:8.3f} s",
             f"slowest add {overhead['stream_add_max_s'] * 1e3:.1f} ms"),
        ]
    if ref is not None:
        rows += [
            ("DLDR reference (sklearn PCA)", f"{ref['total_s']:8.2f} s",
             f"load {ref['load_s']:.2f}  pca {ref['pca_s']:.2f} ({ref['svd_solver']})  save {ref['save_s']:.2f}"),
            ("  read after the reference", f"{read_after_ref:8.2f} s",
             "informative (its RAM use can evict the page cache); not in the median"),
            ("  reference peak RSS", f"{ref['peak_rss'] / 2**30:8.2f} GiB",
             f"t×n matrix {gib(ref['matrix_bytes'])}"),
            ("  reference / raysub time", f"{fig['reference_over_raysub_time']:8.2f} x", ""),
            ("  reference / raysub peak RAM", f"{fig['reference_over_raysub_ram']:8.2f} x",
             "reference process peak RSS / sum of the raysub actors' peak RSS"),
            ("  max rel. singular-value diff", f"{cmp['sv_max_rel_diff']:8.1e}", "reference vs raysub, top dim"),
            ("  largest principal angle", f"{cmp['max_principal_angle_deg']:8.1e} deg",
             f"min |cos| of matched components {cmp['min_component_abs_cosine']:.6f}"),
        ]
    print()
    print(f"raysub basis benchmark: n={n:,}  t={t}  dim={dim}  blocks={nblk}  trajectory {gib(written)}  "
          f"explained variance (top {dim}) {evr:.4f}")
    res_txt = ", ".join(f"{k} {'n/a' if v is None else f'{100 * v:.0f}%'}" for k, v in cache.items())
    print("page cache: warm - the trajectory was written just before, so reads are served from the page cache as "
          "far as it holds it;")
    print(f"  resident fraction (mincore) before each measurement: {res_txt}")
    print(f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; Ray worker niceness "
          f"{args.ray_worker_niceness}")
    print("-" * 100)
    for name, val, note in rows:
        print(f"{name:34s} {val:>14s}   {note}")
    print("-" * 100)
    print_figures(fig)


if __name__ == "__main__":  # the reference's own process: `python -m raysub.bench.basis --reference-child`
    main()
