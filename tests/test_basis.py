"""The distributed Gram basis against a dense reference (numpy SVD of the centred trajectory)."""
import numpy as np
import pytest
import torch

from raysub.bench.basis_costs import MeasuredBlockGram
from raysub.bench.harness import peak_rss_bytes, reset_peak_rss, rss_bytes
from raysub.pipeline import basis as basis_mod
from raysub.pipeline.basis import BlockGram, build_basis, load_basis, solve_spectrum
from raysub.errors import ConfigError, StorageError
from raysub.pipeline.sample import collect_trajectory, write_snapshot
from raysub.storage import RunDir, block_bounds, decode_columns

T, N, RANK = 24, 5003, 6


def planted_trajectory(seed=0):
    """θ_s = θ0 + Σ_k a_k(s) u_k + small noise: a rank-6 subspace with decaying scales, stored in float32."""
    rng = np.random.default_rng(seed)
    theta0 = rng.normal(size=N)
    Q, _ = np.linalg.qr(rng.normal(size=(N, RANK)))
    coef = rng.normal(size=(T, RANK)) * np.array([10.0, 5.0, 3.0, 1.0, 0.5, 0.2])
    W = theta0 + coef @ Q.T + 1e-3 * rng.normal(size=(T, N))
    return W.astype(np.float32)


def write_trajectory(run: RunDir, W_TN: np.ndarray, num_blocks: int):
    bounds = block_bounds(W_TN.shape[1], num_blocks)
    for b in range(num_blocks):
        index = []
        for s in range(W_TN.shape[0]):
            write_snapshot(run, torch.from_numpy(W_TN[s]), b, bounds, s, s, 0, index)
    return collect_trajectory(run)


def dense_reference(W_TN, dim):
    X = W_TN.astype(np.float64)
    X = X - X.mean(axis=0)
    A, S, Bt = np.linalg.svd(X, full_matrices=False)
    A, Bt = A[:, :dim], Bt[:dim]
    # raysub's sign convention: largest-|.| entry of each right singular vector (over snapshots) positive
    signs = np.sign(A[np.abs(A).argmax(axis=0), np.arange(dim)])
    return S, Bt * signs[:, None]


@pytest.fixture(scope="module")
def trajectory():
    return planted_trajectory()


