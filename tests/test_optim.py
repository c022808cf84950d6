"""The optimizer protocol: every registered optimizer is driven the same way (``step(z, g, loss, closure)``),
minimises a quadratic restricted to a subspace, and round-trips its state through a checkpoint; options are
checked by name and type before anything starts; P-BFGS's line search on hand-made cases."""
import numpy as np
import pytest
import torch

from raysub.config import TrainConfig
from raysub.errors import ConfigError
from raysub.optim import OPTIMIZERS, PBFGS, BatchClosure, build_optimizer, check_optimizer
from raysub.projections import MatrixProjection

HPARAMS = {"psgd": dict(lr=0.1, momentum=0.9), "sgd": dict(lr=0.3), "adam": dict(lr=0.1, momentum=0.9),
           "rmsprop": dict(lr=0.01, momentum=0.0), "pbfgs": {},
           # damping 1: the toy closure's curvature sum makes the undamped Newton step 2-cycle at L = ¼
           "cgqn": dict(lr=0.3, momentum=0.0, optimizer_options={"damping": 1.0})}


class Quadratic(BatchClosure):
    """f(θ0 + P z) with f(θ) = ½ (θ-θ*)ᵀ A (θ-θ*), θ* inside the subspace; the closure of every step."""

    def __init__(self, seed=0, n=50, d=5):
        rng = np.random.default_rng(seed)
        Q, _ = np.linalg.qr(rng.normal(size=(n, d)))
        self.proj = MatrixProjection(torch.from_numpy(Q.T.copy()).double(), dtype=torch.float64)
        self.A = torch.from_numpy(np.diag(rng.uniform(0.5, 2.0, size=n)))
        self.theta0 = torch.from_numpy(rng.normal(size=n))
        self.theta_star = self.theta0 + self.proj.lift(torch.from_numpy(rng.normal(size=d)))
        self.d = d

    def loss(self, z):
        diff = self.theta0 + self.proj.lift(z) - self.theta_star
        return float(0.5 * diff @ (self.A @ diff))

    def grad(self, z):
        g_N = self.A @ (self.theta0 + self.proj.lift(z) - self.theta_star)
        return self.loss(z), self.proj.project(g_N)

    def class_sums(self, z):  # a one-"class" problem: the gradient is its only class gradient
        _, g = self.grad(z)
        G = torch.stack([g, g])
        return G, torch.tensor([1.0, 1.0, 1.0, self.loss(z)], dtype=torch.float64)


def drive(opt, z, closure, steps):
    for _ in range(steps):
        loss, g = closure.grad(z)
        opt.step(z, g, loss, closure)
    return z


