"""The optimizer protocol: every registered optimizer is driven the same way (``step(z, g, loss, closure)``),
minimises a quadratic restricted to a subspace, and round-trips its state through a checkpoint; options are
checked by name and type before anything starts; P-BFGS's line search on hand-made cases; the floats a training
step all-reduces with each optimizer."""
import numpy as np
import pytest
import torch

from raysub.config import TrainConfig
from raysub.engine import loop
from raysub.engine.flat import flatten_params
from raysub.engine.task import Task, allreduce_floats_per_step, train_step
from raysub.errors import ConfigError
from raysub.optim import OPTIMIZERS, PBFGS, BatchClosure, build_optimizer, check_optimizer
from raysub.projections import MatrixProjection

HPARAMS = {"psgd": dict(lr=0.1, momentum=0.9), "sgd": dict(lr=0.3), "adam": dict(lr=0.1, momentum=0.9),
           "rmsprop": dict(lr=0.01, momentum=0.0), "pbfgs": {},
           # damping 1: the toy closure's curvature sum makes the undamped Newton step 2-cycle at L = ¼
           "cgqn": dict(lr=0.3, momentum=0.0, optimizer_options={"damping": 1.0})}
# "l2o" is added by the `l2o_weights` fixture: it needs a weights file


@pytest.fixture(scope="module", autouse=True)
def l2o_weights(tmp_path_factory):
    """The learned optimizer reads its φ from a file: write the hand-built Adam-like φ (`adam_like_params`, step
    scale 0.1) once, and point HPARAMS["l2o"] at it."""
    from raysub.l2o import LearnedOptimizerConfig, adam_like_params, save_learned_optimizer

    cfg = LearnedOptimizerConfig(step_scale=0.1)
    path = tmp_path_factory.mktemp("l2o") / "weights.pt"
    save_learned_optimizer(str(path), cfg, adam_like_params(cfg))
    HPARAMS["l2o"] = dict(lr=1.0, optimizer_options={"weights": str(path)})
    yield
    del HPARAMS["l2o"]


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


def test_pbfgs_loads_a_checkpoint_from_before_alpha0():
    """A P-BFGS checkpoint written before the continued line search has no ``alpha0``: it resumes at α = 1."""
    z = torch.zeros(3, dtype=torch.float64)
    state = make("pbfgs", z).state_dict()
    del state["alpha0"]
    opt = make("pbfgs", z)
    opt.alpha0 = 0.5
    opt.load_state_dict(state)
    assert opt.alpha0 == 1.0


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
    ("pbfgs", {"init_scale": "yes"}, "train.optimizer_options.init_scale='yes': choose one of none, first_pair"),
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


class CountingFn(Fn):
    def __init__(self, f, grad):
        super().__init__(f, grad)
        self.grads = 0

    def grad(self, z):
        self.grads += 1
        return super().grad(z)


@pytest.mark.parametrize("same", [True, False])
def test_pbfgs_y_same_batch_takes_y_from_one_batch(same):
    """Two batches with different losses f_b = ½ a_b (z − m_b)²: batch 1 (a = ½, m = 0), then batch 2 (a = 1,
    m = 1), from z = 1, the option set through train.optimizer_options. Step 1 (batch 1): g̃ = ½, p = −½, α = 1,
    z = ½, s = −½.
    - y_same_batch: y = g₁(½) − g₁(1) = −¼ from the step's closure (batch 1), so B = s/y = 2 = 1/a₁ at once; step 2
      (batch 2, g̃ = −½): p = 1, α = 1 fails Armijo, α = 0.55 gives z = 1.05; then y = g₂(1.05) − g₂(½), B = 1/a₂.
    - across batches: no pair after step 1 (B = I); step 2 forms y = g₂(½) − g₁(1) = −1, B = s/y = ½ (neither
      batch's curvature), p = ¼, α = 1, z = ¾.
    Fails if the option is ignored (either way), or if y takes the other batch's gradient."""
    batches = [CountingFn(lambda v, a=a, m=m: float(0.5 * a * (v - m) @ (v - m)), lambda v, a=a, m=m: a * (v - m))
               for a, m in ((0.5, 0.0), (1.0, 1.0))]
    z = torch.tensor([1.0], dtype=torch.float64)
    opt = build_optimizer("pbfgs", z, TrainConfig(optimizer="pbfgs", optimizer_options={"y_same_batch": same}))
    B = lambda: float(opt.B)
    # the batch's g̃ and loss not via f.grad, which counts the optimizer's calls
    step = lambda f: opt.step(z, f.g(z), f.f(z), f)
    assert step(batches[0]) == {"alpha": 1.0, "backtracks": 0, "failed": 0}
    assert float(z) == 0.5
    assert B() == (2.0 if same else 1.0)
    out = step(batches[1])
    if same:
        assert out == {"alpha": 0.55, "backtracks": 1, "failed": 0}
        assert float(z) == pytest.approx(1.05, abs=1e-15) and B() == pytest.approx(1.0, abs=1e-12)
        assert [f.grads for f in batches] == [1, 1]  # one closure gradient per accepted step, on its own batch
    else:
        assert out == {"alpha": 1.0, "backtracks": 0, "failed": 0}
        assert float(z) == 0.75 and B() == 0.5
        assert [f.grads for f in batches] == [0, 0]


