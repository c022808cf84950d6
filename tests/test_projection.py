"""Projection families: the shared matrix of checks every registered family goes through.

The rows come from the registry's metadata, not from lists here: a family registered ``random=True`` gets the
seed and unit-norm tests, one registered ``low_memory`` (or with ``low_memory_options``) the memory test.
"""
import numpy as np
import pytest
import torch

from raysub.engine.flat import FlatParams, flatten_params, param_layout
from raysub.errors import ConfigError
from raysub.projections import PROJECTIONS, MatrixProjection, Projection, check_projection, no_checks
from raysub.projections.base import META_FLAGS
from raysub.engine.task import SubspaceModel
from raysub.storage import RunDir


def families(flag):
    """Registered families whose metadata sets ``flag``."""
    return [n for n in PROJECTIONS.names() if PROJECTIONS.meta(n).get(flag)]


def low_memory_rows():
    """(family, options) pairs under which the family holds no N×D tensor."""
    rows = []
    for name in PROJECTIONS.names():
        meta = PROJECTIONS.meta(name)
        if meta.get("low_memory") or "low_memory_options" in meta:
            rows.append((name, dict(meta.get("low_memory_options", {}))))
    return rows


RANDOM = families("random")
FULL = families("full")
LOW_MEMORY = low_memory_rows()


def make_projection(name, num_params, dim, tmp_path, dtype=torch.float32, seed=0, **options):
    meta = PROJECTIONS.meta(name)
    if meta["needs_basis_run"]:  # an orthonormal stand-in for a run's basis
        Q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(num_params, dim)))
        return MatrixProjection(torch.from_numpy(Q.T.copy()), dtype=dtype)
    if meta["full"]:
        dim = num_params  # full-parameter training: D = N
    return PROJECTIONS.get(name)(num_params, dim, seed, dtype=dtype, **options)


def test_every_family_is_registered():
    assert {"dense", "sparse", "fastfood", "fastjl", "dldr", "identity"} <= set(PROJECTIONS.names())
    assert {"dense", "sparse", "fastfood", "fastjl"} <= set(RANDOM)
    assert "identity" in FULL and "dldr" in families("needs_basis_run")
    assert {"sparse", "fastfood", "fastjl"} <= {n for n, _ in LOW_MEMORY}
    assert ("dense", {"max_bytes": 0}) in LOW_MEMORY


@pytest.mark.parametrize("name", PROJECTIONS.names())
def test_every_family_declares_its_metadata(name):
    meta = PROJECTIONS.meta(name)
    for flag in META_FLAGS:
        assert isinstance(meta.get(flag), bool), (name, flag)
    assert callable(meta.get("check")), name
    assert isinstance(meta.get("low_memory_options", {}), dict), name
    assert not (meta["random"] and meta["full"]), name


