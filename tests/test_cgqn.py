"""Class-gradient quasi-Newton (raysub.cgqn): the batched VJP, eq. 15–17, validation, and a 2-rank DDP step."""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raysub.cgqn import ClassGradientQN
from raysub.errors import ConfigError

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


def batch(n=12, dtype=torch.float32, seed=1, labels=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen, dtype=dtype)
    y = torch.randint(0, C, (n,), generator=gen) if labels is None else torch.as_tensor(labels)
    return x, y


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def separate_class_gradients(model, x, y, num_classes=C):
    """c_k by C separate autograd backward passes: mean over class-k examples of ∇z_k (zero if absent)."""
    rows = []
    for k in range(num_classes):
        model.zero_grad()
        out = model(x)
        mask = y == k
        if mask.any():
            out[mask, k].mean().backward()
            rows.append(flat_grad(model).clone())
        else:
            rows.append(torch.zeros(sum(p.numel() for p in model.parameters()), dtype=out.dtype))
    return torch.stack(rows)


def test_batched_vjp_equals_separate_backward_passes():
    model = small_cnn()
    x, y = batch(12, labels=[0, 1, 1, 2, 0, 0, 1, 2, 2, 0, 1, 0])  # class 3 absent
    opt = ClassGradientQN(model, C, x, lr=0.1)
    G_KN, extras = opt.batch_sums(x, y)
    counts = extras[:C]
    assert counts.tolist() == [5, 4, 3, 0] and G_KN.shape == (C + 1, opt.N)
    c_KN = G_KN[:C] / counts.clamp(min=1)[:, None]
    ref = separate_class_gradients(model, x, y)
    torch.testing.assert_close(c_KN, ref, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(G_KN[3]) == 0


def test_gradient_row_is_the_loss_gradient():
    model = small_cnn()
    x, y = batch(10, seed=3)
    opt = ClassGradientQN(model, C, x, lr=0.1)
    G_KN, extras = opt.batch_sums(x, y)
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.testing.assert_close(G_KN[C] / extras[2 * C], flat_grad(model), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(float(extras[2 * C + 1] / extras[2 * C]), loss.item(), atol=1e-6, rtol=1e-6)
    # the SGD path (one cotangent) gives the same gradient
    G1, _ = opt.batch_sums(x, y, with_classes=False)
    torch.testing.assert_close(G1[0], G_KN[C], atol=1e-6, rtol=1e-5)


def hand_statistics(model, x, y):
    """c_k^B and λ_k^B (eq. 16–17) by per-example autograd loops, float64."""
    n = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    c, lam = torch.zeros(C, n, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    for k in range(C):
        idx = (y == k).nonzero().flatten().tolist()
        for mu in idx:
            model.zero_grad()
            model(x[mu : mu + 1])[0, k].backward()
            c[k] += flat_grad(model) / len(idx)
        lam[k] = sum(p[mu, k] * (1 - p[mu, k]) for mu in idx) / len(y) * c[k].pow(2).sum()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return c, lam, flat_grad(model).clone()


def test_update_is_eq15_by_hand_paper_mode():
    lr, wd = 0.05, 0.01
    model = small_cnn(dtype=torch.float64)
    x, y = batch(16, dtype=torch.float64, seed=5)
    c, lam, g = hand_statistics(model, x, y)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    g = g + wd * theta
    expected = theta - lr * g
    for k in range(C):
        if c[k].norm() == 0:
            continue
        v = c[k] / c[k].norm()
        expected -= (1 / (lam[k] + wd) - lr) * (v @ g) * v  # eq. 15; +wd: curvature of the L2 term
    opt = ClassGradientQN(model, C, x, lr=lr, weight_decay=wd, mode="paper")
    opt.step(x, y)
    torch.testing.assert_close(opt.theta_N, expected, atol=1e-10, rtol=1e-9)
    # the module's own parameters are views of theta_N
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), expected)


def test_orthonormal_mode_is_newton_in_the_span_and_sgd_outside():
    """After a few steps (non-trivial EMA), the step equals H⁺g + η(I − Π)g for H = Σ λ̄_k v_k v_kᵀ built from the
    optimizer's own statistics (Π: projector on span{v_k}); with orthogonal v_k it coincides with eq. 15."""
    lr = 0.05
    model = small_cnn(dtype=torch.float64)
    opt = ClassGradientQN(model, C, batch(8, dtype=torch.float64)[0], lr=lr, gamma=0.8)
    for s in range(3):
        opt.step(*batch(16, dtype=torch.float64, seed=10 + s))
    g = torch.from_numpy(np.random.default_rng(0).normal(size=opt.N))
    c = opt.class_gradients().numpy()
    lam = opt.lambdas().numpy()
    V = c / np.linalg.norm(c, axis=1, keepdims=True)
    H = (V.T * lam) @ V
    Q, _ = np.linalg.qr(V.T)
    Pi = Q @ Q.T
    expected = np.linalg.pinv(H, rcond=1e-10, hermitian=True) @ g.numpy() + lr * (g.numpy() - Pi @ g.numpy())
    np.testing.assert_allclose(opt.direction(g).numpy(), expected, rtol=1e-7, atol=1e-9)

    # orthogonal class gradients: both modes are eq. 15
    ortho, _ = torch.linalg.qr(torch.randn(opt.N, C, dtype=torch.float64))
    opt.m_KN.copy_(ortho.T * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)[:, None])
    ortho_step = opt.direction(g)
    opt.mode = "paper"
    torch.testing.assert_close(opt.direction(g), ortho_step, rtol=1e-9, atol=1e-12)


