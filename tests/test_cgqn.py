"""Class-gradient quasi-Newton (raysub.optim.cgqn, registered ``cgqn``): the class sums of the step's closure
(`StepClosure.class_sums`: one batched VJP, projected), eq. 15–17 by hand, option checks, the step through
`train_step`, a 2-rank DDP step, and the job's bad-input path."""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raysub.config import TrainConfig
from raysub.engine.flat import flatten_params
from raysub.engine.task import StepClosure, Task, train_step
from raysub.optim import BatchClosure, build_optimizer
from raysub.optim.cgqn import ClassGradientQN
from raysub.projections import MatrixProjection
from raysub.projections.identity import IdentityProjection

C = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest and immune to spinning OpenMP threads on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cnn(num_classes=C, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 8), nn.Tanh(),
                          nn.Linear(8, num_classes))
    return model.to(dtype)


def mlp(num_classes=3, dtype=torch.float64, seed=0, inputs=5, hidden=7):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, num_classes)).to(dtype)


def batch(n=12, dtype=torch.float32, seed=1, labels=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen, dtype=dtype)
    y = torch.randint(0, C, (n,), generator=gen) if labels is None else torch.as_tensor(labels)
    return x, y


def identity_task(model, theta0=None):
    """A Task over the full parameters (z = θ − θ0); ``model`` is bound to the task's flat θ afterwards."""
    theta0 = flatten_params(model) if theta0 is None else theta0
    return Task.from_parts(model, theta0, IdentityProjection(theta0.numel()), data=None)


def make(z, mode="orthonormal", **kwargs):
    return ClassGradientQN(z, mode=mode, **kwargs)