@pytest.mark.parametrize("name", PROJECTIONS.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d", [(1000, 7), (4099, 300)])
def test_adjoint_identity(name, dtype, n, d, tmp_path):
    proj = make_projection(name, n, d, tmp_path, dtype)
    d = proj.dim
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(d, generator=gen, dtype=dtype)
    g = torch.randn(n, generator=gen, dtype=dtype)
    up, down = proj.lift(z), proj.project(g)
    assert up.dtype == dtype and down.dtype == dtype
    lhs, rhs = torch.dot(up, g), torch.dot(z, down)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    # relative to the size of the terms summed (the dot product itself may cancel to near 0)
    assert abs(float(lhs - rhs)) <= tol * float(up.norm() * g.norm())
    assert up.shape == (n,) and down.shape == (d,)
    assert proj.dim == d and proj.num_params == n


def assert_seed_determinism(name, tmp_path):
    z = torch.randn(20)
    a = make_projection(name, 3000, 20, tmp_path, seed=5).lift(z)
    b = make_projection(name, 3000, 20, tmp_path, seed=5).lift(z)
    c = make_projection(name, 3000, 20, tmp_path, seed=6).lift(z)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def assert_unit_norm_columns(name, n, tmp_path):
    proj = make_projection(name, n, 24, tmp_path, dtype=torch.float64)
    norms = torch.stack([proj.lift(e).norm() for e in torch.eye(24, dtype=torch.float64)])
    assert float((norms - 1).abs().max()) <= 1e-9, norms


def _held_numel(obj) -> int:
    return sum(v.numel() for v in vars(obj).values() if isinstance(v, torch.Tensor))


def assert_no_n_by_d_tensor(name, options, tmp_path):
    n, d = (1 << 14) + 3, 512
    proj = make_projection(name, n, d, tmp_path, **options)
    held = _held_numel(proj)
    # O(N) (fastfood pads to 2^15), O(D·sqrt(N)) for sparse: far below N·D = 8.4M
    assert held <= 4 * (1 << 15) + 3 * d * (int(n ** 0.5) + 1), held
    assert held < n * d / 16


@pytest.mark.parametrize("name", RANDOM)
def test_seed_determinism(name, tmp_path):
    assert_seed_determinism(name, tmp_path)


@pytest.mark.parametrize("name", RANDOM)
@pytest.mark.parametrize("n", [4099, 1 << 14])
def test_columns_have_unit_norm(name, n, tmp_path):
    assert_unit_norm_columns(name, n, tmp_path)


@pytest.mark.parametrize("name,options", LOW_MEMORY, ids=[name for name, _ in LOW_MEMORY])
def test_memory_bound_no_n_by_d_tensor(name, options, tmp_path):
    assert_no_n_by_d_tensor(name, options, tmp_path)


def test_dense_streamed_equals_stored(tmp_path):
    """Streamed and stored dense are one matrix: in float64 the columns agree bit for bit and lift/project to
    float64 round-off (≤ 1e-15 of ‖z‖ or ‖g‖, the bound on any entry). Column norms kept in float32 by the
    streamed mode alone would be off by ~3e-8 relative."""
    n, d = 40_000, 9  # more than one generation block
    stored = make_projection("dense", n, d, tmp_path, dtype=torch.float64, seed=2)
    streamed = make_projection("dense", n, d, tmp_path, dtype=torch.float64, seed=2, max_bytes=0)
    assert type(stored).__name__ == "MatrixProjection" and type(streamed).__name__ == "StreamedDenseProjection"
    for e in torch.eye(d, dtype=torch.float64):
        assert torch.equal(streamed.lift(e), stored.lift(e))
    gen = torch.Generator().manual_seed(0)
    z, g = torch.randn(d, dtype=torch.float64, generator=gen), torch.randn(n, dtype=torch.float64, generator=gen)
    assert float((streamed.lift(z) - stored.lift(z)).abs().max()) <= 1e-15 * float(z.norm())
    assert float((streamed.project(g) - stored.project(g)).abs().max()) <= 1e-15 * float(g.norm())


def test_sparse_small_n_columns_have_distinct_rows_and_unit_norm():
    """N = 4, d = 3, seed 0 drew row 1 twice with opposite signs in column 2: drawn with replacement, the ±1
    entries cancelled and left the column at zero. Drawn without replacement, every column holds exactly
    s = round(√4) = 2 entries ±1/√2 at distinct rows, so its norm is 1."""
    proj = PROJECTIONS.get("sparse")(4, 3, 0, dtype=torch.float64)
    assert proj.nnz == 3 * 2
    for j in range(3):
        rows = proj.rows[proj.cols == j]
        assert rows.unique().numel() == 2, (j, rows)
        torch.testing.assert_close(proj.vals[proj.cols == j].abs(), torch.full((2,), 2 ** -0.5, dtype=torch.float64))
    norms = torch.stack([proj.lift(e).norm() for e in torch.eye(3, dtype=torch.float64)])
    torch.testing.assert_close(norms, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", range(1, 21))
def test_sparse_every_column_has_its_nnz_distinct_rows(n):
    """At small N repeats are common (s/N = 1/√N) and redraws collide with the column's rows and with each
    other: every column must still end with exactly s distinct rows (a redraw checked only against the old
    rows, or only against the other redraws, leaves a repeat), in row order (lift's scatter locality)."""
    per_col = max(1, round(n ** 0.5))
    for seed in range(10):
        proj = PROJECTIONS.get("sparse")(n, n, seed, dtype=torch.float64)
        pairs = torch.stack([proj.rows.long(), proj.cols.long()], 1)
        assert pairs.unique(dim=0).shape[0] == n * per_col == proj.nnz, (n, seed)
        assert torch.equal(torch.bincount(proj.cols.long(), minlength=n), torch.full((n,), per_col)), (n, seed)
        assert bool((proj.rows[1:] >= proj.rows[:-1]).all())
        dense_ND = torch.stack([proj.lift(e) for e in torch.eye(n, dtype=torch.float64)], 1)
        torch.testing.assert_close(dense_ND.norm(dim=0), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n,d", [(100, 100), (300, 7), (300, 60), (1000, 11), (1000, 60)])
def test_fastfood_small_n_columns_have_unit_norm(n, d):
    """Keeping N of the L = 2^⌈log₂N⌉ rows leaves the columns of s·H G Π H B off unit norm by up to 12% at
    N = 100, 8% at 300, 2% at 1000; below EXACT_NORM_WORK every column is scaled by its exact inverse norm."""
    proj = PROJECTIONS.get("fastfood")(n, d, 0, dtype=torch.float64)
    norms = torch.stack([proj.lift(e).norm() for e in torch.eye(d, dtype=torch.float64)])
    torch.testing.assert_close(norms, torch.ones(d, dtype=torch.float64), rtol=0, atol=1e-14)


def test_fastfood_exact_norms_only_rescale_the_columns(monkeypatch):
    """Above EXACT_NORM_WORK c = 1 (B stays ±1); below, P is that same matrix with column j divided by its
    norm — not another draw, not the norm squared."""
    import raysub.projections.fastfood as fastfood

    n, d = 300, 5
    exact = PROJECTIONS.get("fastfood")(n, d, 3, dtype=torch.float64)
    monkeypatch.setattr(fastfood, "EXACT_NORM_WORK", d * exact.L - 1)
    plain = PROJECTIONS.get("fastfood")(n, d, 3, dtype=torch.float64)
    assert torch.equal(plain.B.abs(), torch.ones(d, dtype=torch.float64))
    for e in torch.eye(d, dtype=torch.float64):
        col = plain.lift(e)
        assert abs(float(col.norm()) - 1) > 1e-4  # the rescaling has something to do here
        torch.testing.assert_close(exact.lift(e), col / col.norm(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", RANDOM + FULL)
@pytest.mark.parametrize("dim", [0, -3, 1001])
def test_bad_dimension_is_one_clear_error(name, dim, tmp_path):
    with pytest.raises(ConfigError, match="train.dim"):
        PROJECTIONS.get(name)(1000, dim, 0)


@pytest.mark.parametrize("name", PROJECTIONS.names())
def test_projected_gradient_is_the_autograd_gradient(name, tmp_path):
    """Training uses Pᵀ∇θL; it must equal ∂L(θ0 + P z)/∂z computed by autograd through lift."""
    n, d = 2000, 11
    proj = make_projection(name, n, d, tmp_path, dtype=torch.float64)
    d = proj.dim
    theta0, c = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    z = (0.1 * torch.randn(d, dtype=torch.float64)).requires_grad_(True)
    loss = torch.tanh((theta0 + proj.lift(z)) * c).sum()
    (auto,) = torch.autograd.grad(loss, z)
    theta = (theta0 + proj.lift(z.detach())).requires_grad_(True)
    (g_theta,) = torch.autograd.grad(torch.tanh(theta * c).sum(), theta)
    torch.testing.assert_close(proj.project(g_theta), auto)


def test_fastjl_mod_index_tiles_the_report_way():
    """index='mod' (the report's code) makes θ periodic in the flat index, up to the per-parameter scale p;
    the default shuffled index does not."""
    n, d = 3000, 100  # L = 128
    z = torch.randn(d, dtype=torch.float64)
    for index, periodic in (("mod", True), ("shuffled", False)):
        proj = PROJECTIONS.get("fastjl")(n, d, 0, dtype=torch.float64, index=index)
        w = proj.lift(z) / proj.p
        both = (proj.p[:-128] != 0) & (proj.p[128:] != 0)
        same = torch.isclose(w[:-128][both], w[128:][both])
        assert bool(same.all()) is periodic


def test_fastjl_constants_follow_the_report():
    from raysub.projections.fastjl import density

    assert density(100) == 1.0
    assert abs(density(1000) - 2 * np.log(60_000) ** 2 / 1000) < 1e-12
    proj = PROJECTIONS.get("fastjl")(200_000, 1000, 0)
    assert abs(float((proj.p != 0).double().mean()) - density(1000)) < 0.01


@pytest.mark.parametrize("name", PROJECTIONS.names())
def test_lift_add_in_place(name, tmp_path):
    proj = make_projection(name, 500, 4, tmp_path)
    z = torch.randn(proj.dim)
    out = torch.randn(500)
    expect = out + proj.lift(z)
    ptr = out.data_ptr()
    proj.lift_add_(z, out)
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out, expect)


def test_bfloat16_basis_is_close():
    Q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(2000, 5)))
    p32 = MatrixProjection(torch.from_numpy(Q.T.copy()).float())
    p16 = MatrixProjection(torch.from_numpy(Q.T.copy()).float(), dtype=torch.bfloat16)
    g = torch.randn(2000)
    torch.testing.assert_close(p16.project(g), p32.project(g), rtol=2e-2, atol=2e-2)


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def test_flat_params_layout_excludes_buffers():
    model = small_model()
    layout = param_layout(model)
    assert [e.name for e in layout] == [n for n, _ in model.named_parameters()]
    assert sum(e.numel for e in layout) == flatten_params(model).numel() == 6 * 5 + 5 + 5 + 5 + 5 * 3 + 3


def test_subspace_gradient_is_projected_full_gradient():
    """∂L/∂z = Pᵀ ∇θ L at θ0 + P z, checked against autograd through an explicit θ(z)."""
    model = small_model()
    theta0 = flatten_params(model)
    n, d = theta0.numel(), 4
    Q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(n, d)))
    proj = MatrixProjection(torch.from_numpy(Q.T.copy()).float())
    sub = SubspaceModel(model, theta0, proj)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    z = torch.randn(d) * 0.1
    sub.set_z(z)
    loss, g_D = sub.loss_and_grad(x, y)

    zz = z.clone().requires_grad_(True)
    theta = theta0 + proj.basis_DN.t() @ zz
    params, off = {}, 0
    for name, p in model.named_parameters():
        params[name] = theta[off : off + p.numel()].view(p.shape)
        off += p.numel()
    ref_model = small_model()
    out = torch.func.functional_call(ref_model, {**params, **dict(ref_model.named_buffers())}, (x,))
    ref_loss = torch.nn.functional.cross_entropy(out, y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(g_D, zz.grad, rtol=1e-5, atol=1e-6)


def test_step_allocates_no_n_sized_gradient():
    model = small_model()
    theta0 = flatten_params(model)
    flat = FlatParams(model, theta0)
    grad_ptr = flat.grad_N.data_ptr()
    for _ in range(2):
        flat.zero_grad()
        out = torch.func.functional_call(model, flat.state(), (torch.randn(4, 6),))
        out.sum().backward()
    assert flat.grad_N.data_ptr() == grad_ptr
    assert float(flat.grad_N.abs().sum()) > 0
    for name, p in flat.params.items():
        assert p.grad.data_ptr() >= grad_ptr  # views of the flat buffer, filled in place


@pytest.mark.parametrize("name", PROJECTIONS.names())
def test_affine_matches_base_plus_lift(name, tmp_path):
    proj = make_projection(name, 300, 5, tmp_path)
    z, base, out = torch.randn(proj.dim), torch.randn(300), torch.empty(300)
    proj.affine_(z, base, out)
    torch.testing.assert_close(out, base + proj.lift(z))


def test_bound_model_parameters_are_the_flat_views():
    model = small_model()
    theta0 = flatten_params(model)
    Q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(theta0.numel(), 3)))
    sub = SubspaceModel(model, theta0, MatrixProjection(torch.from_numpy(Q.T.copy()).float()))
    z = torch.tensor([0.5, -1.0, 2.0])
    sub.set_z(z)
    torch.testing.assert_close(flatten_params(model), theta0 + sub.projection.lift(z))
    x = torch.randn(4, 6)
    model.eval()
    ref = torch.func.functional_call(small_model().eval(), {**sub.flat.state()}, (x,))
    torch.testing.assert_close(sub.forward(x), ref)