def test_ema_bias_correction_at_t1_gives_the_batch_values_and_absent_classes_keep_theirs():
    model = small_cnn(dtype=torch.float64)
    x, y = batch(12, dtype=torch.float64, labels=[0, 1, 1, 2, 0, 0, 1, 2, 2, 0, 1, 0])  # class 3 absent
    c_hand, lam_hand, _ = hand_statistics(model, x, y)
    opt = ClassGradientQN(model, C, x, lr=0.05, gamma=0.95)
    opt.step(x, y)
    torch.testing.assert_close(opt.lambdas()[:3], lam_hand[:3], rtol=1e-12, atol=0)
    torch.testing.assert_close(opt.class_gradients()[:3], c_hand[:3], rtol=1e-10, atol=1e-13)
    assert opt.t_K.tolist() == [1, 1, 1, 0]
    assert float(opt.lambdas()[3]) == 1.0 and torch.count_nonzero(opt.class_gradients()[3]) == 0  # λ^(0), c^(0)

    # a batch without class 0: its EMA (and its count) stay as they were
    m0, s0 = opt.m_KN[0].clone(), opt.s_K[0].clone()
    opt.step(*batch(9, dtype=torch.float64, seed=2, labels=[1, 2, 3, 1, 2, 3, 1, 2, 3]))
    assert opt.t_K.tolist() == [1, 2, 2, 1]
    assert torch.equal(opt.m_KN[0], m0) and torch.equal(opt.s_K[0], s0)
    # t = 2 for class 1: (1-γ)/(1-γ²) (γ λ_1² + λ_2²) under the root
    assert float(opt.lambdas()[1]) > 0


def test_model_with_wrong_output_is_a_one_line_config_error():
    x, _ = batch(6)
    cases = {
        "too_many": nn.Sequential(nn.Flatten(), nn.Linear(64, C + 1)),
        "flat": nn.Sequential(nn.Flatten(), nn.Linear(64, 1), nn.Flatten(0)),
        "broken": nn.Sequential(nn.Linear(3, C)),
    }
    for name, model in cases.items():
        with pytest.raises(ConfigError) as info:
            ClassGradientQN(model, C, x, lr=0.1, name=name)
        msg = str(info.value)
        assert "\n" not in msg and repr(name) in msg, msg
    with pytest.raises(ConfigError, match=r"\(6, 4\)"):
        ClassGradientQN(cases["too_many"], C, x, lr=0.1, name="too_many")


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(lr=-1.0), dict(lr=0.1, gamma=1.0), dict(lr=0.1, gamma=0.0),
                                    dict(lr=0.1, mode="bogus"), dict(lr=0.1, weight_decay=-1.0)])
