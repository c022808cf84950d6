"""The engine: a task built with no Ray session, the training step every loop calls, its pure functional
form, the closure of same-batch re-evaluations, the data order of a subspace run, and the progress relay."""
import math

import torch

from raysub.config import load_config
from raysub.engine import loop
from raysub.engine.flat import flatten_params
from raysub.engine.task import StepClosure, Task, build_task, loss_and_projected_grad, train_step
from raysub.optim import build_optimizer
from raysub.config import TrainConfig
from raysub.projections import MatrixProjection, PROJECTIONS


def tiny_task(bn=False):
    """Linear(2→2, no bias) at θ0 = 0 with P = I (4 parameters): at z = 0 the logits are 0, p = (½, ½)."""
    layers = [torch.nn.Linear(2, 2, bias=False)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(2))
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        model[0].weight.zero_()
    theta0 = flatten_params(model)
    return Task.from_parts(model, theta0, MatrixProjection(torch.eye(theta0.numel())))


X, Y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
# ∂L/∂W = (p − onehot) xᵀ = [[−½, 0], [½, 0]], flattened row-major
G_EXACT = torch.tensor([-0.5, 0.0, 0.5, 0.0])


def test_loss_and_projected_grad_exact_values():
    """Fails on a flipped sign of the gradient, a dropped softmax term, or a transposed weight layout."""
    task = tiny_task()
    loss, g = loss_and_projected_grad(task, torch.zeros(4), (X, Y))
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)
    torch.testing.assert_close(g, G_EXACT)


def test_functional_form_writes_nothing_the_task_holds():
    """Evaluating many z's must not move θ, the gradient buffer or BatchNorm running statistics."""
    task = tiny_task(bn=True)
    task.model.train()
    theta = task.sub.flat.theta_N.clone()
    grad = task.sub.flat.grad_N.clone()
    buffers = {k: v.clone() for k, v in task.model.named_buffers()}
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    y = torch.tensor([0, 1, 1])
    for s in range(3):
        loss_and_projected_grad(task, torch.randn(task.dim, generator=torch.Generator().manual_seed(s)), (x, y))
    assert torch.equal(task.sub.flat.theta_N, theta) and torch.equal(task.sub.flat.grad_N, grad)
    for k, v in task.model.named_buffers():
        assert torch.equal(v, buffers[k]), k