# -- check_projection: one line per problem, before Ray starts -------------------------------------------------

N_PARAMS, STORED_DIM = 1000, 6


def fake_run(root, num_params=N_PARAMS, basis_dim=STORED_DIM):
    """A run directory with only what `check_projection` reads: manifest.json and basis/spectrum.json."""
    run = RunDir(str(root))
    run.write_json("manifest.json", {"num_params": num_params})
    if basis_dim is not None:
        run.write_json("basis/spectrum.json", {"dim": basis_dim})
    return run.uri


@pytest.mark.parametrize("name", PROJECTIONS.names())
def test_check_projection_accepts_good_settings(name, tmp_path):
    meta = PROJECTIONS.meta(name)
    dim = N_PARAMS if meta["full"] else STORED_DIM
    basis_run = fake_run(tmp_path / "run") if meta["needs_basis_run"] else None
    assert check_projection(name, N_PARAMS, dim, {}, basis_run) == []
    assert check_projection(name, N_PARAMS, dim, None, basis_run) == []


def _one_problem(problems, *parts):
    assert len(problems) == 1, problems
    assert "\n" not in problems[0]
    for part in parts:
        assert part in problems[0], (part, problems[0])


@pytest.mark.parametrize("name", RANDOM)
@pytest.mark.parametrize("dim,says", [(0, "must be > 0"), (-3, "must be > 0"),
                                      (N_PARAMS + 1, f"exceeds the model's {N_PARAMS} parameters")])