def make(name, z):
    return build_optimizer(name, z, TrainConfig(optimizer=name, **HPARAMS.get(name, {})))


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_converges_on_quadratic(name):
    """Fails on a flipped gradient sign or an optimizer that ignores g (the loss would not drop 1000×)."""
    q = Quadratic()
    z = torch.zeros(q.d, dtype=torch.float64)
    start = q.loss(z)
    drive(make(name, z), z, q, 400)
    assert q.loss(z) < 1e-3 * start, (name, start, q.loss(z))


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_state_round_trips_through_a_checkpoint(name, tmp_path):
    """k steps, save (torch.save, as the loop's checkpoint does), restore into a NEW optimizer, k more ==
    2k uninterrupted, bit for bit. Fails when any piece of state (momentum, Adam's moments and step count,
    P-BFGS's B and its previous (s, g), class-gradient EMAs) is left out of state_dict."""
    q, k = Quadratic(seed=3), 7
    z_ref = torch.zeros(q.d, dtype=torch.float64)
    opt_ref = make(name, z_ref)
    drive(opt_ref, z_ref, q, 2 * k)

    z = torch.zeros(q.d, dtype=torch.float64)
    opt = make(name, z)
    drive(opt, z, q, k)
    torch.save({"z": z.clone(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    drive(opt, z, q, 1)  # the lost work after the checkpoint
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    z2 = state["z"].clone()
    opt2 = make(name, z2)
    opt2.load_state_dict(state["optimizer"])
    drive(opt2, z2, q, k)
    assert torch.equal(z2, z_ref), (name, (z2 - z_ref).abs().max())
    assert opt2.counters() == opt_ref.counters()


def test_every_optimizer_is_driven_by_the_same_call():
    """No attribute or name tells the loop how to drive an optimizer: every entry takes (z, g, loss, closure)."""
    q = Quadratic()
    for name in OPTIMIZERS.names():
        z = torch.zeros(q.d, dtype=torch.float64)
        stats = make(name, z).step(z, q.grad(z)[1], q.loss(z), q)
        assert isinstance(stats, dict) and all(isinstance(float(v), float) for v in stats.values())
        assert not torch.equal(z, torch.zeros(q.d, dtype=torch.float64)), name


@pytest.mark.parametrize("name,options,needle", [
    ("pbfgs", {"c": 0.5, "bogus": 1}, "unexpected option(s) 'bogus'"),
    ("pbfgs", {"c": "big"}, "option c='big': expected a number"),
    ("pbfgs", {"max_backtracks": 2.5}, "option max_backtracks=2.5: expected an integer"),
    ("pbfgs", {"y_same_batch": "yes"}, "option y_same_batch='yes': expected true or false"),
    ("pbfgs", {"lr": 0.1}, "unexpected option(s) 'lr'"),  # lr is train.lr, not an option
    ("pbfgs", {"c": 0.0}, "train.optimizer_options.c=0.0: the Armijo constant must be in (0, 1)"),
    ("pbfgs", {"beta": 1.5}, "train.optimizer_options.beta=1.5: the backtracking factor must be in (0, 1)"),
    ("pbfgs", {"max_backtracks": 0}, "train.optimizer_options.max_backtracks=0: must be > 0"),
    ("cgqn", {"gamma": 1.5}, "train.optimizer_options.gamma=1.5: must be in (0, 1)"),
    ("cgqn", {"gamma": 0.0}, "train.optimizer_options.gamma=0.0: must be in (0, 1)"),
    ("cgqn", {"damping": -1.0}, "train.optimizer_options.damping=-1.0: must be ≥ 0"),
    ("cgqn", {"rcond": -1e-3}, "train.optimizer_options.rcond=-0.001: must be ≥ 0"),
    ("cgqn", {"mode": "bogus"}, "train.optimizer_options.mode='bogus': choose one of orthonormal, paper, sgd"),
    ("cgqn", {"gamma": "high"}, "option gamma='high': expected a number"),
    ("cgqn", {"bias_correction": 1}, "option bias_correction=1: expected true or false"),
    ("cgqn", {"nesterov": True}, "unexpected option(s) 'nesterov'"),
])
def test_bad_options_are_one_line_errors(name, options, needle):
    problems = check_optimizer(name, options)
    assert len(problems) == 1 and needle in problems[0], problems
    with pytest.raises(ConfigError, match="train.optimizer_options"):
        build_optimizer(name, torch.zeros(3), TrainConfig(optimizer=name, optimizer_options=options))


def test_options_reach_the_optimizer():
    opt = build_optimizer("pbfgs", torch.zeros(3), TrainConfig(optimizer="pbfgs", optimizer_options={
        "c": 0.1, "beta": 0.5, "max_backtracks": 3, "y_same_batch": True}))
    assert (opt.c, opt.beta, opt.max_backtracks, opt.y_same_batch) == (0.1, 0.5, 3, True)
    adam = build_optimizer("adam", torch.zeros(3), TrainConfig(optimizer="adam", momentum=0.8,
                                                               optimizer_options={"beta2": 0.9}))
    assert adam.opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_set_lr_applies_the_schedule():
    """One Momentum† step with lr 0.5 from zero momentum moves z by exactly −0.5·g."""
    z = torch.zeros(2, dtype=torch.float64)
    opt = build_optimizer("psgd", z, TrainConfig(lr=1.0, momentum=0.9))
    opt.set_lr(0.5)
    opt.step(z, torch.tensor([1.0, -2.0], dtype=torch.float64), 0.0, None)
    assert torch.equal(z, torch.tensor([-0.5, 1.0], dtype=torch.float64))


class Fn(BatchClosure):
    def __init__(self, f, grad=None):
        self.f, self.g = f, grad

    def loss(self, z):
        return self.f(z)

    def grad(self, z):
        return self.f(z), self.g(z)


def test_pbfgs_takes_newton_steps_on_a_quadratic():
    """On an exact quadratic with a line search, BFGS converges in a few iterations (far fewer than GD)."""
    rng = np.random.default_rng(1)
    d = 6
    A = torch.from_numpy(np.diag(np.logspace(-1, 1, d)))
    z_star = torch.from_numpy(rng.normal(size=d))
    f = Fn(lambda z: float(0.5 * (z - z_star) @ A @ (z - z_star)))
    z = torch.zeros(d, dtype=torch.float64)
    opt = PBFGS(z, y_same_batch=False)
    for _ in range(25):
        opt.step(z, A @ (z - z_star), f.loss(z), f)
    assert f.loss(z) < 1e-10
    assert opt.stats["failed"] == 0


def test_pbfgs_y_same_batch_uses_the_closure_gradient():
    """With y from the same batch, the first step on a 1-d quadratic f = ½ a z² recovers B = 1/a exactly, so the
    second step lands on the minimum (α = 1 accepted). Fails if y = g(z_new) − g is taken with the wrong sign."""
    a = 4.0
    f = Fn(lambda z: float(0.5 * a * z @ z), lambda z: a * z)
    z = torch.tensor([1.0], dtype=torch.float64)
    opt = PBFGS(z, y_same_batch=True)
    opt.step(z, a * z, f.loss(z), f)
    torch.testing.assert_close(opt.B, torch.tensor([[1 / a]], dtype=torch.float64))
    opt.step(z, a * z, f.loss(z), f)
    assert abs(float(z)) < 1e-12


def test_pbfgs_failed_search_restores_z_and_resets():
    z = torch.ones(3, dtype=torch.float64)
    opt = PBFGS(z, max_backtracks=3)
    out = opt.step(z, torch.ones(3, dtype=torch.float64), 1.0, Fn(lambda zt: 10.0))  # Armijo never holds
    assert out["failed"] and opt.stats["failed"] == 1 and out["backtracks"] == 3
    torch.testing.assert_close(z, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(opt.B, torch.eye(3, dtype=torch.float64))


def test_pbfgs_armijo_backtracks_exactly():
    """f(z) = z² from z = 1, g = 2, B = I: p = −2. α = 1 gives f = 1 > 1 − 0.4·1·4; α = 0.55 gives
    f = (1 − 1.1)² = 0.01 ≤ 1 − 0.4·0.55·4 = 0.12: accepted after one backtrack."""
    z = torch.tensor([1.0], dtype=torch.float64)
    opt = PBFGS(z)
    out = opt.step(z, torch.tensor([2.0], dtype=torch.float64), 1.0, Fn(lambda v: float(v @ v)))
    assert out == {"alpha": 0.55, "backtracks": 1, "failed": 0}
    torch.testing.assert_close(z, torch.tensor([1.0 - 1.1], dtype=torch.float64))


def test_pbfgs_skips_negative_curvature():
    # f(z) = -z0² + z1²: the first step along z0 sees negative curvature, yᵀs < 0
    f = Fn(lambda v: float(-v[0] ** 2 + v[1] ** 2))
    grad = lambda v: torch.stack([-2 * v[0], 2 * v[1]])
    z = torch.tensor([0.1, 0.1], dtype=torch.float64)
    opt = PBFGS(z)
    for _ in range(3):
        opt.step(z, grad(z), f.loss(z), f)
    assert opt.stats["skipped"] >= 1
    assert torch.all(torch.linalg.eigvalsh(opt.B) > 0)


def test_convergence_step_metric():
    from raysub.metrics import convergence_step

    assert convergence_step([1.0] * 10) is None
    losses = list(np.linspace(3.0, 0.5, 50)) + [0.5] * 30
    t = convergence_step(losses)
    # the first 20-step window with std < 0.1 ending within 0.1 of the minimum
    L = np.array(losses)
    expect = next(i + 1 for i in range(19, len(L)) if L[i - 19 : i + 1].std() < 0.1 and L[i] < 0.6)
    assert t == expect
