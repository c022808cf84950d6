"""A task — model, data, θ0, projection — and the one training step of z that every loop uses.

A `Task` is built from a config by `build_task` with no Ray Train or Tune session: a Train worker, a Tune trial,
a plain Ray actor, a benchmark or a test can own one, and several can live in one process (each builds its own
model instance). On top of it:

- `train_step(task, z, opt, x, y)` — one training step: θ = θ0 + P z written in place, forward and backward on
  this rank's batch, the projected gradient and the loss averaged over the ranks in one all-reduce of D+1
  floats, then ``opt.step(z, g, loss, closure)`` (the one optimizer protocol, `raysub.optim.base`), with a
  closure that re-evaluates the same batch for optimizers that need it (each evaluation all-reduces again:
  1 float per loss, D+1 per gradient); `allreduce_floats_per_step` is the mean actually sent per step;
- `loss_and_projected_grad(task, z, batch)` — the pure functional form: (L(z), Pᵀ∇L(z)) on a batch, computed
  out of place, writing nothing the task holds (not θ, not the BatchNorm statistics), so an outer loop
  (meta-training, a line search of its own) can evaluate many z's; local to this process (no all-reduce);
- `evaluate_task(task, z, split)` — loss and accuracy of θ0 + P z on a split, summed over ranks.

The in-place path (`SubspaceModel`) allocates nothing N-sized per step: θ is written by addmv into a flat buffer
whose views are the model's parameters (bound, not re-parametrised per call), gradients accumulate into one flat
gradient buffer, and only D floats leave it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from raysub.data import open_dataset
from raysub.engine import loop, sharded
from raysub.engine.compute import Compute
from raysub.engine.flat import FlatParams, flatten_params
from raysub.models import model_for
from raysub.optim.base import BatchClosure, SubspaceOptimizer
from raysub.projections import PROJECTIONS, stored_bytes
from raysub.runs import layout
from raysub.storage import RunDir
import raysub.plugins  # noqa: F401  every plug-in registered: the Ray workers that train import this module


class SubspaceModel:
    """A model evaluated at θ = θ0 + P z, its parameters bound to views of one flat buffer θ.

    `set_z` rewrites θ in place and ``model(x)`` evaluates there — the same function as
    ``torch.func.functional_call(model, θ, buffers)`` without its per-call re-parametrisation cost.

    Args:
        model: The architecture (its parameters are replaced by the flat views); its buffers are used and
            updated in place.
        theta0_N: Initial flat parameters.
        projection: The subspace (a `Projection`).
        compute: bf16 autocast / channels_last inputs of every forward (`raysub.engine.compute`; default: neither).
    """

    def __init__(self, model: torch.nn.Module, theta0_N: torch.Tensor, projection, compute: Compute = Compute()):
        self.model = model
        self.theta0_N = theta0_N
        self.projection = projection
        self.compute = compute
        self.flat = FlatParams(model, theta0_N, bind=True)

    @torch.no_grad()
    def set_z(self, z_D: torch.Tensor) -> None:
        self.projection.affine_(z_D.detach(), self.theta0_N, self.flat.theta_N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute.forward(self.model, x)

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor):
        """Mean cross-entropy at the current z and its projected gradient Pᵀ∇L (D floats, local to this rank)."""
        self.flat.zero_grad()
        loss = F.cross_entropy(self.forward(x), y)
        loss.backward()
        return loss.detach(), self.projection.project(self.flat.grad_N)


@dataclass
class Task:
    """What one subspace training needs: the model at θ0 + P z, the data, the config it came from."""

    sub: SubspaceModel
    data: Any = None  # a raysub.data.Dataset (None for a task built from parts without data)
    cfg: Any = None  # the raysub.config.Config it was built from, if any
    device: torch.device = torch.device("cpu")
    num_steps: int = 0  # `train_step`s taken in this process
    num_allreduce_floats: int = 0  # floats those steps all-reduced (the step's and its closure's)
    num_group_floats: int = 0  # floats those steps sent in a sharded projection's reduce-scatters and all-gathers

    @classmethod
    def from_parts(cls, model: torch.nn.Module, theta0_N: torch.Tensor, projection, data=None, cfg=None
                   ) -> "Task":
        return cls(SubspaceModel(model, theta0_N, projection), data, cfg, theta0_N.device)

    @property
    def model(self) -> torch.nn.Module:
        return self.sub.model

    @property
    def projection(self):
        return self.sub.projection

    @property
    def theta0_N(self) -> torch.Tensor:
        return self.sub.theta0_N

    @property
    def dim(self) -> int:
        return self.sub.projection.dim

    def new_z(self) -> torch.Tensor:
        """z = 0 (θ = θ0), the start of every subspace run."""
        return torch.zeros(self.dim, device=self.theta0_N.device)


def subspace_dim(cfg, num_params: int) -> int:
    """d of a config's ``train`` section: N for a full-parameter family (``identity``), else ``train.dim``
    (default ``basis.dim``)."""
    return num_params if PROJECTIONS.meta(cfg.train.projection).get("full") else cfg.train_dim


def build_task(cfg, *, device="cpu", run=None, data=None, sharding: str = "replicated") -> Task:
    """The task of ``cfg``'s ``train`` section: dataset, model at θ0, projection; no Ray session needed.

    θ0 is the run directory's ``theta0.pt`` (``run``, else ``cfg.run_dir``; verified against its manifest) when
    it exists — so every rank and every trial starts from the same θ0 — else the model seeded with ``cfg.seed``.
    A family that reads a basis run (``dldr``) reads ``train.basis_run``, defaulting to this run. A
    full-parameter family (``identity``) gets d = N.

    ``sharding`` (resolved: replicated, sharded or node; `raysub.engine.sharded`): with several ranks and a family
    that stores P, this rank builds only its slice's rows and the projection becomes a `ShardedProjection`.
    Collective then: every rank must call it.
    """
    device = torch.device(device)
    run = run or RunDir(cfg.run_dir)
    data = data if data is not None else open_dataset(cfg)
    has_theta0 = run.exists(layout.THETA0)
    with torch.random.fork_rng(devices=[]):  # the seeded init must not move the caller's RNG
        torch.manual_seed(cfg.seed)
        model = model_for(cfg, data, init=not has_theta0)  # the run's θ0 holds train.init_from's weights already
    if has_theta0:
        model.load_state_dict(run.read_theta0())
    model.to(device)
    theta0_N = flatten_params(model)
    name = cfg.train.projection
    dim = subspace_dim(cfg, theta0_N.numel())
    dtype = torch.bfloat16 if cfg.train.basis_dtype == "bfloat16" else torch.float32
    num_params = theta0_N.numel()
    comm = None
    p_bytes = stored_bytes(name, num_params, dim, cfg.train.projection_options, torch.empty(0, dtype=dtype).element_size())
    if sharding == "auto":  # no driver resolved it (a Tune trial): rank 0's choice, for every rank
        sharding = sharded.agreed_auto(cfg, p_bytes)
    if sharding != "replicated" and p_bytes:
        comm = sharded.setup(sharding, num_params, cfg.train.projection_groups)
    projection = PROJECTIONS.get(name)(num_params, dim, cfg.seed, run_dir=cfg.train.basis_run or run.uri,
                                       device=device, dtype=dtype, **({"rows": comm.layout.rows} if comm else {}),
                                       **cfg.train.projection_options)
    if comm is not None:
        projection = sharded.ShardedProjection(projection, num_params, comm)
    return Task(SubspaceModel(model, theta0_N, projection, Compute.of(cfg, device)), data, cfg, device)


def _all_reduce_sum_(task: Task, t: torch.Tensor) -> torch.Tensor:
    """`loop.all_reduce_sum_`, counting the floats sent in ``task.num_allreduce_floats``."""
    _, world = loop.rank_world()
    if world > 1:
        task.num_allreduce_floats += t.numel()
    return loop.all_reduce_sum_(t)


def _mean_over_ranks(task: Task, t: torch.Tensor) -> torch.Tensor:
    _, world = loop.rank_world()
    return _all_reduce_sum_(task, t) / world if world > 1 else t


class StepClosure(BatchClosure):
    """Re-evaluations of one step's batch (global values; BatchNorm statistics restored after each)."""

    def __init__(self, task: Task, x: torch.Tensor, y: torch.Tensor):
        self.task, self.x, self.y = task, x, y

    @torch.no_grad()
    def loss(self, z_D: torch.Tensor) -> float:
        sub = self.task.sub
        with loop.frozen_buffers(sub.model):
            sub.set_z(z_D)
            loss = F.cross_entropy(sub.forward(self.x), self.y).reshape(1)
        return float(_mean_over_ranks(self.task, loss))

    def grad(self, z_D: torch.Tensor) -> Tuple[float, torch.Tensor]:
        sub = self.task.sub
        with loop.frozen_buffers(sub.model), torch.enable_grad():  # the optimizer's step runs under no_grad
            sub.set_z(z_D)
            loss, g_D = sub.loss_and_grad(self.x, self.y)
        packed = _mean_over_ranks(self.task, torch.cat([g_D, loss.reshape(1).to(g_D.dtype)]))
        return float(packed[-1]), packed[:-1]

    def class_sums(self, z_D: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Projected class-gradient sums of the batch at θ0 + P z, summed over the ranks (class-gradient QN).

        One forward and one batched VJP at θ0 + P z on this rank's batch (`_class_sums_local`), then ONE
        all-reduce of (C+1)·D + 2C + 2 floats: sums, not means, so dividing afterwards gives global-batch means.

        Returns:
            G: (C+1, D) — rows k < C: Σ_{μ∈B_k} Pᵀ∇z_k^μ (the logit k of the class-k examples), row C:
                Σ_μ Pᵀ(p^μ − y^μ)·∇z^μ = |B|·g.
            extras: (2C+2,) float64 — [class counts (C), Σ_{μ∈B_k} p_k(1−p_k) (C), |B|, Σ_μ loss^μ].
        """
        G_CD, extras = _class_sums_local(self.task, z_D, self.x, self.y)
        k, d = G_CD.shape
        packed = _all_reduce_sum_(self.task, torch.cat([G_CD.reshape(-1), extras.to(G_CD.dtype)]))
        return packed[: k * d].view(k, d), packed[k * d :].double()


def _logits_at(task: Task, z_D: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(θ, logits) with θ = θ0 + P z formed out of place (a leaf that requires grad) and the model called through
    ``torch.func.functional_call`` with copies of its buffers, so nothing the task holds moves (BatchNorm in train
    mode uses the batch's statistics; its running statistics stay). Call under ``torch.enable_grad()``."""
    sub = task.sub
    dtype = sub.theta0_N.dtype
    with torch.no_grad():
        theta_N = sub.theta0_N + sub.projection.lift(z_D.detach().to(dtype)).to(dtype)
    theta_N.requires_grad_(True)
    params = {e.name: theta_N[e.offset : e.offset + e.numel].view(e.shape) for e in sub.flat.layout}
    buffers = {k: v.clone() for k, v in sub.model.named_buffers()}
    return theta_N, sub.compute.forward(lambda x_: torch.func.functional_call(sub.model, {**params, **buffers}, (x_,)),
                                        x)


def _class_sums_local(task: Task, z_D: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's (G, extras) of `StepClosure.class_sums`, no all-reduce, writing nothing the task holds.

    θ = θ0 + P z is formed out of place and the model called through ``torch.func.functional_call`` with copies of
    its buffers (BatchNorm's running statistics do not move); then ONE batched vector-Jacobian product of the
    logits w.r.t. the flat θ over C+1 cotangents of shape (B, C) — cotangent k < C is 1 at (μ, k) for every μ of
    class k, cotangent C is p − y — by ``torch.autograd.grad(..., is_grads_batched=True)`` (the backward
    vmapped over the cotangents; ``torch.func.vjp`` would refuse a train-mode BatchNorm, whose forward updates
    its running statistics in place). Each of the C+1 rows is projected with Pᵀ.
    """
    sub = task.sub
    with torch.enable_grad():  # the optimizer's step runs under no_grad
        theta_N, logits = _logits_at(task, z_D, x)
        assert logits.dim() == 2 and logits.shape[0] == y.numel(), \
            f"class sums need (B, C) logits, got shape {tuple(logits.shape)} for {y.numel()} labels"
        b, C = logits.shape
        with torch.no_grad():
            probs = torch.softmax(logits.detach(), dim=1)
            onehot = F.one_hot(y, C).to(probs.dtype)
            cot = torch.zeros(C + 1, b, C, device=logits.device, dtype=logits.dtype)
            cot[y, torch.arange(b, device=y.device), y] = 1.0
            cot[C] = probs - onehot
        (G_CN,) = torch.autograd.grad(logits, theta_N, cot, is_grads_batched=True)
    with torch.no_grad():
        G_CD = torch.stack([sub.projection.project(row) for row in G_CN])
        extras = torch.cat([
            onehot.sum(0),
            (onehot * probs * (1 - probs)).sum(0),
            torch.tensor([float(b)], dtype=probs.dtype, device=probs.device),
            F.cross_entropy(logits.detach(), y, reduction="sum").reshape(1).to(probs.dtype),
        ])
    return G_CD, extras.double()


def train_step(task: Task, z_D: torch.Tensor, opt: SubspaceOptimizer, x: torch.Tensor, y: torch.Tensor
               ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """One training step of ``task`` at ``z_D`` (updated in place) on this rank's batch (x, y).

    Returns:
        (the global batch loss at z before the step, a 0-d tensor; the optimizer's statistics of the step).
    """
    sub = task.sub
    sent_before = sharded.group_floats(sub.projection)
    sub.set_z(z_D)
    loss, g_D = sub.loss_and_grad(x, y)
    _, world = loop.rank_world()
    if world > 1:  # the loss rides along with g̃: D+1 floats, one all-reduce
        packed = _mean_over_ranks(task, torch.cat([g_D, loss.reshape(1).to(g_D.dtype)]))
        g_D, loss = packed[:-1], packed[-1]
    stats = opt.step(z_D, g_D, loss, StepClosure(task, x, y))
    task.num_steps += 1
    task.num_group_floats += sharded.group_floats(sub.projection) - sent_before
    return loss, stats


def allreduce_floats_per_step(task: Task) -> float:
    """Mean floats all-reduced per `train_step` of ``task`` so far (0 before the first step and on one worker).

    D+1 for g̃ and the loss, plus what the optimizer's closure evaluations sent: 1 per line-search trial
    (P-BFGS), D+1 per extra gradient (P-BFGS's ``y_same_batch``), (C+1)·D + 2C + 2 per class-gradient sum.
    """
    return task.num_allreduce_floats / task.num_steps if task.num_steps else 0.0


def group_floats_per_step(task: Task) -> float:
    """Mean floats this rank sent per `train_step` in the sharded projection's reduce-scatters and all-gathers
    (within its group: the world, or its node; 0 replicated)."""
    return task.num_group_floats / task.num_steps if task.num_steps else 0.0


def loss_and_projected_grad(task: Task, z_D: torch.Tensor, batch: Tuple[torch.Tensor, torch.Tensor]
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L(z), Pᵀ∇L(z)) of ``task`` on ``batch`` = (x, y), local to this process, writing nothing the task holds.

    θ = θ0 + P z is formed out of place and the model is called through ``torch.func.functional_call`` with
    copies of its buffers (in train mode BatchNorm uses the batch's statistics; its running statistics are not
    moved). The model's current train/eval mode is used. Both outputs are detached.
    """
    x, y = batch
    with torch.enable_grad():  # callable from inside an optimizer's no_grad step
        theta_N, logits = _logits_at(task, z_D, x)
        loss = F.cross_entropy(logits, y)
        (g_N,) = torch.autograd.grad(loss, theta_N)
    return loss.detach(), task.projection.project(g_N)


@torch.no_grad()
def evaluate_task(task: Task, z_D: torch.Tensor, split: str, global_batch: Optional[int] = None,
                  num_workers: int = 0) -> Dict[str, float]:
    """Loss and accuracy of θ0 + P z on ``split`` (eval mode), each rank doing its shard, summed over ranks."""
    sub = task.sub
    sub.set_z(z_D)
    was_training = sub.model.training
    sub.model.eval()
    batch = global_batch or (task.cfg.data.eval_batch_size if task.cfg is not None else 1024)
    try:
        return loop.evaluate(sub.forward, task.data, split, batch, task.device, num_workers)
    finally:
        sub.model.train(was_training)