def test_check_projection_random_dim(name, dim, says):
    _one_problem(check_projection(name, N_PARAMS, dim, {}, None), f"projection {name!r}", f"train.dim={dim}", says)


@pytest.mark.parametrize("name,options,parts", [
    ("nope", {}, ["unknown projection family 'nope'", "dense", "fastjl"]),
    ("dense", {"max_byte": 1}, ["'dense'", "'max_byte'", "max_bytes"]),
    ("dense", {"max_bytes": "1G"}, ["'dense'", "max_bytes='1G'", "an integer"]),
    ("sparse", {"density": 0.1}, ["'sparse'", "'density'", "takes no options"]),
    ("fastjl", {"index": "diag"}, ["'fastjl'", "index='diag'", "'shuffled' or 'mod'"]),
    ("fastjl", {"points": 1}, ["'fastjl'", "points=1", "≥ 2"]),
    ("fastjl", {"points": "many"}, ["'fastjl'", "points='many'", "an integer"]),  # the type, not a crash
])
def test_check_projection_options(name, options, parts):
    _one_problem(check_projection(name, N_PARAMS, STORED_DIM, options, None), *parts)


@pytest.mark.parametrize("name", FULL)
def test_check_projection_full_needs_d_equal_n(name):
    _one_problem(check_projection(name, N_PARAMS, N_PARAMS - 1, {}, None), f"projection {name!r}",
                 f"train.dim = the model's {N_PARAMS} parameters, got {N_PARAMS - 1}")