class Trials(BatchClosure):
    """A closure whose trial losses come from ``f`` and which records every trial point."""

    def __init__(self, f):
        self.f, self.points = f, []

    def loss(self, z):
        self.points.append(z.clone())
        return self.f(z)

    def grad(self, z):
        raise AssertionError("not used")


def test_pbfgs_failed_search_restores_z_keeps_b_and_continues_next_step():
    """max_backtracks = 3 and Armijo never holds: trials at α = 1, β, β², β³, z restored, B kept, and the step
    reports 3 backtracks — as does ``stats`` (it counted one more per failed search: the last shrink tries
    nothing).
    The next step's first trial is β⁴ (the search goes on where it stopped; restarting at 1 stalls for ever when
    the loss needs α < β^max_backtracks), and after that accepted step the first trial is 1 again."""
    beta = 0.55
    z = torch.ones(3, dtype=torch.float64)
    g = torch.ones(3, dtype=torch.float64)
    opt = PBFGS(z, beta=beta, max_backtracks=3, y_same_batch=True)
    never = Trials(lambda zt: 10.0)
    out = opt.step(z, g, 1.0, never)
    assert out == {"alpha": 0.0, "backtracks": 3, "failed": 1}
    assert opt.stats["backtracks"] == 3 and opt.stats["failed"] == 1
    torch.testing.assert_close(torch.stack(never.points), torch.stack([1 - beta**k * g for k in range(4)]))
    assert torch.equal(z, torch.ones(3, dtype=torch.float64))
    assert torch.equal(opt.B, torch.eye(3, dtype=torch.float64))

    always = Trials(lambda zt: 0.0)
    always.grad = lambda zt: (0.0, g.clone())  # y = 0: the pair is skipped, B stays I
    out = opt.step(z, g, 10.0, always)
    assert out == {"alpha": pytest.approx(beta**4), "backtracks": 0, "failed": 0}
    torch.testing.assert_close(z, 1 - beta**4 * g)
    assert opt.step(z, g, 10.0, always) == {"alpha": 1.0, "backtracks": 0, "failed": 0}
    torch.testing.assert_close(always.points[-1], 1 - beta**4 * g - g)
    assert opt.stats["backtracks"] == 3


# scipy.optimize.minimize(f, z0, jac=..., method="BFGS") iterations (default gtol 1e-5 on max|g|), scipy 1.17:
# 1e5·z² from z = 1 and the d = 40 quadratic below from 0 — hard-coded so the test needs no scipy.
SCIPY_BFGS_ITERATIONS = {"1e5_z2": 2, "d40_cond1e6": 50}


def ill_conditioned(case):
    """(z0, f, grad) of a quadratic whose steepest-descent step needs α < β^20 = 0.55^20 ≈ 6.4e-6."""
    if case == "1e5_z2":
        return (torch.ones(1, dtype=torch.float64), lambda z: float(1e5 * z @ z), lambda z: 2e5 * z)
    a = torch.from_numpy(np.logspace(0, 6, 40))  # curvatures 1 … 1e6: condition number 1e6
    z_star = torch.from_numpy(np.random.default_rng(0).normal(size=40))
    return (torch.zeros(40, dtype=torch.float64), lambda z: float(0.5 * (a * (z - z_star) ** 2).sum()),
            lambda z: a * (z - z_star))


