"""The basis benchmark's trajectory and references (`raysub.bench.basis`): a planted trajectory written as
the sampler writes it, the plain read it is measured against, the scikit-learn reference (its own process)
and the comparisons of bases."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
import ctypes
import mmap

import numpy as np

from raysub.bench.harness import vmhwm_bytes
from raysub.runs import layout
from raysub.storage import RunDir, block_bounds, block_index_rel, decode_vector, encode_vector, snapshot_rel
from raysub.storage import decode_columns

ROOT = Path(__file__).resolve().parents[2]  # the checkout the reference process imports raysub from
RESNET18_PARAMS = 11_689_512
GOAL_BASIS_OVER_READ = 2.0
GOAL_PEAK_RAM_OVER_BLOCK = 1.5
GOAL_STREAM_OVER_POSTHOC = 0.25
GOAL_STREAM_OVER_FLOOR = 1.5
GOAL_STREAM_GRAM_OVERHEAD = 1.02
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



def reference_child(args) -> None:
    """Runs in its own process: load the whole t×n matrix, sklearn PCA, save the components (the reference)."""
    # heavy: scikit-learn loads here, not when this module is imported
    from sklearn.decomposition import PCA

    run = RunDir(args.reference_child)
    names = [d for d in run.listdir(layout.TRAJECTORY) if d.startswith("block_")]
    blocks = [run.read_json(f"{layout.TRAJECTORY}/{d}/index.json") for d in names]
    t = len(blocks[0]["snapshots"])
    rss_after_imports = vmhwm_bytes()

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
    peak = vmhwm_bytes()
    out = {"load_s": t1 - t0, "pca_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0, "peak_rss": peak,
           "rss_after_imports": rss_after_imports, "matrix_bytes": int(W.nbytes), "svd_solver": pca._fit_svd_solver,
           "singular_values": pca.singular_values_.astype(float).tolist(),
           "explained_variance_ratio": pca.explained_variance_ratio_.astype(float).tolist()}
    print(json.dumps(out), flush=True)


def run_reference(run: RunDir, dim: int, ref_out: str, seed: int) -> dict:
    cmd = [sys.executable, "-m", "raysub.bench.basis", "--reference-child", run.uri, "--dim", str(dim),
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


def cross_products(B, P, chunk: int = 1 << 18):
    """(P Bᵀ, B Bᵀ, P Pᵀ) in float64 for two D×N bases (arrays or memory maps), a chunk of columns at a time."""
    dim = B.shape[0]
    M, Gb, Gp = np.zeros((dim, dim)), np.zeros((dim, dim)), np.zeros((dim, dim))
    for c in range(0, B.shape[1], chunk):
        b = np.asarray(B[:, c : c + chunk], dtype=np.float64)
        p = np.asarray(P[:, c : c + chunk], dtype=np.float64)
        M += p @ b.T
        Gb += b @ b.T
        Gp += p @ p.T
    return M, Gb, Gp


def max_principal_angle(B, P, chunk: int = 1 << 18):
    """The largest principal angle (radians) between the row spaces of two D×N bases, and their cross products.

    Both are orthonormalised first (float32 storage leaves them orthonormal only to ~1e-7): B_o = L_B⁻¹B,
    P_o = L_P⁻¹P. The angle is taken from its sine, in a second pass over the columns: the residual
    R = B_o − (B_o P_oᵀ) P_o of B_o off P's span, sin²θ the eigenvalues of R Rᵀ. arccos of a cosine near 1 — or
    1 − cos² — cannot resolve angles below ~1e-8 rad (cos(1e-9) is 1.0 in float64); the residual can.

    Returns:
        (angle, M = P Bᵀ, Gb = B Bᵀ, Gp = P Pᵀ).
    """
    M, Gb, Gp = cross_products(B, P, chunk)
    Lb, Lp = np.linalg.cholesky(Gb), np.linalg.cholesky(Gp)
    C = np.linalg.solve(Lp, np.linalg.solve(Lb, M.T).T).T  # B_o P_oᵀ = L_B⁻¹ (B Pᵀ) L_P⁻ᵀ
    dim = B.shape[0]
    S = np.zeros((dim, dim))
    for c in range(0, B.shape[1], chunk):
        b = np.linalg.solve(Lb, np.asarray(B[:, c : c + chunk], dtype=np.float64))
        p = np.linalg.solve(Lp, np.asarray(P[:, c : c + chunk], dtype=np.float64))
        R = b - C @ p
        S += R @ R.T
    sin2 = np.linalg.eigvalsh(S)
    return float(np.arcsin(np.sqrt(np.clip(sin2.max(), 0.0, 1.0)))), M, Gb, Gp


def sv_max_rel_diff(raysub_sv, other_sv, dim: int) -> float:
    rs = np.asarray(raysub_sv[:dim], dtype=np.float64)
    fs = np.asarray(other_sv[:dim], dtype=np.float64)
    return float((np.abs(fs - rs) / rs).max())


def compare_bases(run: RunDir, ref_npy: str, dim: int, raysub_sv, ref_sv) -> dict:
    """Largest principal angle between raysub's and the reference's D-dim subspaces; singular-value agreement."""
    # imported per call, not at the top: tests monkeypatch these names on the module they come from
    from raysub.pipeline.basis import load_basis

    B = load_basis(run.uri, dim)  # D×N float32, raysub's
    P = np.load(ref_npy, mmap_mode="r")  # D×N float32, the reference's
    assert B.shape == P.shape, (B.shape, P.shape)
    angle, M, Gb, Gp = max_principal_angle(B, P)
    diag_cos = np.abs(np.diag(M)) / np.sqrt(np.diag(Gb) * np.diag(Gp))
    return {"sv_max_rel_diff": sv_max_rel_diff(raysub_sv, ref_sv, dim), "max_principal_angle_rad": angle,
            "max_principal_angle_deg": float(np.degrees(angle)),
            "min_component_abs_cosine": float(diag_cos.min()),
            "basis_orthonormality_err": float(np.abs(Gb - np.eye(dim)).max())}


# ---------------------------------------------------------------------------------------- the streamed path


def streamed_gram(run: RunDir, blocks, tile: int = 1 << 16) -> np.ndarray:
    """The T×T Gram relative to θ0 that the sampling ranks stream (`raysub.pipeline.stream_gram.StreamGram`): per
    block the float32 snapshots' differences from θ0 in float64, summed over the blocks as the all-reduce sums the
    ranks' rows. Made here in one pass per block: the bench times the basis stage that reads it (its making during
    sampling is `stream_gram_overhead`)."""
    t = len(blocks[0]["snapshots"])
    K = np.zeros((t, t))
    for b in blocks:
        W = np.stack([decode_vector(run.read_buffer(s["path"], s["sha256"])) for s in b["snapshots"]])
        for start in range(0, W.shape[1], tile):
            X = W[:, start : start + tile].astype(np.float64)
            X -= X[0]
            K += X @ X.T
        del W
    return K


def read_basis_record(run: RunDir, record: dict, dim: int) -> np.ndarray:
    """The D×N basis a `build_basis` record names (its shards verified against the record's sha256)."""

    return np.concatenate([decode_columns(run.read_bytes(b["path"], b["sha256"]), dim) for b in record["blocks"]],
                          axis=1)


def compare_streamed(run: RunDir, posthoc: dict, stream: dict, dim: int) -> dict:
    """The streamed basis against the post-hoc one: singular values and the largest principal angle."""
    B = read_basis_record(run, posthoc, dim)
    S = read_basis_record(run, stream, dim)
    angle = max_principal_angle(B, S)[0]
    return {"stream_sv_max_rel_diff": sv_max_rel_diff(posthoc["singular_values"], stream["singular_values"], dim),
            "stream_max_angle_deg": float(np.degrees(angle))}