def test_check_projection_dldr_needs_a_basis_run():
    _one_problem(check_projection("dldr", N_PARAMS, 5, {}, None), "projection 'dldr' needs a sampled run",
                 "train.basis_run=RUN_DIR")


def test_check_projection_dldr_run_without_a_basis(tmp_path):
    run = fake_run(tmp_path / "nobasis", basis_dim=None)
    _one_problem(check_projection("dldr", N_PARAMS, 5, {}, run), f"train.basis_run={run} has no basis",
                 "no basis/spectrum.json", f"run 'raysub basis {run}' first")


def test_check_projection_dldr_basis_of_another_model(tmp_path):
    run = fake_run(tmp_path / "other", num_params=N_PARAMS + 7)
    _one_problem(check_projection("dldr", N_PARAMS, 5, {}, run), f"train.basis_run={run}",
                 f"{N_PARAMS + 7}-parameter model", f"this model has {N_PARAMS}", "use the same data and model")


def test_check_projection_dldr_dim_above_the_stored_basis(tmp_path):
    run = fake_run(tmp_path / "run")
    d = STORED_DIM + 1
    _one_problem(check_projection("dldr", N_PARAMS, d, {}, run),
                 f"train.dim={d} exceeds the {STORED_DIM} components of the stored basis in {run}",
                 f"'raysub basis {run} basis.dim={d} --overwrite'")


