"""Every registered subspace optimizer passes the same smoke check: minimise a quadratic restricted to a
subspace, f(θ0 + P z) with f(θ) = ½ (θ-θ*)ᵀ A (θ-θ*), θ* inside the subspace."""
import numpy as np
import pytest
import torch

from raysub.config import TrainConfig
from raysub.optim import OPTIMIZERS, build_optimizer
from raysub.projection import MatrixProjection

HPARAMS = {"psgd": dict(lr=0.1, momentum=0.9), "sgd": dict(lr=0.3), "adam": dict(lr=0.1, momentum=0.9),
           "rmsprop": dict(lr=0.01, momentum=0.0), "pbfgs": {}}


def converges_on_subspace_quadratic(name, steps=400):
    rng = np.random.default_rng(0)
    n, d = 50, 5
    Q, _ = np.linalg.qr(rng.normal(size=(n, d)))
    proj = MatrixProjection(torch.from_numpy(Q.T.copy()).double(), dtype=torch.float64)
    A = torch.from_numpy(np.diag(rng.uniform(0.5, 2.0, size=n)))
    theta0 = torch.from_numpy(rng.normal(size=n))
    z_star = torch.from_numpy(rng.normal(size=d))
    theta_star = theta0 + proj.lift(z_star)

    def loss_fn(z):
        diff = theta0 + proj.lift(z) - theta_star
        return 0.5 * diff @ (A @ diff)

    z = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    cfg = TrainConfig(optimizer=name, **HPARAMS.get(name, {}))
    opt = build_optimizer(name, [z], cfg)
    start = float(loss_fn(z.detach()))
    for _ in range(steps):
        theta = theta0 + proj.lift(z.detach())
        g_N = A @ (theta - theta_star)
        z.grad = proj.project(g_N)
        if getattr(opt, "needs_evaluate", False):
            opt.step(float(loss_fn(z.detach())), evaluate=lambda zt: float(loss_fn(zt)))
        else:
            opt.step()
    return start, float(loss_fn(z.detach()))


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_converges_on_quadratic(name):
    start, end = converges_on_subspace_quadratic(name)
    assert end < 1e-3 * start, (name, start, end)


def test_pbfgs_takes_newton_steps_on_a_quadratic():
    """On an exact quadratic with a line search, BFGS converges in a few iterations (far fewer than GD)."""
    from raysub.optim import PBFGS

    rng = np.random.default_rng(1)
    d = 6
    A = torch.from_numpy(np.diag(np.logspace(-1, 1, d)))
    z_star = torch.from_numpy(rng.normal(size=d))
    loss = lambda z: float(0.5 * (z - z_star) @ A @ (z - z_star))
    z = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    opt = PBFGS([z], y_same_batch=False)
    for _ in range(25):
        z.grad = A @ (z.detach() - z_star)
        opt.step(loss(z.detach()), evaluate=loss)
    assert loss(z.detach()) < 1e-10
    assert opt.stats["failed"] == 0


def test_pbfgs_failed_search_restores_z_and_resets():
    from raysub.optim import PBFGS

    z = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = PBFGS([z], max_backtracks=3)
    z.grad = torch.ones(3, dtype=torch.float64)
    out = opt.step(1.0, evaluate=lambda zt: 10.0)  # nothing ever satisfies Armijo
    assert out["failed"] and opt.stats["failed"] == 1
    torch.testing.assert_close(z.detach(), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(opt.state[z]["B"], torch.eye(3, dtype=torch.float64))


def test_pbfgs_skips_negative_curvature():
    from raysub.optim import PBFGS

    z = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = PBFGS([z])
    # f(z) = -z0² + z1²: the first step along z0 sees negative curvature, yᵀs < 0
    f = lambda v: float(-v[0] ** 2 + v[1] ** 2)
    grad = lambda v: torch.stack([-2 * v[0], 2 * v[1]])
    z.data = torch.tensor([0.1, 0.1], dtype=torch.float64)
    for _ in range(3):
        z.grad = grad(z.detach())
        opt.step(f(z.detach()), evaluate=f)
    assert opt.stats["skipped"] >= 1
    assert torch.all(torch.linalg.eigvalsh(opt.state[z]["B"]) > 0)


def test_convergence_step_metric():
    from raysub.metrics import convergence_step

    assert convergence_step([1.0] * 10) is None
    losses = list(np.linspace(3.0, 0.5, 50)) + [0.5] * 30
    t = convergence_step(losses)
    # the first 20-step window with std < 0.1 ending within 0.1 of the minimum
    L = np.array(losses)
    expect = next(i + 1 for i in range(19, len(L)) if L[i - 19 : i + 1].std() < 0.1 and L[i] < 0.6)
    assert t == expect