def step_at(task, z, opt, x, y):
    """One optimizer step driven as the loop drives it (g, loss and the closure of the batch)."""
    return train_step(task, z, opt, x, y)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def loaded(model_fn, theta, **kwargs):
    """A fresh (unbound) copy of the architecture with flat parameters ``theta``."""
    model = model_fn(**kwargs)
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(theta[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
    return model


def hand_statistics(model, x, y, num_classes=C):
    """c_k^B and λ_k^B (eq. 16–17) by per-example autograd loops, float64, and the mean-loss gradient."""
    n = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    c, lam = torch.zeros(num_classes, n, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
    for k in range(num_classes):
        idx = (y == k).nonzero().flatten().tolist()
        for mu in idx:
            model.zero_grad()
            model(x[mu : mu + 1])[0, k].backward()
            c[k] += flat_grad(model) / len(idx)
        lam[k] = sum(p[mu, k] * (1 - p[mu, k]) for mu in idx) / len(y) * c[k].pow(2).sum()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return c, lam, flat_grad(model).clone()


class Sums(BatchClosure):
    """A closure that hands out prepared class sums (the optimizer's math without a model)."""

    def __init__(self, G, extras):
        self.G, self.extras = G, extras

    def loss(self, z):
        raise AssertionError("cgqn evaluates no trial points")

    def grad(self, z):
        raise AssertionError("cgqn takes g from the loop")

    def class_sums(self, z):
        return self.G, self.extras


def random_sums(D, num_classes, seed, counts=None):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts if counts is not None else [3.0] * num_classes, dtype=torch.float64)
    G = torch.randn(num_classes + 1, D, generator=gen, dtype=torch.float64)
    G[:num_classes] *= (counts > 0).double()[:, None]
    curv = counts * torch.rand(num_classes, generator=gen, dtype=torch.float64) * 0.25
    b = counts.sum()
    extras = torch.cat([counts, curv, b.reshape(1), torch.tensor([1.7 * float(b)], dtype=torch.float64)])
    return G, extras


# ------------------------------------------------------------------------------------- the class sums


def test_class_sums_identity_rows_are_the_class_logit_gradients_and_the_loss_gradient():
    """Row k = Σ over class-k examples of ∇(logit k), row C = |B|·∇L, extras exact — by autograd loops."""
    model = mlp()
    theta0 = flatten_params(model)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 2, 2, 0, 1, 2])
    z = 0.1 * torch.randn(theta0.numel(), generator=gen, dtype=torch.float64)
    ref = loaded(mlp, theta0 + z)
    task = identity_task(model, theta0)
    G, extras = StepClosure(task, x, y).class_sums(z)
    assert G.shape == (4, theta0.numel()) and extras.dtype == torch.float64 and extras.shape == (8,)

    rows = []
    for k in range(3):
        ref.zero_grad()
        out = ref(x)
        out[y == k, k].sum().backward()
        rows.append(flat_grad(ref).clone())
    ref.zero_grad()
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    torch.testing.assert_close(G[:3], torch.stack(rows), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(G[3], 6 * flat_grad(ref), atol=1e-12, rtol=1e-10)

    with torch.no_grad():
        p = torch.softmax(ref(x), 1)
    curv = [sum(float(p[m, k] * (1 - p[m, k])) for m in range(6) if y[m] == k) for k in range(3)]
    expected = torch.tensor([2.0, 1.0, 3.0, *curv, 6.0, 6 * loss.item()], dtype=torch.float64)
    torch.testing.assert_close(extras, expected, atol=1e-12, rtol=1e-12)


def test_class_sums_absent_class_has_a_zero_row():
    model = small_cnn()
    x, y = batch(12, labels=[0, 1, 1, 2, 0, 0, 1, 2, 2, 0, 1, 0])  # class 3 absent
    task = identity_task(model)
    G, extras = StepClosure(task, x, y).class_sums(task.new_z())
    assert extras[:C].tolist() == [5, 4, 3, 0] and torch.count_nonzero(G[3]) == 0


def test_class_sums_are_projected_rows():
    """With a random P (D×N), every row is Pᵀ times the identity projection's row at the same θ = θ0 + P z."""
    model = mlp()
    theta0 = flatten_params(model)
    n, d = theta0.numel(), 9
    gen = torch.Generator().manual_seed(5)
    P = MatrixProjection(torch.randn(d, n, generator=gen, dtype=torch.float64) / n ** 0.5, dtype=torch.float64)
    z = torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, 0, 2, 2, 1, 0])
    G_sub, extras_sub = StepClosure(Task.from_parts(model, theta0, P), x, y).class_sums(z)
    full = identity_task(mlp(), theta0 + P.lift(z))
    G_full, extras_full = StepClosure(full, x, y).class_sums(full.new_z().double())
    assert G_sub.shape == (4, d)
    torch.testing.assert_close(G_sub, G_full @ P.basis_DN.T, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(extras_sub, extras_full)


def test_class_sums_write_nothing_the_task_holds():
    """θ stays where the loop set it and BatchNorm's running statistics do not move."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    task = identity_task(model)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2] * 2 + [0, 1])
    z = torch.full((task.dim,), 0.01, dtype=torch.float64)
    task.sub.set_z(z)
    theta = task.sub.flat.theta_N.clone()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    StepClosure(task, x, y).class_sums(2 * z)
    assert torch.equal(task.sub.flat.theta_N, theta)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


# --------------------------------------------------------------------------------------- eq. 15–17


def test_update_is_eq15_by_hand_paper_mode():
    """z' = z − η g' − Σ_k (1/(λ_k + wd) − η)(v_k·g') v_k with g' = g + wd·z (decay on z), from hand statistics."""
    lr, wd = 0.05, 0.01
    model = small_cnn(dtype=torch.float64)
    theta0 = flatten_params(model)
    x, y = batch(16, dtype=torch.float64, seed=5)
    z = 0.05 * torch.randn(theta0.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    c, lam, g = hand_statistics(loaded(small_cnn, theta0 + z, dtype=torch.float64), x, y)
    g = g + wd * z
    expected = z - lr * g
    for k in range(C):
        if c[k].norm() == 0:
            continue
        v = c[k] / c[k].norm()
        expected -= (1 / (lam[k] + wd) - lr) * (v @ g) * v  # eq. 15; +wd: curvature of the L2 term
    task = identity_task(model, theta0)
    opt = make(z, mode="paper", lr=lr, weight_decay=wd)
    stats = step_at(task, z, opt, x, y)[1]
    torch.testing.assert_close(z, expected, atol=1e-10, rtol=1e-9)
    assert stats["newton_directions"] == float((c.norm(dim=1) > 0).sum()) and stats["classes_present"] > 0


def test_orthonormal_mode_is_newton_in_the_span_and_sgd_outside():
    """After a few steps (non-trivial EMA), the step equals H⁺g + η(I − Π)g for H = Σ λ̄_k v_k v_kᵀ built from the
    optimizer's own statistics (Π: projector on span{v_k}); with orthogonal v_k it coincides with eq. 15."""
    lr, D = 0.05, 40
    z = torch.zeros(D, dtype=torch.float64)
    opt = make(z, lr=lr, gamma=0.8)
    for s in range(3):
        opt.step(z, torch.zeros(D, dtype=torch.float64), 0.0, Sums(*random_sums(D, C, seed=10 + s)))
    g = torch.from_numpy(np.random.default_rng(0).normal(size=D))
    c = opt.class_gradients().numpy()
    lam = opt.lambdas().numpy()
    V = c / np.linalg.norm(c, axis=1, keepdims=True)
    H = (V.T * lam) @ V
    Q, _ = np.linalg.qr(V.T)
    Pi = Q @ Q.T
    expected = np.linalg.pinv(H, rcond=1e-10, hermitian=True) @ g.numpy() + lr * (g.numpy() - Pi @ g.numpy())
    np.testing.assert_allclose(opt.direction(g).numpy(), expected, rtol=1e-7, atol=1e-9)

    # orthogonal class gradients: both modes are eq. 15
    ortho, _ = torch.linalg.qr(torch.randn(D, C, dtype=torch.float64))
    opt.m_CD.copy_(ortho.T * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)[:, None])
    ortho_step = opt.direction(g)
    opt.mode = "paper"
    torch.testing.assert_close(opt.direction(g), ortho_step, rtol=1e-9, atol=1e-12)


def test_damping_adds_to_the_curvature():
    """One class, one step: Δ = η g + (1/(λ + δ) − η)(v·g) v."""
    D, lr, delta = 6, 0.1, 0.7
    G, extras = random_sums(D, 1, seed=4)
    z = torch.zeros(D, dtype=torch.float64)
    opt = make(z, lr=lr, damping=delta)
    g = torch.linspace(-1, 1, D, dtype=torch.float64)
    opt.step(z, g, 0.0, Sums(G, extras))
    c = G[0] / extras[0]
    lam = extras[1] / extras[2] * c.pow(2).sum()
    v = c / c.norm()
    torch.testing.assert_close(-z, lr * g + (1 / (lam + delta) - lr) * (v @ g) * v, rtol=1e-12, atol=1e-14)


def test_ema_bias_correction_at_t1_gives_the_batch_values_and_absent_classes_keep_theirs():
    model = small_cnn(dtype=torch.float64)
    x, y = batch(12, dtype=torch.float64, labels=[0, 1, 1, 2, 0, 0, 1, 2, 2, 0, 1, 0])  # class 3 absent
    c_hand, lam_hand, _ = hand_statistics(loaded(small_cnn, flatten_params(model), dtype=torch.float64), x, y)
    task = identity_task(model)
    z = torch.zeros(task.dim, dtype=torch.float64)
    opt = make(z, lr=0.05, gamma=0.95)
    step_at(task, z, opt, x, y)
    torch.testing.assert_close(opt.lambdas()[:3], lam_hand[:3], rtol=1e-12, atol=0)
    torch.testing.assert_close(opt.class_gradients()[:3], c_hand[:3], rtol=1e-10, atol=1e-13)
    assert opt.t_C.tolist() == [1, 1, 1, 0]
    assert float(opt.lambdas()[3]) == 1.0 and torch.count_nonzero(opt.class_gradients()[3]) == 0  # λ^(0), c^(0)

    # a batch without class 0: its EMA (and its count) stay as they were
    m0, s0 = opt.m_CD[0].clone(), opt.s_C[0].clone()
    step_at(task, z, opt, *batch(9, dtype=torch.float64, seed=2, labels=[1, 2, 3, 1, 2, 3, 1, 2, 3]))
    assert opt.t_C.tolist() == [1, 2, 2, 1]
    assert torch.equal(opt.m_CD[0], m0) and torch.equal(opt.s_C[0], s0)
    # t = 2 for class 1: (1-γ)/(1-γ²) (γ λ_1² + λ_2²) under the root
    assert float(opt.lambdas()[1]) > 0


def test_without_bias_correction_lambda_starts_at_one():
    """bias_correction=False: λ̄² = γ^t·1 + (1−γ) Σ γ^{t−i} λ_i² (a plain EMA from λ^(0) = 1)."""
    D, gamma = 5, 0.9
    G, extras = random_sums(D, 2, seed=7)
    z = torch.zeros(D, dtype=torch.float64)
    opt = make(z, lr=0.1, gamma=gamma, bias_correction=False)
    opt.step(z, torch.zeros(D, dtype=torch.float64), 0.0, Sums(G, extras))
    lam_b = extras[2:4] / extras[4] * (G[:2] / extras[:2, None]).pow(2).sum(1)
    torch.testing.assert_close(opt.lambdas(), (gamma + (1 - gamma) * lam_b.pow(2)).sqrt(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------- registration


def test_options_reach_the_optimizer():
    opt = build_optimizer("cgqn", torch.zeros(3), TrainConfig(
        optimizer="cgqn", lr=0.2, weight_decay=0.01, optimizer_options={
            "gamma": 0.5, "mode": "paper", "damping": 2.0, "rcond": 1e-3, "bias_correction": False}))
    assert isinstance(opt, ClassGradientQN)
    assert (opt.lr, opt.weight_decay, opt.gamma, opt.mode, opt.damping, opt.rcond, opt.bias_correction) == (
        0.2, 0.01, 0.5, "paper", 2.0, 1e-3, False)


def test_state_round_trips_into_a_fresh_optimizer_on_a_model():
    """Statistics allocated lazily at the first step are restored into a freshly built optimizer (and a state
    saved before any step restores to none)."""
    model = mlp()
    task = identity_task(model)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
               for _ in range(4)]
    z_ref = torch.zeros(task.dim, dtype=torch.float64)
    opt_ref = make(z_ref, lr=0.1, damping=1.0)
    fresh_state = opt_ref.state_dict()
    for x, y in batches:
        step_at(task, z_ref, opt_ref, x, y)
    z = torch.zeros(task.dim, dtype=torch.float64)
    opt = make(z, lr=0.1, damping=1.0)
    opt.load_state_dict(fresh_state)
    for x, y in batches[:2]:
        step_at(task, z, opt, x, y)
    z2, opt2 = z.clone(), make(z, lr=0.1, damping=1.0)
    opt2.load_state_dict(opt.state_dict())
    for x, y in batches[2:]:
        step_at(task, z2, opt2, x, y)
    assert torch.equal(z2, z_ref) and opt2.counters() == opt_ref.counters() == {"steps": 4}


# ------------------------------------------------------------------------------------- through the loop


def test_sgd_mode_is_the_registered_sgd():
    """mode "sgd" is z' = z − η (g + wd z): the registered sgd optimizer's step, through the same train_step."""
    model = small_cnn()
    task = identity_task(model)
    z_a, z_b = task.new_z(), task.new_z()
    cfg = dict(lr=0.1, weight_decay=1e-3)
    qn = build_optimizer("cgqn", z_a, TrainConfig(optimizer="cgqn", **cfg, optimizer_options={"mode": "sgd"}))
    sgd = build_optimizer("sgd", z_b, TrainConfig(optimizer="sgd", **cfg))
    for s in range(3):
        x, y = batch(10, seed=20 + s)
        step_at(task, z_a, qn, x, y)
        step_at(task, z_b, sgd, x, y)
    torch.testing.assert_close(z_a, z_b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("projection", ["identity", "dense"])
def test_train_step_moves_z_and_lowers_the_batch_loss(projection):
    """End to end: a Task from parts, the registered cgqn, `train_step` (the loop's step) for a few steps."""
    model = mlp(num_classes=3, dtype=torch.float32, hidden=16)
    theta0 = flatten_params(model)
    n = theta0.numel()
    if projection == "identity":
        proj = IdentityProjection(n)
    else:
        gen = torch.Generator().manual_seed(1)
        proj = MatrixProjection(torch.randn(30, n, generator=gen) / n ** 0.5)
    task = Task.from_parts(model, theta0, proj, data=None)
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=gen) * 3
    y = torch.arange(3).repeat(20)
    x = centers[y] + 0.3 * torch.randn(60, 5, generator=gen)
    z = task.new_z()
    opt = build_optimizer("cgqn", z, TrainConfig(optimizer="cgqn", lr=0.05, momentum=0.0,
                                                 optimizer_options={"damping": 1.0}))
    losses = []
    for _ in range(15):
        loss, stats = train_step(task, z, opt, x, y)
        losses.append(float(loss))
        assert set(stats) == {"newton_directions", "lambda_mean", "classes_present"}
    assert float(z.norm()) > 0 and losses[-1] < 0.5 * losses[0], losses
    assert opt.counters() == {"steps": 15} and opt.diagnostics()["seen_batches"] == [15, 15, 15]


@pytest.mark.parametrize("mode", ["orthonormal", "paper"])
def test_decreases_the_loss_on_a_separable_problem(mode):
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=gen) * 3
    y = torch.arange(3).repeat(40)
    x = centers[y] + 0.3 * torch.randn(120, 5, generator=gen)
    model = mlp(num_classes=3, dtype=torch.float32, hidden=16)
    task = identity_task(model)
    z = task.new_z()
    opt = make(z, mode=mode, lr=0.05)
    start = float(train_step(task, z, opt, x, y)[0])
    for _ in range(29):
        train_step(task, z, opt, x, y)
    task.sub.set_z(z)
    with torch.no_grad():
        logits = task.sub.forward(x)
        end = float(F.cross_entropy(logits, y))
        acc = float((logits.argmax(1) == y).float().mean())
    assert end < 0.5 * start and acc == 1.0, (start, end, acc)


# ------------------------------------------------------------------------------------------------ DDP


def _ddp_worker(rank, world, init_file, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        task = identity_task(small_cnn(seed=0, dtype=torch.float64))  # the same θ0 on every rank
        z = torch.zeros(task.dim, dtype=torch.float64)
        opt = make(z, lr=0.05)
        for s in range(3):
            x, y = batch(12, dtype=torch.float64, seed=40 + s)
            step_at(task, z, opt, x[rank * 6 : (rank + 1) * 6], y[rank * 6 : (rank + 1) * 6])
        if rank == 0:
            torch.save(z, out_path)
        ref = z.clone()
        dist.broadcast(ref, 0)
        assert torch.equal(ref, z), "ranks disagree"
    finally:
        dist.destroy_process_group()


def test_two_ranks_take_the_single_process_step():
    """Half a batch per rank, sums all-reduced: the same z as one process on the whole batch."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "z.pt")
        mp.start_processes(_ddp_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2, start_method="fork")
        ddp_z = torch.load(out)
    task = identity_task(small_cnn(seed=0, dtype=torch.float64))
    z = torch.zeros(task.dim, dtype=torch.float64)
    opt = make(z, lr=0.05)
    for s in range(3):
        step_at(task, z, opt, *batch(12, dtype=torch.float64, seed=40 + s))
    torch.testing.assert_close(ddp_z, z, atol=1e-10, rtol=1e-9)


# ------------------------------------------------------------------------------------------------ job CLI


@pytest.mark.parametrize("argv, message", [
    (["train.optimizer_options.gamma=1.5"], "train.optimizer_options.gamma=1.5: must be in (0, 1)"),
    (["data.root=/nonexistent/fashion"], "/nonexistent/fashion"),
    (["train.lr=abc"], "train.lr: expected a number"),
    (["--arms", "cgqn,adam"], "--arms"),
])
def test_job_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, tmp_path, capsys, monkeypatch):
    from raysub.bench import cgqn as job

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "out"
    try:
        rc = job.main([*argv, f"run_dir={out}"])
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()