def test_check_projection_dldr_nonpositive_dim_and_options(tmp_path):
    run = fake_run(tmp_path / "run")
    _one_problem(check_projection("dldr", N_PARAMS, 0, {}, run), "projection 'dldr'", "train.dim=0 must be > 0")
    _one_problem(check_projection("dldr", N_PARAMS, 5, {"rank": 3}, run), "'dldr'", "'rank'", "scale")


def test_check_projection_dldr_unknown_scale(tmp_path):
    run = fake_run(tmp_path / "run")
    _one_problem(check_projection("dldr", N_PARAMS, 5, {"scale": "sv"}, run), "scale='sv'", "none, std")
    with pytest.raises(ConfigError, match=r"train.projection_options.scale='sv'"):
        PROJECTIONS.get("dldr")(N_PARAMS, 2, 0, run_dir=run, scale="sv")


@pytest.mark.parametrize("scale,expected", [("none", (1.0, 1.0)), ("std", (3.0, 1.0))])
def test_dldr_scale_std_multiplies_each_basis_vector_by_its_trajectory_std(tmp_path, monkeypatch, scale, expected):
    """Two orthonormal basis vectors with singular values 6 and 2 over T = 4 snapshots: ``std`` makes the columns
    of P σ_i/√T · u_i = 3 u_1 and 1 u_2, exactly. Catches dividing by the scale (⅓), σ² in place of σ (9), a
    missing √T (6 and 2), and the scale applied along the wrong axis (then lift and project disagree); ``project``
    stays ``lift``ᵀ."""
    import raysub.runs.basis as basis

    run = fake_run(tmp_path / "run")
    u = np.zeros((2, N_PARAMS), np.float32)
    u[0, 0], u[1, 1] = 1.0, 1.0
    monkeypatch.setattr(basis, "load_basis", lambda run_dir, dim: u[:dim].copy())
    monkeypatch.setattr(basis, "read_spectrum",
                        lambda r: {"dim": 2, "num_snapshots": 4, "singular_values": [6.0, 2.0, 0.0]})
    P = PROJECTIONS.get("dldr")(N_PARAMS, 2, 0, run_dir=run, scale=scale)
    lifted = P.lift(torch.tensor([1.0, 1.0]))
    assert lifted[:2].tolist() == list(expected) and float(lifted[2:].abs().sum()) == 0.0
    g = torch.zeros(N_PARAMS)
    g[0], g[1] = 1.0, 1.0
    assert P.project(g).tolist() == list(expected)