@pytest.mark.parametrize("num_blocks", [1, 2, 5])
def test_matches_dense_svd(ray_session, tmp_path, trajectory, num_blocks):
    dim = 8
    run = RunDir(str(tmp_path / "run"))
    blocks, shards = write_trajectory(run, trajectory, num_blocks)
    record = build_basis(run, dim, blocks, shards, dtype="float64")
    U_DN = load_basis(run.uri, dim)
    assert U_DN.dtype == np.float64 and U_DN.shape == (dim, N)

    S_ref, U_ref = dense_reference(trajectory, dim)
    sv = np.array(record["singular_values"])
    np.testing.assert_allclose(sv[:dim], S_ref[:dim], rtol=1e-9)
    # orthonormal columns
    np.testing.assert_allclose(U_DN @ U_DN.T, np.eye(dim), atol=1e-10)
    # principal angles between the subspaces (top RANK are well separated; the noise tail is near-degenerate)
    cosines = np.linalg.svd(U_ref[:RANK] @ U_DN[:RANK].T, compute_uv=False)
    assert np.arccos(np.clip(cosines.min(), -1, 1)) <= 1e-6
    # the sign convention makes the vectors themselves agree, not just the span
    np.testing.assert_allclose(U_DN[:RANK], U_ref[:RANK], atol=1e-7)
    ratio = np.array(record["explained_variance_ratio"])
    np.testing.assert_allclose(ratio.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(ratio, S_ref**2 / (S_ref**2).sum(), rtol=1e-9, atol=1e-15)


def test_float32_storage_is_close(ray_session, tmp_path, trajectory):
    run = RunDir(str(tmp_path / "run"))
    blocks, shards = write_trajectory(run, trajectory, 2)
    build_basis(run, 5, blocks, shards)  # default float32 storage: the float64 product rounded once
    U_DN = load_basis(run.uri).astype(np.float64)
    np.testing.assert_allclose(U_DN @ U_DN.T, np.eye(5), atol=1e-8)


def test_float32_basis_is_a_rounded_float64_product(tmp_path, trajectory):
    """The stored float32 basis is the float64 product W̃ᵀ V Σ⁻¹ rounded once: orthonormal to ~1e-9 (each entry
    off by ≤ 2^-24 relative, errors averaging over N = 5003 coordinates). Running the product itself in float32
    (proj cast to float32, T-term sums rounded at every step) gives max|UUᵀ − I| = 1.5e-7 here (up to 1.4e-6 on
    larger runs). One block actor, called directly (no Ray): what build_basis runs in every actor."""
    dim = 5
    run = RunDir(str(tmp_path / "run"))
    blocks, shards = write_trajectory(run, trajectory, 1)
    entries = [(s["path"], shards[s["path"]]) for s in blocks[0]["snapshots"]]
    actor = BlockGram(run.uri, 0, entries, N)
    spec = solve_spectrum(actor.gram()["gram"], dim)
    written = actor.write_basis(spec["V"] / spec["singular_values"][:dim], "float32")
    U_DN = decode_columns(run.read_bytes(written["path"], written["sha256"]))
    assert U_DN.dtype == np.float32 and U_DN.shape == (dim, N)
    U_DN = U_DN.astype(np.float64)
    assert np.abs(U_DN @ U_DN.T - np.eye(dim)).max() <= 1e-8


MB = 2**20


def _touch(nbytes: int) -> None:
    """Allocate ``nbytes``, write every page (so it is resident), and free it again."""
    buf = np.ones(nbytes // 8)
    assert buf.sum() == buf.size
    del buf


def test_peak_rss_is_the_kernels_high_water_mark():
    """Issue 11 (basis bench, peak RSS): the peak is the kernel's high-water mark, so a 200 MB buffer that was
    allocated and freed still counts though the current RSS no longer holds it (a sampled RSS would miss it)."""
    source = reset_peak_rss()
    assert source in ("vmhwm_since_reset", "vmhwm_lifetime", "ru_maxrss_lifetime")
    before = rss_bytes()
    _touch(200 * MB)
    now = rss_bytes()
    assert peak_rss_bytes() >= before + 190 * MB
    assert now < before + 100 * MB  # freed: the current RSS would not show it


def test_block_actor_peak_counts_a_transient_buffer(tmp_path, trajectory, monkeypatch):
    """Issue 11 (basis bench, peak RSS): a block actor's reported peak_rss covers memory held between its RSS
    samples. A 200 MB temporary inside the shard decoding (freed before the actor looks at its RSS) must appear in
    peak_rss; the old sampled `_track` reported only the RSS at its sample points and missed it. One actor, called
    directly (no Ray)."""
    run = RunDir(str(tmp_path / "run"))
    blocks, shards = write_trajectory(run, trajectory, 1)
    entries = [(s["path"], shards[s["path"]]) for s in blocks[0]["snapshots"]]
    decode, calls = basis_mod.decode_vector, []

    def decode_with_temporary(buf, out=None):
        calls.append(1)
        if len(calls) == 2:
            _touch(200 * MB)
        return decode(buf, out=out)

    monkeypatch.setattr(basis_mod, "decode_vector", decode_with_temporary)
    actor = MeasuredBlockGram(run.uri, 0, entries, N)  # the benchmark's BlockGram (the stage measures no memory)
    spec = solve_spectrum(actor.gram()["gram"], 3)
    written = actor.write_basis(spec["V"] / spec["singular_values"][:3])
    assert written["peak_rss_source"] in ("vmhwm_since_reset", "vmhwm_lifetime", "ru_maxrss_lifetime")
    assert written["peak_rss"] >= written["start_rss"] + 190 * MB
    assert rss_bytes() < written["start_rss"] + 100 * MB


def test_corrupted_shard_is_refused(ray_session, tmp_path, trajectory):
    run = RunDir(str(tmp_path / "run"))
    blocks, shards = write_trajectory(run, trajectory, 2)
    path = run.path(blocks[1]["snapshots"][3]["path"])
    data = bytearray(open(path, "rb").read())
    data[-100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(Exception) as exc:
        build_basis(run, 4, blocks, shards)
    assert "corrupted" in str(exc.value)
    assert not run.exists("basis/spectrum.json")


def test_missing_shard_is_refused(ray_session, tmp_path, trajectory):
    run = RunDir(str(tmp_path / "run"))
    blocks, shards = write_trajectory(run, trajectory, 2)
    run.delete(blocks[0]["snapshots"][0]["path"])
    with pytest.raises(Exception) as exc:
        build_basis(run, 4, blocks, shards)
    assert "missing" in str(exc.value)
    assert not run.exists("basis/spectrum.json")


def test_impossible_dimensions():
    G = np.diag([3.0, 2.0, 1.0, 0.0])
    with pytest.raises(ConfigError, match="basis.dim=4"):
        solve_spectrum(G, 4)
    with pytest.raises(ConfigError, match="basis.dim=0"):
        solve_spectrum(G, 0)
    with pytest.raises(ConfigError, match="numerical rank 3"):
        solve_spectrum(np.diag([3.0, 2.0, 1.0, 0.0, 0.0]), 4)
    spec = solve_spectrum(G, 2)
    assert spec["rank"] == 3 and spec["V"].shape == (4, 2)


def test_load_basis_errors(tmp_path):
    with pytest.raises(StorageError, match="no basis"):
        load_basis(str(tmp_path))
