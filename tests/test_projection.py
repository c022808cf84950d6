"""Projection families: the shared matrix of checks every registered family goes through."""
import numpy as np
import pytest
import torch

from raysub.flat import FlatParams, flatten_params, param_layout
from raysub.projection import PROJECTIONS, MatrixProjection
from raysub.subspace import SubspaceModel


def make_projection(name, num_params, dim, tmp_path, dtype=torch.float32):
    if name == "dldr":
        Q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(num_params, dim)))
        return MatrixProjection(torch.from_numpy(Q.T.copy()), dtype=dtype)
    return PROJECTIONS.get(name)(num_params, dim, 0, dtype=dtype)


@pytest.mark.parametrize("name", PROJECTIONS.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adjoint_identity(name, dtype, tmp_path):
    n, d = 1000, 7
    proj = make_projection(name, n, d, tmp_path, dtype)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(d, generator=gen, dtype=dtype)
    g = torch.randn(n, generator=gen, dtype=dtype)
    lhs = torch.dot(proj.lift(z), g)
    rhs = torch.dot(z, proj.project(g))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert abs(float(lhs - rhs)) <= tol * max(1.0, abs(float(lhs)))
    assert proj.lift(z).shape == (n,) and proj.project(g).shape == (d,)
    assert proj.dim == d and proj.num_params == n


@pytest.mark.parametrize("name", PROJECTIONS.names())
def test_lift_add_in_place(name, tmp_path):
    proj = make_projection(name, 500, 4, tmp_path)
    z = torch.randn(4)
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
    z, base, out = torch.randn(5), torch.randn(300), torch.empty(300)
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