def test_dldr_basis_of_another_model_is_a_config_error(tmp_path, monkeypatch):
    """The factory's own safety net (a run whose basis does not match the model) is one line, not an assert."""
    import raysub.runs.basis as basis

    run = fake_run(tmp_path / "other", num_params=N_PARAMS + 7)
    monkeypatch.setattr(basis, "load_basis", lambda run_dir, dim: np.zeros((dim, N_PARAMS + 7), np.float32))
    with pytest.raises(ConfigError) as err:
        PROJECTIONS.get("dldr")(N_PARAMS, 5, 0, run_dir=run)
    _one_problem(err.value.problems, f"train.basis_run={run}", f"{N_PARAMS + 7}-parameter", f"has {N_PARAMS}",
                 "use the same data and model")
    with pytest.raises(ConfigError, match="needs a sampled run"):
        PROJECTIONS.get("dldr")(N_PARAMS, 5, 0)


# -- a new random family gets the shared rows without editing this file ----------------------------------------

class SignedCoordinates(Projection):
    """A toy random family: column j is ±e_{r_j}, distinct rows r drawn from the seed (2·D numbers held)."""

    def __init__(self, num_params, dim, seed, dtype=torch.float32):
        gen = torch.Generator().manual_seed(seed)
        self.num_params, self.dim, self.seed = num_params, dim, seed
        self.rows = torch.randperm(num_params, generator=gen)[:dim]
        self.signs = torch.randint(0, 2, (dim,), generator=gen).to(dtype).mul_(2).sub_(1)

    def lift(self, z_D):
        return torch.zeros(self.num_params, dtype=z_D.dtype).index_put_((self.rows,), z_D * self.signs.to(z_D.dtype))

    def project(self, g_N):
        return g_N[self.rows] * self.signs.to(g_N.dtype)


@pytest.fixture
def toy_family():
    from raysub.projections._common import check_dim

    name = "toy-signed-coordinates"

    @PROJECTIONS.register(name, random=True, needs_basis_run=False, full=False, low_memory=True, check=no_checks)
    def toy(num_params: int, dim: int, seed: int = 0, *, run_dir=None, device="cpu", dtype=torch.float32):
        check_dim(name, num_params, dim)
        return SignedCoordinates(num_params, dim, seed, dtype)

    try:
        yield name
    finally:  # leave the registry as the other tests found it
        PROJECTIONS._entries.pop(name, None)
        PROJECTIONS._meta.pop(name, None)


def test_a_new_random_family_gets_the_shared_rows(toy_family, tmp_path):
    assert toy_family in families("random") and toy_family not in families("full")
    assert (toy_family, {}) in low_memory_rows()
    assert_seed_determinism(toy_family, tmp_path)
    for n in (4099, 1 << 14):
        assert_unit_norm_columns(toy_family, n, tmp_path)
    assert_no_n_by_d_tensor(toy_family, {}, tmp_path)
    assert check_projection(toy_family, N_PARAMS, 5, {}, None) == []
    _one_problem(check_projection(toy_family, N_PARAMS, N_PARAMS + 1, {}, None), f"projection {toy_family!r}",
                 f"train.dim={N_PARAMS + 1} exceeds")
    _one_problem(check_projection(toy_family, N_PARAMS, 5, {"scale": 2}, None), "'scale'", "takes no options")


def test_the_toy_family_is_gone_after_its_test():
    assert "toy-signed-coordinates" not in PROJECTIONS
