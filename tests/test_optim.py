"""Every registered subspace optimizer passes the same smoke check: minimise a quadratic restricted to a
subspace, f(θ0 + P z) with f(θ) = ½ (θ-θ*)ᵀ A (θ-θ*), θ* inside the subspace."""
import numpy as np
import pytest
import torch

from raysub.config import TrainConfig
from raysub.optim import OPTIMIZERS, build_optimizer
from raysub.projection import MatrixProjection

HPARAMS = {"psgd": dict(lr=0.1, momentum=0.9), "sgd": dict(lr=0.3), "adam": dict(lr=0.1, momentum=0.9),
           "rmsprop": dict(lr=0.01, momentum=0.0)}


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
        opt.step()
    return start, float(loss_fn(z.detach()))


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_converges_on_quadratic(name):
    start, end = converges_on_subspace_quadratic(name)
    assert end < 1e-3 * start, (name, start, end)
