"""Benchmark: raysub's distributed DLDR basis vs. a plain read of the trajectory vs. the DLDR reference PCA.

What it measures
    A synthetic trajectory of ResNet-18 size (n = 11,689,512 parameters, t = 100 snapshots, 4.7 GB of
    float32) is written exactly as raysub's sampler writes it (`raysub.pipeline.sample._write_snapshot`): the flat
    vector is cut into ``--num-blocks`` contiguous blocks by `raysub.storage.block_bounds` (as 4 DDP ranks
    would), every snapshot of every block is one Arrow shard written with `RunDir.write_bytes(snapshot_rel(b, s),
    encode_vector(values, {...}))`, and every block has its ``index.json`` with the shards' sha256. The
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
                   i.e. read (its actors memory-map local shards) + sha256 verify + distributed Gram + eigh
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
    Correctness: the reference's singular values and components are compared with raysub's (max relative
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
(basis_over_read, peak_ram_over_block, reference_over_raysub_time, reference_over_raysub_ram — the reference's
peak RSS over the sum of raysub's actors' peaks —, raw seconds and bytes, n, t, dim, num_blocks, agreement with
the reference).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from raysub.storage import (RunDir, block_bounds, block_index_rel, decode_vector, encode_vector,  # noqa: E402
                            snapshot_rel)

RESNET18_PARAMS = 11_689_512
GOAL_BASIS_OVER_READ = 2.0
GOAL_PEAK_RAM_OVER_BLOCK = 1.5
THETA0_STD = 0.05


def log(msg: str) -> None:
    print(f"[bench.basis {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


# ------------------------------------------------------------------------------------------- trajectory


def planted_coefficients(t: int, rank: int, decay: float, scale: float) -> np.ndarray:
    """a_k(s) = scale·decay^(k-1)·√(2/t)·cos(πk(s+½)/t), k = 1..rank: t×rank, zero-mean orthogonal columns."""
    s = np.arange(t) + 0.5
    k = np.arange(1, rank + 1)
    amp = scale * decay ** (k - 1) * np.sqrt(2.0 / t)
    return (amp * np.cos(np.pi * np.outer(s, k) / t)).astype(np.float32)


def write_trajectory(run: RunDir, n: int, t: int, num_blocks: int, rank: int, decay: float, scale: float,
                     noise: float, seed: int, steps_per_snapshot: int = 391) -> int:
    """Write the synthetic trajectory the way the sampler does; returns the bytes written (shards only)."""
    bounds = block_bounds(n, num_blocks)
    A_TK = planted_coefficients(t, rank, decay, scale)
    written = 0
    t0 = time.perf_counter()
    for b, (start, stop) in enumerate(bounds):
        nb = stop - start
        rng = np.random.default_rng([seed, b])
        theta0 = rng.standard_normal(nb, dtype=np.float32)
        theta0 *= THETA0_STD
        U_KN = rng.standard_normal((rank, nb), dtype=np.float32)  # rank·nb·4 bytes (0.7 GB at the default)
        index = []
        for s in range(t):
            values = A_TK[s] @ U_KN
            values += theta0
            if noise > 0:
                eps = rng.standard_normal(nb, dtype=np.float32)
                eps *= noise
                values += eps
                del eps
            step = s * steps_per_snapshot
            rel = snapshot_rel(b, s)
            buf = encode_vector(values, {"snapshot": s, "step": step, "block": b})
            checksum = run.write_bytes(rel, buf)
            written += buf.size
            del buf, values
            index.append({"snapshot": s, "step": step, "epoch": s, "path": rel, "sha256": checksum})
            if (s + 1) % max(1, t // 4) == 0 or s + 1 == t:
                log(f"  wrote block {b + 1}/{num_blocks} snapshot {s + 1}/{t} "
                    f"({gib(written)}, {time.perf_counter() - t0:.0f}s)")
        run.write_json(block_index_rel(b), {"block": b, "start": start, "stop": stop, "snapshots": index})
        del U_KN, theta0
    return written


def resident_fraction(run: RunDir, blocks) -> float | None:
    """Fraction of the trajectory's pages in the page cache (mincore(2)); None if not a local Linux path."""
    import ctypes
    import mmap

    if "://" in run.uri or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        page = mmap.PAGESIZE
        resident = total = 0
        for b in blocks:
            for s in b["snapshots"]:
                path = run.path(s["path"])
                size = os.path.getsize(path)
                if size == 0:
                    continue
                fd = os.open(path, os.O_RDONLY)
                try:
                    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                    if addr in (None, ctypes.c_void_p(-1).value):
                        return None
                    npages = (size + page - 1) // page
                    vec = (ctypes.c_ubyte * npages)()
                    rc = libc.mincore(ctypes.c_void_p(addr), size, vec)
                    libc.munmap(ctypes.c_void_p(addr), size)
                    if rc != 0:
                        return None
                    resident += sum(v & 1 for v in bytes(vec))
                    total += npages
                finally:
                    os.close(fd)
        return resident / total if total else None
    except (OSError, AttributeError):
        return None