@pytest.mark.parametrize("case", sorted(SCIPY_BFGS_ITERATIONS))
def test_pbfgs_progresses_when_steepest_descent_needs_tiny_steps(case):
    """Before the fix every search failed (α = 1 … β^20 all too long), reset B to I and dropped the pair, so z
    never moved. Now a failed search continues on the next step, and P-BFGS reaches scipy's tolerance
    (max|g| < 1e-5) within 2× scipy's BFGS iterations (measured: 3 vs 2 and 51 vs 50)."""
    z, f, grad = ill_conditioned(case)
    opt = make("pbfgs", z)
    closure = Fn(f, grad)
    steps = 0
    while grad(z).abs().max() >= 1e-5 and steps < 2 * SCIPY_BFGS_ITERATIONS[case]:
        opt.step(z, grad(z), f(z), closure)
        steps += 1
    assert grad(z).abs().max() < 1e-5, (case, steps, f(z), opt.counters())
    assert opt.stats["failed"] >= 1  # the case does exercise a failed search


@pytest.mark.parametrize("a,c,alpha,backtracks", [
    (2.0, 0.4, 0.55, 1),  # f = z²: α = 1 gives f = 1 > 1 − 0.4·4; α = 0.55 gives 0.01 ≤ 0.12
    (1.0, 0.5, 1.0, 0),  # the exact Newton step: L(z + p) = L + ½ g̃ᵀp, accepted iff c ≤ ½ (here with equality)
    (1.0, 0.51, 0.55, 1),  # … so c just above ½ rejects it: plain decrease or a flipped c·α·slope accept α = 1
    (5.0, 0.4, 0.55**3, 3),  # Armijo holds iff α ≤ 1.2/a = 0.24: plain decrease (α ≤ 0.4) and α² (α ≤ 2/(a + 2c)
                             # = 0.345) accept β² = 0.3025, a flipped sign accepts β = 0.55
])
def test_pbfgs_armijo_accepts_exactly_the_armijo_step(a, c, alpha, backtracks):
    """f(z) = ½ a z² from z = 1 with B = I: p = −a, L(z + α p) = ½ a (1 − α a)², and Armijo (14)
    ½ a (1 − α a)² ≤ ½ a − c α a² holds iff α a ≤ 2(1 − c). Pins the accepted α and the backtracks against
    the three plausible wrong conditions: plain decrease L(z + αp) ≤ L(z), the sign of c·α·g̃ᵀp flipped (accepts
    increases), and α² in place of α."""
    z = torch.tensor([1.0], dtype=torch.float64)
    opt = PBFGS(z, c=c)
    out = opt.step(z, torch.tensor([a], dtype=torch.float64), 0.5 * a, Fn(lambda v: float(0.5 * a * v @ v)))
    assert out == {"alpha": pytest.approx(alpha), "backtracks": backtracks, "failed": 0}
    torch.testing.assert_close(z, torch.tensor([1.0 - alpha * a], dtype=torch.float64))
    assert opt.stats["backtracks"] == backtracks


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


def fake_two_ranks(monkeypatch):
    """Two identical ranks without a process group: every all-reduce doubles its tensor; returns the numel
    of each all-reduce, in order."""
    sent = []

    def all_reduce_sum_(t):
        sent.append(t.numel())
        return t.mul_(2)

    monkeypatch.setattr(loop, "rank_world", lambda: (0, 2))
    monkeypatch.setattr(loop, "all_reduce_sum_", all_reduce_sum_)
    return sent