def test_functional_form_equals_the_training_step_gradient():
    """The pure form and the in-place step compute the same Pᵀ∇L at a z ≠ 0 through a non-trivial P."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    theta0 = flatten_params(model)
    q, _ = torch.linalg.qr(torch.randn(theta0.numel(), 5))
    task = Task.from_parts(model, theta0, MatrixProjection(q.t().contiguous()))
    z = torch.randn(5)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    loss_f, g_f = loss_and_projected_grad(task, z, (x, y))
    task.sub.set_z(z)
    loss_s, g_s = task.sub.loss_and_grad(x, y)
    torch.testing.assert_close(loss_f, loss_s)
    torch.testing.assert_close(g_f, g_s)


def test_train_step_takes_the_optimizers_step():
    """One P-SGD step from z = 0 with lr 0.1: z = −0.1·g exactly (momentum buffer = g on the first step)."""
    task = tiny_task()
    z = task.new_z()
    opt = build_optimizer("psgd", z, TrainConfig(lr=0.1, momentum=0.9))
    loss, stats = train_step(task, z, opt, X, Y)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6) and stats == {}
    torch.testing.assert_close(z, -0.1 * G_EXACT)


def test_closure_loss_is_the_batch_loss_and_restores_batchnorm():
    task = tiny_task(bn=True)
    task.model.train()
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    y = torch.tensor([0, 1])
    before = {k: v.clone() for k, v in task.model.named_buffers()}
    closure = StepClosure(task, x, y)
    z = torch.linspace(-0.3, 0.4, task.dim)
    expect, _ = loss_and_projected_grad(task, z, (x, y))
    assert math.isclose(closure.loss(z), float(expect), rel_tol=1e-6)
    loss, g = closure.grad(z)
    assert math.isclose(loss, float(expect), rel_tol=1e-6)
    torch.testing.assert_close(g, loss_and_projected_grad(task, z, (x, y))[1])
    for k, v in task.model.named_buffers():
        assert torch.equal(v, before[k]), k


def test_build_task_needs_no_ray_and_tasks_are_independent(tmp_path, monkeypatch):
    """Two tasks of one config in one process: each owns its model (setting z in one leaves the other at θ0);
    with no theta0.pt in the run directory θ0 is the seeded model, identical for both. Nothing of Ray is
    touched (a Ray call would raise here)."""
    import ray
    import ray.train
    import ray.train.torch

    def no_ray(*args, **kwargs):
        raise AssertionError("build_task used Ray")

    for mod, name in ((ray, "init"), (ray, "get"), (ray.train, "get_context"), (ray.train, "get_checkpoint"),
                      (ray.train.torch, "get_device")):
        monkeypatch.setattr(mod, name, no_ray)
    cfg = load_config(None, [f"run_dir={tmp_path}/run", "train.projection=dense", "train.dim=7"])
    a, b = build_task(cfg), build_task(cfg)
    assert a.model is not b.model and a.dim == b.dim == 7
    torch.testing.assert_close(a.theta0_N, b.theta0_N)
    x, y = next(iter(a.data.batches("train", [torch.arange(8)], augment=False, seed=0)))
    before = b.sub.forward(x).detach().clone()
    a.sub.set_z(torch.ones(7))
    torch.testing.assert_close(b.sub.forward(x), before)
    assert not torch.allclose(a.sub.forward(x), before)


def test_build_task_full_family_gets_d_equal_n(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}/run", "train.projection=identity"])
    task = build_task(cfg)
    assert task.dim == task.theta0_N.numel() == 4810
    assert PROJECTIONS.meta("identity").get("full")


def test_subspace_epoch_follows_train_data_seed(tmp_path, monkeypatch):
    """train.data_seed sets the data order of a subspace run (θ0 stays seed's); default: seed."""
    from raysub.pipeline import train as train_mod

    seen = []
    real = loop.epoch_batches

    def spy(n, batch, seed, epoch, rank, world):
        seen.append(seed)
        return real(n, batch, seed, epoch, rank, world)[:2]

    monkeypatch.setattr(loop, "epoch_batches", spy)
    for overrides, expect in (([], 3), (["train.data_seed=11"], 11)):
        cfg = load_config(None, [f"run_dir={tmp_path}/run", "seed=3", "train.projection=dense", "train.dim=4",
                                 *overrides])
        task = build_task(cfg)
        z = task.new_z()
        opt = build_optimizer("psgd", z, cfg.train)
        losses, _ = train_mod.train_epoch(task, z, opt, epoch=0, rank=0, world=1)
        assert seen[-1] == expect and len(losses) == 2
    common = [f"run_dir={tmp_path}/run", "seed=3", "train.projection=dense", "train.dim=4"]
    a = load_config(None, common)
    b = load_config(None, [*common, "train.data_seed=11"])
    assert build_task(a).theta0_N.equal(build_task(b).theta0_N)  # the data seed does not move θ0


def test_mix_seed_is_one_helper():
    assert loop.mix_seed(2, 5) == 2 * 100_003 + 5


def test_progress_relay_failure_is_reported_once(capsys):
    """A dead progress queue must not be swallowed silently, nor stop the training."""
    from raysub.engine.cluster import fit_with_progress

    class Trainer:
        def fit(self):
            import time

            time.sleep(0.5)
            return "result"

    class DeadQueue:
        calls = 0

        def get(self, block=True, timeout=None):  # the relay's blocking get (a dead actor fails it alike)
            DeadQueue.calls += 1
            raise RuntimeError("actor died\nmore")

        get_nowait = get

    assert fit_with_progress(Trainer(), DeadQueue(), print) == "result"
    err = capsys.readouterr().err
    assert err.count("progress lines stopped (RuntimeError: actor died)") == 1
    assert DeadQueue.calls == 1


def test_pbfgs_y_same_batch_through_the_real_step():
    """P-BFGS steps under no_grad; its same-batch gradient (the closure's grad) must still run autograd — and
    the step must take the loss down on a real model (fails if the closure's gradient were computed without
    autograd enabled, or with the wrong sign)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    theta0 = flatten_params(model)
    q, _ = torch.linalg.qr(torch.randn(theta0.numel(), 6))
    task = Task.from_parts(model, theta0, MatrixProjection(q.t().contiguous()))
    x, y = torch.randn(12, 3), torch.arange(12) % 3
    z = task.new_z()
    opt = build_optimizer("pbfgs", z, TrainConfig(optimizer="pbfgs", optimizer_options={"y_same_batch": True}))
    first, _ = train_step(task, z, opt, x, y)
    for _ in range(20):
        loss, stats = train_step(task, z, opt, x, y)
    # measured: 1.1686 → 1.0671 after 21 steps; the subspace minimum is 1.0594 (Adam, 300 steps), Adam after 21
    # steps is at 1.082: a quasi-Newton rate, so the curvature pairs from the closure's gradient are right
    assert float(loss) < 1.07 < float(first) and opt.counters()["failed"] == 0
    assert not torch.allclose(opt.B, torch.eye(6))


def test_progress_queues_are_reused_within_a_session_emptied_and_never_across_sessions(monkeypatch):
    """A fit's progress queue (an actor) goes back to the driver's pool when the fit ends and serves the next fit of
    the same Ray session. Catches a queue handed to the next fit with the last fit's lines still in it (they would
    print as the new stage's), one of another Ray session (its actor is gone after ray.shutdown), a dead queue
    handed out, and a new actor started while an idle one exists (the start-up this saves)."""
    import queue as pyqueue
    import sys
    import types

    from raysub.engine import cluster

    class FakeQueue:
        made = []

        def __init__(self, actor_options=None):
            self.items, self.dead = [], False
            FakeQueue.made.append(self)

        def get_nowait(self):
            if self.dead:
                raise RuntimeError("the queue's actor died")
            if not self.items:
                raise pyqueue.Empty
            return self.items.pop(0)

    monkeypatch.setitem(sys.modules, "ray.util.queue", types.SimpleNamespace(Queue=FakeQueue))
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True))
    session = ["A"]
    monkeypatch.setattr(cluster, "_session_key", lambda: (session[0],))
    monkeypatch.setattr(cluster, "_idle_queues", {})

    first = cluster.make_progress_queue()
    first.items = ["the last line of fit 1"]  # not taken by the relay
    cluster.release_progress_queue(first)
    assert cluster.make_progress_queue() is first and first.items == [] and len(FakeQueue.made) == 1
    cluster.release_progress_queue(first)
    session[0] = "B"  # ray.shutdown, then another cluster
    second = cluster.make_progress_queue()
    assert second is not first and len(FakeQueue.made) == 2
    second.dead = True
    cluster.release_progress_queue(second)
    third = cluster.make_progress_queue()  # the dead one is dropped, a new one started
    assert third is not second and len(FakeQueue.made) == 3
    cluster.release_progress_queue(None)  # a fit whose queue was never made: nothing to give back
    assert {k: v for k, v in cluster._idle_queues.items() if v} == {("A",): [first]}  # session A's, idle