def read_all(run: RunDir, blocks, how: str = "plain") -> float:
    """One sequential read of every shard's bytes, single process; returns seconds.

    how="plain": ``fs.open_input_file(path).read_buffer()`` (one read of the known size; any pyarrow filesystem).
    how="read_bytes": raysub's `RunDir.read_bytes` without checksum (what raysub's block actors call).
    """
    t0 = time.perf_counter()
    total = 0
    for b in blocks:
        for s in b["snapshots"]:
            if how == "plain":
                with run.fs.open_input_file(run.path(s["path"])) as src:
                    buf = src.read_buffer()
            else:
                buf = run.read_bytes(s["path"])
            total += buf.size
            del buf
    return time.perf_counter() - t0


# -------------------------------------------------------------------------------- the DLDR reference way


def vm_hwm_bytes() -> int:
    """This process's peak RSS (VmHWM). Unlike ru_maxrss it is not inherited from the parent across fork/exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reference_child(args) -> None:
    """Runs in its own process: load the whole t×n matrix, sklearn PCA, save the components (the reference)."""
    from sklearn.decomposition import PCA

    run = RunDir(args.reference_child)
    names = [d for d in run.listdir("trajectory") if d.startswith("block_")]
    blocks = [run.read_json(f"trajectory/{d}/index.json") for d in names]
    t = len(blocks[0]["snapshots"])
    rss_after_imports = vm_hwm_bytes()

    t0 = time.perf_counter()
    W = []
    for s in range(t):  # as the reference's get_model_param_vec: one flat vector per snapshot
        parts = []
        for b in blocks:  # the same plain read as read_s (not RunDir.read_bytes' slower chunked stream read)
            with run.fs.open_input_file(run.path(b["snapshots"][s]["path"])) as src:
                parts.append(decode_vector(src.read_buffer()))
        W.append(np.concatenate(parts))
    W = np.array(W)  # the reference's `W = np.array(W)`: t×n float32
    t1 = time.perf_counter()
    np.random.seed(args.seed)
    pca = PCA(n_components=args.dim)
    pca.fit_transform(W)
    P = np.array(pca.components_)
    t2 = time.perf_counter()
    np.save(args.ref_out, P)
    t3 = time.perf_counter()
    peak = vm_hwm_bytes()
    out = {"load_s": t1 - t0, "pca_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0, "peak_rss": peak,
           "rss_after_imports": rss_after_imports, "matrix_bytes": int(W.nbytes), "svd_solver": pca._fit_svd_solver,
           "singular_values": pca.singular_values_.astype(float).tolist(),
           "explained_variance_ratio": pca.explained_variance_ratio_.astype(float).tolist()}
    print(json.dumps(out), flush=True)


def run_reference(run: RunDir, dim: int, ref_out: str, seed: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--reference-child", run.uri, "--dim", str(dim),
           "--ref-out", ref_out, "--seed", str(seed)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"reference subprocess failed with exit code {proc.returncode} "
                           f"(-9 means it was killed, probably out of memory): {proc.stdout[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


def compare_bases(run: RunDir, ref_npy: str, dim: int, raysub_sv, ref_sv, chunk: int = 1 << 18) -> dict:
    """Largest principal angle between raysub's and the reference's D-dim subspaces; singular-value agreement."""
    from raysub.pipeline.basis import load_basis

    B = load_basis(run.uri, dim)  # D×N float32, raysub's
    P = np.load(ref_npy, mmap_mode="r")  # D×N float32, the reference's
    assert B.shape == P.shape, (B.shape, P.shape)
    M = np.zeros((dim, dim))
    Gb = np.zeros((dim, dim))
    Gp = np.zeros((dim, dim))
    for c in range(0, B.shape[1], chunk):
        b = B[:, c : c + chunk].astype(np.float64)
        p = np.asarray(P[:, c : c + chunk], dtype=np.float64)
        M += p @ b.T
        Gb += b @ b.T
        Gp += p @ p.T
    # orthonormalise both (float32 storage leaves them orthonormal only to ~1e-7) before the angles
    Lb, Lp = np.linalg.cholesky(Gb), np.linalg.cholesky(Gp)
    C = np.linalg.solve(Lp, M)
    C = np.linalg.solve(Lb, C.T).T
    cosines = np.clip(np.linalg.svd(C, compute_uv=False), -1.0, 1.0)
    angles = np.arccos(cosines)
    diag_cos = np.abs(np.diag(M)) / np.sqrt(np.diag(Gb) * np.diag(Gp))
    rs = np.asarray(raysub_sv[:dim], dtype=np.float64)
    fs = np.asarray(ref_sv[:dim], dtype=np.float64)
    rel = np.abs(fs - rs) / rs
    return {"sv_max_rel_diff": float(rel.max()), "max_principal_angle_rad": float(angles.max()),
            "max_principal_angle_deg": float(np.degrees(angles.max())),
            "min_component_abs_cosine": float(diag_cos.min()),
            "basis_orthonormality_err": float(np.abs(Gb - np.eye(dim)).max())}


# ----------------------------------------------------------------------------------------------- memory


def raysub_memory(blocks) -> dict:
    """raysub's memory figures from a basis record's "blocks" entries (one per block actor).

    Every block actor holds its block from the Gram pass to the write pass, so all of them are resident at once:
    raysub's footprint is the sum of the actors' peaks (an upper bound: their peaks need not coincide). The
    per-actor ratios compare one actor with its own block.
    """
    peaks = [int(b["peak_rss"]) for b in blocks]
    return {
        "peak_ram_over_block": max((b["peak_rss"] - b["start_rss"]) / b["block_bytes"] for b in blocks),
        "peak_rss_over_block_abs": max(b["peak_rss"] / b["block_bytes"] for b in blocks),
        "raysub_actor_peak_rss_bytes": max(peaks),
        "raysub_actor_peak_rss_bytes_all": peaks,
        "raysub_peak_rss_sum_bytes": sum(peaks),
        "raysub_peak_rss_source": sorted({b.get("peak_rss_source", "sampled") for b in blocks}),
        "block_bytes": max(int(b["block_bytes"]) for b in blocks),
    }


def reference_over_raysub_ram(reference_peak_rss: int, mem: dict) -> float:
    """The reference process's peak RSS over raysub's: the sum of the block actors' peaks (`raysub_memory`)."""
    return reference_peak_rss / mem["raysub_peak_rss_sum_bytes"]