def overshooting_task():
    """Linear(2→2, no bias) at θ0 = 0, P = I (d = 4), three examples at x = (10, 0) of classes 0, 0, 1.

    At z = 0: g̃ = ±10/6 on the two first-column weights, ‖g̃‖² = 50/9, and the first P-BFGS direction −g̃ moves
    the logit gap to Δ = 100α/3; L(Δ) = ⅔ log(1 + e^−Δ) + ⅓ log(1 + e^Δ), minimal at Δ = log 2. Armijo
    L ≤ log 2 − 0.4·α·50/9 first holds at α = 0.55⁷ (Δ = 0.51: 0.640 ≤ 0.659; at 0.55⁶, 0.642 > 0.631):
    8 trials."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    theta0 = flatten_params(model)
    task = Task.from_parts(model, theta0, MatrixProjection(torch.eye(theta0.numel())))
    return task, torch.tensor([[10.0, 0.0]] * 3), torch.tensor([0, 0, 1])


@pytest.mark.parametrize("name,options,floats", [
    ("psgd", {}, 4 + 1),  # g̃ and the loss
    ("pbfgs", {}, 4 + 1 + 8),  # + 1 loss per line-search trial
    ("pbfgs", {"y_same_batch": True}, 4 + 1 + 8 + 4 + 1),  # + the closure's gradient and loss at z + s
])
def test_allreduce_floats_per_step_is_what_the_step_sends(name, options, floats, monkeypatch):
    """The recorded count was d+1 for every optimizer, whatever the line search and closure all-reduced. Under
    two (fake) ranks, one step sends exactly ``floats``, and the recorded value is the mean of what was sent."""
    sent = fake_two_ranks(monkeypatch)
    task, x, y = overshooting_task()
    z = task.new_z()
    opt = build_optimizer(name, z, TrainConfig(optimizer=name, lr=0.1, optimizer_options=options))
    _, stats = train_step(task, z, opt, x, y)
    if name == "pbfgs":
        assert stats["backtracks"] == 7
    assert sum(sent) == floats and allreduce_floats_per_step(task) == floats
    train_step(task, z, opt, x, y)
    assert allreduce_floats_per_step(task) == sum(sent) / 2


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_allreduce_floats_per_step_counts_every_closure_evaluation(name, monkeypatch):
    """Every registered optimizer: the recorded mean equals what reached the all-reduce (a closure evaluation that
    all-reduces without counting — class-gradient sums, a line-search trial — fails here); 0 on one worker."""
    task, x, y = overshooting_task()
    z = task.new_z()
    opt = make(name, z)
    train_step(task, z, opt, x, y)
    assert allreduce_floats_per_step(task) == 0
    sent = fake_two_ranks(monkeypatch)
    task, x, y = overshooting_task()
    z = task.new_z()
    opt = make(name, z)
    for _ in range(3):
        train_step(task, z, opt, x, y)
    assert sum(sent) > 0 and allreduce_floats_per_step(task) == sum(sent) / 3


def _first_step_diag_100_1(init_scale):
    """f(z) = ½ (100 z₁² + z₂²) from z = (1, 1), B = I, with y from the step's own batch: g̃ = (100, 1),
    p = −g̃, slope −10001, L = 50.5. Armijo L(α) ≤ 50.5 − 4000.4 α fails at β⁷ = 0.01522 (L = 14.11 > −10.4) and
    holds at β⁸ = 0.008373 (L = 1.815 ≤ 17.0): 8 backtracks, s = β⁸ p, y = A s."""
    A = torch.tensor([100.0, 1.0], dtype=torch.float64)
    f = Fn(lambda v: float(0.5 * (A * v) @ v), lambda v: A * v)
    z = torch.ones(2, dtype=torch.float64)
    opt = PBFGS(z, y_same_batch=True, init_scale=init_scale)
    out = opt.step(z, A * z, f.loss(z), f)
    return opt, out, z, A


@pytest.mark.parametrize("init_scale", ["none", "first_pair"])
def test_pbfgs_backtracks_on_a_quadratic_with_known_curvature(init_scale):
    """The first step of `_first_step_diag_100_1` takes exactly 8 backtracks (α = 0.55⁸), whatever the initial
    scaling (it acts only once a pair exists). Catches a wrong exponent or factor in the trial α, a slope taken
    with the wrong sign or without B, and a scaling applied before any curvature is known."""
    opt, out, z, _ = _first_step_diag_100_1(init_scale)
    assert out == {"alpha": pytest.approx(0.55**8, rel=1e-12), "backtracks": 8, "failed": 0}
    torch.testing.assert_close(z, torch.tensor([1 - 100 * 0.55**8, 1 - 0.55**8], dtype=torch.float64))


@pytest.mark.parametrize("init_scale", ["none", "first_pair"])
def test_pbfgs_init_scale_sets_b0_to_sty_over_yty(init_scale):
    """After the first pair of `_first_step_diag_100_1` (s = β⁸·(−100, −1), y = A s), BFGS's update leaves B0
    untouched on the direction w ⟂ s (V w = w), so wᵀBw/‖w‖² is B0's scale there: 1 for ``none``, and
    sᵀy/yᵀy = (100³ + 1)/(100⁴ + 1) for ``first_pair`` (Nocedal & Wright 6.20). Catches the ratio inverted
    (yᵀy/sᵀy), the wrong denominator (sᵀs/sᵀy = (100² + 1)/(100³ + 1) differs in the 4th digit), the scale
    applied after the update instead of before (it would scale the ρ s sᵀ term too, breaking the secant
    equation B y = s), and a scale that is never applied."""
    opt, _, _, A = _first_step_diag_100_1(init_scale)
    s = -(0.55**8) * torch.tensor([100.0, 1.0], dtype=torch.float64)
    y = A * s
    w = torch.stack([s[1], -s[0]])
    gamma = float(w @ opt.B @ w / (w @ w))
    assert gamma == pytest.approx(1.0 if init_scale == "none" else 1000001 / 100000001, rel=1e-10)
    torch.testing.assert_close(opt.B @ y, s, rtol=1e-12, atol=0)  # the secant equation holds either way
    assert opt.scaled == (init_scale == "first_pair")


def test_pbfgs_init_scale_applies_again_after_a_reset():
    """A reset (−B g̃ not a descent direction) returns B to I and re-arms the scaling: the next pair sets
    B0 = (sᵀy/yᵀy)·I again. Catches a ``scaled`` flag that survives the reset (B would stay I)."""
    opt, _, z, A = _first_step_diag_100_1("first_pair")
    opt._reset()
    assert not opt.scaled and torch.equal(opt.B, torch.eye(2, dtype=torch.float64))
    s = torch.tensor([1.0, 0.0], dtype=torch.float64)
    opt._update_inverse_hessian(s, A * s)  # y = (100, 0): B0 = 1/100, and the pair sets B's e1 entry to 1/100
    torch.testing.assert_close(opt.B, torch.eye(2, dtype=torch.float64) / 100, rtol=1e-14, atol=0)


@pytest.mark.parametrize("has_pair", [False, True])
def test_pbfgs_loads_a_checkpoint_from_before_init_scale(has_pair):
    """A checkpoint without ``scaled`` (before init_scale) resumes with the scaling done iff B is no longer I (a
    pair was taken): re-scaling a B that already holds curvature would throw it away."""
    opt, _, z, _ = _first_step_diag_100_1("none")
    state = opt.state_dict() if has_pair else PBFGS(z).state_dict()
    assert "scaled" in state
    del state["scaled"]
    new = PBFGS(z, init_scale="first_pair")
    new.load_state_dict(state)
    assert new.scaled == has_pair
    new2 = PBFGS(z, init_scale="first_pair")
    new2.load_state_dict({**state, "scaled": not has_pair})
    assert new2.scaled == (not has_pair)


def test_pbfgs_refuses_a_bad_init_scale_in_one_line_without_the_config():
    """Direct use (no config check before it) gets a ConfigError naming the option, not an assert (which
    ``python -O`` strips)."""
    with pytest.raises(ConfigError, match=r"pbfgs init_scale='yes': choose one of none, first_pair"):
        PBFGS(torch.zeros(3), init_scale="yes")


@pytest.mark.parametrize("name", ["sgd", "pbfgs", "cgqn"])
def test_a_set_momentum_that_the_optimizer_ignores_is_warned_in_one_line(name, recwarn):
    """train.momentum was silently ignored by sgd, pbfgs and cgqn. The default (0.9) and 0 ("off") are not
    warned; psgd uses momentum and is never warned."""
    build_optimizer(name, torch.zeros(3), TrainConfig(optimizer=name, momentum=0.5))
    lines = [str(w.message) for w in recwarn]
    assert lines == [f"train.momentum=0.5 is ignored by the {name} optimizer (it has no momentum): leave it unset "
                     f"or choose an optimizer that uses it"]
    recwarn.clear()
    for momentum in (0.9, 0.0):
        build_optimizer(name, torch.zeros(3), TrainConfig(optimizer=name, momentum=momentum))
    build_optimizer("psgd", torch.zeros(3), TrainConfig(optimizer="psgd", momentum=0.5))
    assert not [w for w in recwarn if "ignored" in str(w.message)]