def test_bad_hyperparameters_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        ClassGradientQN(small_cnn(), C, batch(4)[0], **kwargs)


def test_sgd_mode_is_torch_sgd():
    ref, model = small_cnn(), small_cnn()
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.1, weight_decay=1e-3)
    opt = ClassGradientQN(model, C, batch(4)[0], lr=0.1, weight_decay=1e-3, mode="sgd")
    for s in range(3):
        x, y = batch(10, seed=20 + s)
        torch_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        torch_opt.step()
        opt.step(x, y)
    torch.testing.assert_close(opt.theta_N, torch.cat([p.detach().reshape(-1) for p in ref.parameters()]),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["orthonormal", "paper"])
def test_decreases_the_loss_on_a_separable_problem(mode):
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=gen) * 3
    y = torch.arange(3).repeat(40)
    x = centers[y] + 0.3 * torch.randn(120, 5, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = ClassGradientQN(model, 3, x, lr=0.05, mode=mode)
    with torch.no_grad():
        start = float(F.cross_entropy(model(x), y))
    for _ in range(30):
        opt.step(x, y)
    with torch.no_grad():
        end = float(F.cross_entropy(model(x), y))
        acc = float((model(x).argmax(1) == y).float().mean())
    assert end < 0.5 * start and acc == 1.0, (start, end, acc)


# ------------------------------------------------------------------------------------------------ DDP


def _ddp_worker(rank, world, init_file, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = small_cnn(seed=rank, dtype=torch.float64)  # differs per rank: the constructor broadcasts rank 0's θ
        opt = ClassGradientQN(model, C, batch(4, dtype=torch.float64)[0], lr=0.05)
        for s in range(3):
            x, y = batch(12, dtype=torch.float64, seed=40 + s)
            opt.step(x[rank * 6 : (rank + 1) * 6], y[rank * 6 : (rank + 1) * 6])
        if rank == 0:
            torch.save(opt.theta_N, out_path)
        ref = opt.theta_N.clone()
        dist.broadcast(ref, 0)
        assert torch.equal(ref, opt.theta_N), "ranks disagree"
    finally:
        dist.destroy_process_group()


def test_two_ranks_take_the_single_process_step():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "theta.pt")
        mp.start_processes(_ddp_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2, start_method="fork")
        ddp_theta = torch.load(out)
    model = small_cnn(seed=0, dtype=torch.float64)
    opt = ClassGradientQN(model, C, batch(4, dtype=torch.float64)[0], lr=0.05)
    for s in range(3):
        opt.step(*batch(12, dtype=torch.float64, seed=40 + s))
    torch.testing.assert_close(ddp_theta, opt.theta_N, atol=1e-10, rtol=1e-9)


# ------------------------------------------------------------------------------------------------ job CLI


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0"], "--lr 0 must be > 0"),
    (["--gamma", "1.5"], "--gamma 1.5 must be in (0, 1)"),
    (["--data-root", "/nonexistent/fashion"], "no such directory"),
    (["--lr", "abc"], "invalid float value"),
])
def test_job_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, tmp_path, capsys):
    import importlib.util
    import sys

    jobs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs")
    sys.path.insert(0, jobs)
    try:
        spec = importlib.util.spec_from_file_location("class_gradient_qn_job", os.path.join(jobs, "class_gradient_qn.py"))
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
        out = tmp_path / "out"
        try:
            rc = job.main([*argv, "--out", str(out)])
        except SystemExit as e:  # argparse type errors
            rc = e.code
    finally:
        sys.path.remove(jobs)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()