# ------------------------------------------------------------------------------------------------- main


def init_ray(worker_niceness: int = 0):
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
        reads, basis_runs, records = [], [], []
        read_all(run, blocks)  # warm-up (and pulls back anything evicted)
        read_all(run, blocks, "read_bytes")
        reads.append(timed_read("read 1"))

        log(f"starting Ray (num_cpus={os.cpu_count()}, worker niceness {args.ray_worker_niceness}) ...")
        ray = init_ray(args.ray_worker_niceness)
        from raysub.pipeline.basis import build_basis

        for r in range(args.repeats):
            label = f"basis {r + 1}"
            cache[label] = resident_fraction(run, blocks)
            log(f"raysub build_basis (repeat {r + 1}/{args.repeats}; page-cache resident before: "
                f"{pct(cache[label])}) ...")
            t0 = time.perf_counter()
            rec = build_basis(run, dim, blocks, shards)
            basis_runs.append(time.perf_counter() - t0)
            records.append(rec)
            tm = rec["timings"]
            log(f"{label}: basis_s = {basis_runs[-1]:.2f}s (slowest actor: load {tm['load_s']:.2f}s, gram "
                f"{tm['gram_s']:.2f}s, write {tm['write_s']:.2f}s)")
            reads.append(timed_read(f"read {r + 2}"))
        ray.shutdown()

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
    print(json.dumps(fig), flush=True)


if __name__ == "__main__":
    main()
