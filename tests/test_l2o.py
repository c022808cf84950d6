"""The learned optimizer (raysub.l2o): the features and the LSTM step by hand and against torch, coordinate-wise
independence, one φ for any d, purity, the weights file and its one-line errors, the registered ``l2o``
optimizer (lr scaling, state round trip), and the meta-gradient of an unroll — equal to full backprop through
the unroll (float64) and holding no network activations in its graph.

Each test's docstring names the mutation it catches (each was checked by mutating the code)."""
import math
import weakref

import pytest
import torch

from raysub.config import TrainConfig
from raysub.engine.flat import flatten_params
from raysub.engine.task import Task
from raysub.errors import ConfigError
from raysub.l2o import (
    LearnedOptimizerConfig, adam_like_params, features, init_params, init_state, load_learned_optimizer, moments,
    save_learned_optimizer, unroll_meta_grad, update,
)
from raysub.optim import build_optimizer, check_optimizer
from raysub.projections import MatrixProjection

F64 = torch.float64


def run_steps(params, cfg, gs, state):
    out = []
    for g in gs:
        delta, state = update(params, cfg, g, state)
        out.append(delta)
    return out, state


# ---------------------------------------------------------------------------------------------------------
# features and the LSTM step

def test_features_are_the_bias_corrected_moments_by_hand():
    """g₁ = (1, −2), g₂ = (3, 0), β1 0.9, β2 0.99, ε = ¼ (large, so ε inside the root shows).
    t = 1: m = 0.1 g₁, v = 0.01 g₁², so m̂ = g₁, v̂ = g₁² and m̃ = g̃ = g₁/√(g₁² + ¼).
    t = 2: m = 0.09 g₁ + 0.1 g₂ = (0.39, −0.18), v = 0.0099 g₁² + 0.01 g₂² = (0.0999, 0.0396);
    m̂ = m/0.19 = (39/19, −18/19), v̂ = v/0.0199 = (999/199, 396/199); m̃ = m̂/√(v̂+¼), g̃ = g₂/√(v̂+¼).
    Catches: bias correction with t+1 (the SL2O reference code's off-by-one) or none, β1/β2 swapped, ε outside
    the root (√v̂ + ε), the features in the wrong order."""
    cfg = LearnedOptimizerConfig(eps=0.25)
    state = init_state(cfg, 2, F64)
    g1, g2 = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([3.0, 0.0], dtype=F64)
    m, v, t = moments(cfg, g1, state)
    assert t == 1
    x = features(cfg, g1, m, v, t)
    want1 = torch.tensor([1 / math.sqrt(1.25), -2 / math.sqrt(4.25)], dtype=F64)
    torch.testing.assert_close(x, torch.stack([want1, want1], 1), rtol=1e-14, atol=0)
    m, v, t = moments(cfg, g2, {"m": m, "v": v, "t": t})
    assert t == 2
    torch.testing.assert_close(m, torch.tensor([0.39, -0.18], dtype=F64), rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(v, torch.tensor([0.0999, 0.0396], dtype=F64), rtol=1e-14, atol=0)
    x = features(cfg, g2, m, v, t)
    root = torch.sqrt(torch.tensor([999 / 199, 396 / 199], dtype=F64) + 0.25)
    want_m = torch.tensor([39 / 19, -18 / 19], dtype=F64) / root
    want_g = torch.tensor([3.0, 0.0], dtype=F64) / root
    torch.testing.assert_close(x, torch.stack([want_m, want_g], 1), rtol=1e-13, atol=0)
    # the config's order is the column order
    x_gm = features(LearnedOptimizerConfig(eps=0.25, features=("g", "m")), g2, m, v, t)
    torch.testing.assert_close(x_gm, torch.stack([want_g, want_m], 1), rtol=1e-13, atol=0)


def test_update_is_torch_lstmcell_then_scaled_tanh():
    """Three steps of `update` equal torch.nn.LSTMCell (bias_ih = φ's bias, bias_hh = 0) on the same features,
    then step_scale · tanh(w_outᵀ h), with h and c carried. Catches: a wrong gate order, h or c not carried between
    steps, the recurrent weight dropped, the tanh or the step scale missing."""
    cfg = LearnedOptimizerConfig(hidden_size=5, step_scale=0.3)
    params = init_params(cfg, seed=1, dtype=F64)
    cell = torch.nn.LSTMCell(2, 5).double()
    with torch.no_grad():
        cell.weight_ih.copy_(params["lstm.weight_ih"])
        cell.weight_hh.copy_(params["lstm.weight_hh"])
        cell.bias_ih.copy_(params["lstm.bias"])
        cell.bias_hh.zero_()
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(4, generator=gen, dtype=F64) for _ in range(3)]
    state = init_state(cfg, 4, F64)
    h, c = torch.zeros(4, 5, dtype=F64), torch.zeros(4, 5, dtype=F64)
    ref_state = init_state(cfg, 4, F64)
    for g in gs:
        delta, state = update(params, cfg, g, state)
        m, v, t = moments(cfg, g, ref_state)
        ref_state = {"m": m, "v": v, "t": t}
        with torch.no_grad():
            h, c = cell(features(cfg, g, m, v, t), (h, c))
        torch.testing.assert_close(delta, 0.3 * torch.tanh(h @ params["out.weight"]), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(state["h"], h, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(state["c"], c, rtol=1e-12, atol=1e-15)


def test_update_is_coordinatewise():
    """Permuting the coordinates of g permutes Δz and the state; changing g in one coordinate leaves the others'
    Δz unchanged. Catches: rows mixed (h reshaped as (H, D), a transposed matmul) and any normalisation across
    coordinates (features divided by a norm over all of them — invisible to the permutation check alone)."""
    cfg = LearnedOptimizerConfig(hidden_size=6)
    params = init_params(cfg, seed=2, dtype=F64)
    gen = torch.Generator().manual_seed(3)
    gs = [torch.randn(7, generator=gen, dtype=F64) for _ in range(3)]
    perm = torch.randperm(7, generator=gen)
    deltas, state = run_steps(params, cfg, gs, init_state(cfg, 7, F64))
    deltas_p, state_p = run_steps(params, cfg, [g[perm] for g in gs], init_state(cfg, 7, F64))
    for a, b in zip(deltas, deltas_p):
        torch.testing.assert_close(b, a[perm], rtol=1e-13, atol=1e-16)
    for k in ("m", "v", "h", "c"):
        torch.testing.assert_close(state_p[k], state[k][perm], rtol=1e-13, atol=1e-16)
    bumped = [g.clone() for g in gs]
    bumped[-1][0] += 5.0
    deltas_b, _ = run_steps(params, cfg, bumped, init_state(cfg, 7, F64))
    assert not torch.equal(deltas_b[-1][0], deltas[-1][0])
    torch.testing.assert_close(deltas_b[-1][1:], deltas[-1][1:], rtol=0, atol=0)


def test_one_phi_serves_d_3_and_d_40():
    """The same φ steps 3 and 40 coefficients; the 40-run's first three coordinates (same gradients there) equal
    the 3-run. Catches: a parameter or state whose shape depends on d, or a per-coordinate weight."""
    cfg = LearnedOptimizerConfig(hidden_size=4)
    params = init_params(cfg, seed=4, dtype=F64)
    gen = torch.Generator().manual_seed(5)
    gs40 = [torch.randn(40, generator=gen, dtype=F64) for _ in range(3)]
    d40, s40 = run_steps(params, cfg, gs40, init_state(cfg, 40, F64))
    d3, s3 = run_steps(params, cfg, [g[:3] for g in gs40], init_state(cfg, 3, F64))
    assert d40[-1].shape == (40,) and d3[-1].shape == (3,) and s40["h"].shape == (40, 4)
    for a, b in zip(d3, d40):  # equal up to the summation order of a 3-row vs a 40-row matmul
        torch.testing.assert_close(a, b[:3], rtol=1e-14, atol=1e-17)


def test_update_is_pure_and_composes_with_torch_func():
    """`update` leaves the state it was given untouched, and torch.func.grad of ΣΔz w.r.t. φ equals autograd's.
    Catches: in-place state updates (m.mul_(β1) …: a caller's state — the unroll's start, a checkpoint — would
    move) and anything torch.func cannot trace."""
    cfg = LearnedOptimizerConfig(hidden_size=3)
    params = init_params(cfg, seed=6, dtype=F64)
    g = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    _, state = update(params, cfg, g, init_state(cfg, 3, F64))
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}
    update(params, cfg, -g, state)
    for k, v in before.items():
        assert (torch.equal(state[k], v) if torch.is_tensor(v) else state[k] == v), k
    fgrad = torch.func.grad(lambda p: update(p, cfg, g, state)[0].sum())(params)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    update(leaves, cfg, g, state)[0].sum().backward()
    for k in params:
        torch.testing.assert_close(fgrad[k], leaves[k].grad, rtol=1e-12, atol=1e-15)


def test_adam_like_params_step_against_m_tilde():
    """The hand-built φ steps Δz ≈ −step_scale · tanh(m̂/√(v̂+ε)): at t = 1 that is ∓0.1·tanh(1) for g = (2, −3).
    Catches: a flipped output sign (the l2o optimizer would climb), a gate left shut."""
    cfg = LearnedOptimizerConfig(step_scale=0.1)
    delta, _ = update(adam_like_params(cfg, dtype=F64), cfg, torch.tensor([2.0, -3.0], dtype=F64), init_state(cfg, 2, F64))
    torch.testing.assert_close(delta, torch.tensor([-0.1, 0.1], dtype=F64) * math.tanh(1.0), rtol=2e-3, atol=0)


def test_config_reports_every_problem_at_once():
    """Catches: a check that stops at the first problem, or a bad value accepted."""
    with pytest.raises(ConfigError) as exc:
        LearnedOptimizerConfig(hidden_size=0, features=("m", "x"), step_scale=0.0, beta1=1.0, eps=-1.0)
    text = str(exc.value)
    for needle in ("hidden_size=0", "unknown 'x'", "step_scale=0.0", "beta1=1.0", "eps=-1.0"):
        assert needle in text, (needle, text)
    with pytest.raises(ConfigError, match="unknown key"):
        LearnedOptimizerConfig.from_dict({"hidden_size": 4, "hidden": 4})
    cfg = LearnedOptimizerConfig(hidden_size=7, features=["g"])
    assert LearnedOptimizerConfig.from_dict(cfg.to_dict()) == cfg and cfg.features == ("g",)


# ---------------------------------------------------------------------------------------------------------
# weights on disk

@pytest.fixture
def weights(tmp_path):
    """A meta-training run directory's RUN/l2o/weights.pt with random φ (hidden 20, features m, g)."""
    cfg = LearnedOptimizerConfig(step_scale=0.2)
    params = init_params(cfg, seed=7)
    path = tmp_path / "run" / "l2o" / "weights.pt"
    save_learned_optimizer(str(path), cfg, params)
    return path, cfg, params


def test_weights_load_from_a_path_a_uri_and_a_run_directory(weights):
    """Catches: a loader that only takes local paths (a URI goes through RunDir's filesystem) or only the file."""
    path, cfg, params = weights
    for uri in (str(path), f"file://{path}", str(path.parent.parent), str(path.parent)):
        got_cfg, got = load_learned_optimizer(uri, hidden_size=20, features=["m", "g"])
        assert got_cfg == cfg, uri
        assert set(got) == set(params) and all(torch.equal(got[k], params[k]) for k in params), uri


@pytest.mark.parametrize("case,needle", [
    ("missing", "no such file or directory"),
    ("empty_dir", "holds neither weights.pt nor l2o/weights.pt"),
    ("not_weights", "is not a weights file"),
    ("hidden", "hidden_size 20, not the expected 8"),
    ("features", "features ['m', 'g'], not the expected ['g']"),
    ("no_option", "train.optimizer_options.weights: required"),
])
def test_bad_weights_are_one_line_errors_before_anything_starts(weights, tmp_path, case, needle):
    """check_optimizer (run before Ray starts) and build_optimizer both give ONE line naming the input.
    Catches: a traceback or a KeyError instead of a ConfigError, an expectation (hidden size, features) that is
    not compared, a missing ``weights`` option that reaches the factory as a TypeError."""
    path, _, _ = weights
    options = {"weights": str(path)}
    if case == "missing":
        options["weights"] = str(tmp_path / "nowhere" / "weights.pt")
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        options["weights"] = str(tmp_path / "empty")
    elif case == "not_weights":
        torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
        options["weights"] = str(tmp_path / "other.pt")
    elif case == "hidden":
        options["hidden_size"] = 8
    elif case == "features":
        options["features"] = ["g"]
    else:
        options = {}
    problems = check_optimizer("l2o", options)
    assert len(problems) == 1 and needle in problems[0] and "\n" not in problems[0], problems
    assert problems[0].startswith("train.optimizer_options.weights"), problems
    with pytest.raises(ConfigError) as exc:
        build_optimizer("l2o", torch.zeros(3), TrainConfig(optimizer="l2o", optimizer_options=options))
    assert len(exc.value.problems) == 1 and needle in exc.value.problems[0]


# ---------------------------------------------------------------------------------------------------------
# the registered optimizer

def l2o_at(z, path, lr):
    return build_optimizer("l2o", z, TrainConfig(optimizer="l2o", lr=lr, optimizer_options={"weights": str(path)}))


def test_step_is_update_scaled_by_lr_over_train_lr(weights):
    """train.lr = 0.5: the first step (lr = lr0) adds exactly update()'s Δz, whatever lr0's value; after
    set_lr(0.125) the step is exactly ¼ of the learned one. Catches: lr used absolutely (Δz·lr), set_lr ignored,
    z −= Δz."""
    path, cfg, params = weights
    gen = torch.Generator().manual_seed(8)
    gs = [torch.randn(5, generator=gen) for _ in range(2)]
    z = torch.zeros(5)
    opt = l2o_at(z, path, lr=0.5)
    deltas, _ = run_steps(params, cfg, gs, init_state(cfg, 5))
    stats = opt.step(z, gs[0], 0.0, None)
    torch.testing.assert_close(z, deltas[0], rtol=0, atol=0)
    assert set(stats) == {"dz_norm", "saturated"}
    opt.set_lr(0.125)
    before = z.clone()
    opt.step(z, gs[1], 0.0, None)
    torch.testing.assert_close(z - before, 0.25 * deltas[1], rtol=1e-6, atol=1e-7)
    assert opt.counters()["steps"] == 2


def test_state_round_trips_and_refuses_other_weights(weights, tmp_path):
    """4 steps, torch.save the state, restore into a NEW optimizer, 4 more == 8 uninterrupted, bit for bit; a
    checkpoint of another hidden size is one ConfigError. Catches: m, v, t, h or c left out of state_dict (or
    zeroed), a restore that does not check the state's shapes."""
    path, cfg, params = weights
    gen = torch.Generator().manual_seed(9)
    gs = [torch.randn(6, generator=gen) for _ in range(8)]
    z_ref, z = torch.zeros(6), torch.zeros(6)
    ref, opt = l2o_at(z_ref, path, 1.0), l2o_at(z, path, 1.0)
    for g in gs:
        ref.step(z_ref, g, 0.0, None)
    for g in gs[:4]:
        opt.step(z, g, 0.0, None)
    state = opt.state_dict()
    torch.save({"z": z.clone(), "opt": state}, tmp_path / "ckpt.pt")
    opt.step(z, gs[4], 0.0, None)  # lost work after the checkpoint
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    z2 = ckpt["z"].clone()
    opt2 = l2o_at(z2, path, 1.0)
    opt2.load_state_dict(ckpt["opt"])
    for g in gs[4:]:
        opt2.step(z2, g, 0.0, None)
    assert torch.equal(z2, z_ref) and opt2.counters() == ref.counters()
    other = LearnedOptimizerConfig(hidden_size=3)
    save_learned_optimizer(str(tmp_path / "h3.pt"), other, init_params(other))
    with pytest.raises(ConfigError, match="state h has shape"):
        l2o_at(torch.zeros(6), tmp_path / "h3.pt", 1.0).load_state_dict(state)


def test_weight_decay_is_ignored_with_a_warning(weights):
    """Catches: a setting silently ignored."""
    with pytest.warns(UserWarning, match="weight_decay=0.1 is ignored"):
        build_optimizer("l2o", torch.zeros(2), TrainConfig(optimizer="l2o", weight_decay=0.1,
                                                           optimizer_options={"weights": str(weights[0])}))


# ---------------------------------------------------------------------------------------------------------
# the meta-gradient

def mlp_task(width=16, d=8, seed=0):
    """A float64 MLP 6 → width → 3 (tanh) with an orthonormal random P (d × N)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, 3)).double()
    theta0 = flatten_params(model)
    q, _ = torch.linalg.qr(torch.randn(theta0.numel(), d, dtype=F64))
    return Task.from_parts(model, theta0, MatrixProjection(q.t().contiguous(), dtype=F64))


def make_batches(num, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=gen, dtype=F64), torch.randint(0, 3, (size,), generator=gen))
            for _ in range(num)]


def full_backprop(task, params, cfg, z0, state0, loss0, g0, batches, log_loss=False):
    """The reference: the unroll with ONE graph from φ through z_t into each L(z_t) (the network's forward kept),
    the LSTM's gradient inputs detached; returns (Σ L_t, dΣL/dφ) — or d Σ log L_t/dφ with ``log_loss``."""
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    sub = task.sub
    z, state, g, total, logs = z0.clone(), state0, g0, 0, 0
    for x, y in batches:
        delta, state = update(phi, cfg, g, state)
        z = z + delta
        theta = sub.theta0_N + sub.projection.basis_DN.t() @ z
        views = {e.name: theta[e.offset: e.offset + e.numel].view(e.shape) for e in sub.flat.layout}
        loss = torch.nn.functional.cross_entropy(torch.func.functional_call(sub.model, views, (x,)), y)
        (g,) = torch.autograd.grad(loss, z, retain_graph=True)
        g = g.detach()
        total = total + loss
        logs = logs + torch.log(loss)
    grads = torch.autograd.grad(logs if log_loss else total, list(phi.values()))
    return float(total.detach()), dict(zip(phi, grads))


def flat(grads):
    return torch.cat([grads[k].reshape(-1) for k in sorted(grads)])


@pytest.mark.parametrize("T, log_loss", [(1, False), (5, False), (5, True)])
def test_meta_gradient_equals_full_backprop_through_the_unroll(T, log_loss):
    """d = 8, a 6→16→3 MLP in float64, T = 1 and 5, from a state two steps in (h, c, t ≠ 0) and z0 ≠ 0: the
    surrogate Σ⟨stopgrad(g_t), z_t(φ)⟩ gives the meta-gradient of full backprop (≤ 1e-5 relative; it is ~1e-13)
    and the same meta-loss. Catches: an index shift in the surrogate (⟨g_{t+1}, z_t⟩, or Algorithm 1's L(z_0) …
    L(z_{T−1}), whose gradient is 0 at T = 1), the state or z not carried, the last loss dropped; with
    ``log_loss`` (Σ log L_t), g_t not divided by L_t, or divided by the wrong step's loss."""
    task, cfg = mlp_task(), LearnedOptimizerConfig(hidden_size=6, step_scale=0.5)
    params = init_params(cfg, seed=10, dtype=F64)
    batches = make_batches(T + 3, 12)
    z0 = 0.1 * torch.randn(8, generator=torch.Generator().manual_seed(11), dtype=F64)
    warm = unroll_meta_grad(params, cfg, task, z0, init_state(cfg, 8, F64), batches[:2])
    out = unroll_meta_grad(params, cfg, task, warm.z, warm.state, batches[2:2 + T], loss0=warm.loss, g0=warm.g,
                           log_loss=log_loss)
    meta, ref = full_backprop(task, params, cfg, warm.z, warm.state, warm.loss, warm.g, batches[2:2 + T], log_loss)
    assert out.meta_loss == pytest.approx(meta, rel=1e-12) and len(out.losses) == T
    a, b = flat(out.grads), flat(ref)
    assert float(b.norm()) > 1e-3
    assert float((a - b).norm() / b.norm()) <= 1e-5, float((a - b).norm() / b.norm())
    # the unroll continues where it stopped: the next start is (z_T, s_T, L_T, g_T) on the last batch
    from raysub.engine.task import loss_and_projected_grad

    loss_T, g_T = loss_and_projected_grad(task, out.z, batches[1 + T])
    assert torch.equal(out.g, g_T) and float(out.loss) == float(loss_T) and out.state["t"] == 2 + T


class Held:
    """A saved tensor's wrapper: alive exactly as long as some autograd graph holds the saved tensor."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def retained_while_unrolling(monkeypatch, task, batch_size, T, d):
    """Element counts of every tensor saved for backward that some graph still holds, sampled before each of the
    unroll's T updates (the last sample: the graphs of T − 1 updates and their losses)."""
    from raysub.l2o import meta

    cfg = LearnedOptimizerConfig(hidden_size=5)
    held, samples = [], []

    def pack(t):
        h = Held(t)
        held.append((weakref.ref(h), t.numel()))
        return h

    def sampling_update(*args):
        samples.append(sorted(n for ref, n in held if ref() is not None))
        return update(*args)

    monkeypatch.setattr(meta, "update", sampling_update)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
        unroll_meta_grad(init_params(cfg, dtype=F64), cfg, task, torch.zeros(d, dtype=F64),
                         init_state(cfg, d, F64), make_batches(T, batch_size, seed=1),
                         loss0=torch.zeros((), dtype=F64), g0=torch.ones(d, dtype=F64))
    return samples, cfg


def test_the_meta_gradient_graph_holds_no_network_activations(monkeypatch):
    """While unrolling (the task's own pure form), the graphs alive hold only D-sized LSTM tensors (≤ D·4H
    elements each); what they hold is the same for a 16-wide net on batch 4 and a 256-wide net on batch 64, and
    grows by the same amount every step (the LSTM chain, independent of the network). Catches: keeping the forward
    graph of each L(z_t) (full backprop through the network), which makes the held memory grow with T × the
    network's activations."""
    d, T = 8, 6
    small, cfg = retained_while_unrolling(monkeypatch, mlp_task(width=16, d=d), 4, T, d)
    big, _ = retained_while_unrolling(monkeypatch, mlp_task(width=256, d=d), 64, T, d)
    assert small == big
    assert max(max(s, default=0) for s in big) <= d * 4 * cfg.hidden_size
    totals = [sum(s) for s in big]
    steps = [b - a for a, b in zip(totals, totals[1:])]
    # the first update saves less (its h, c are constants); every later one adds the same D-sized pieces
    assert len(totals) == T and totals[0] == 0 and len(set(steps[1:])) == 1, totals
    assert 0 < steps[-1] <= 20 * d * cfg.hidden_size, totals
