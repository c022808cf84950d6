"""The meta-gradient of one truncated unroll, through the D-dimensional update chain only.

An unroll of T steps from (z_0, g_0) with the learned rule::

    z_{t+1} = z_t + Δz_t,   (Δz_t, s_{t+1}) = update(φ, g_t, s_t),   (L_{t+1}, g_{t+1}) = f(z_{t+1}, b_t)

for t = 0 … T−1, where f(z, b) = (L(z), Pᵀ∇L(z)) on batch b (the task's pure `loss_and_projected_grad`). Its
meta-loss is Σ_{t=1..T} L_t (SL2O §3.1, ω_t = 1) — the loss after each of the T updates, so every update of the
unroll is trained (Algorithm 1 sums L(z_i) … L(z_{i+T−1}), whose first term does not depend on this unroll's φ and
whose last update gets no signal: at T = 1 its meta-gradient is 0). Each batch gives one forward/backward: its
gradient is both the meta-loss term's and the next step's input, so the unroll returns (L_T, g_T) for the next.

With the gradient inputs treated as constants (as in SL2O and Andrychowicz et al.: g_t enters `update`
detached), ∂L_t/∂φ = g_tᵀ ∂z_t/∂φ, so

    dMeta/dφ = ∂/∂φ Σ_t ⟨stopgrad(g_t), z_t(φ)⟩.

The graph to backpropagate is the chain of T LSTM steps over D rows (tensors of D × 4H floats): no forward of the
network is retained, and memory does not grow with T × the network's activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from raysub.l2o.lstm import LearnedOptimizerConfig, State, update

LossGrad = Callable[[torch.Tensor, Any], Tuple[torch.Tensor, torch.Tensor]]  # (z, batch) -> (L(z), Pᵀ∇L(z))


@dataclass
class Unroll:
    """What one unroll returns. Tensors are detached; ``z``, ``state``, ``loss``, ``g`` start the next unroll."""

    meta_loss: float  # Σ_{t=1..T} L_t
    losses: List[float]  # L_1 … L_T
    grads: Dict[str, torch.Tensor]  # dMeta/dφ, keyed like φ
    z: torch.Tensor  # z_T
    state: State  # s_T (h, c detached: the next unroll is a new truncation)
    loss: torch.Tensor  # L_T = L(z_T) on the last batch
    g: torch.Tensor  # g_T = Pᵀ∇L(z_T) on the last batch


def loss_grad_fn(task_or_fn) -> LossGrad:
    """``f(z, batch) -> (L, Pᵀ∇L)``: a `raysub.engine.task.Task` through its pure `loss_and_projected_grad`, or a
    callable of that signature used as is."""
    # a cycle at import: raysub.engine.task imports raysub.plugins, which imports this package
    from raysub.engine.task import Task, loss_and_projected_grad

    if isinstance(task_or_fn, Task):
        return lambda z, batch: loss_and_projected_grad(task_or_fn, z, batch)
    assert callable(task_or_fn), f"expected a Task or a callable (z, batch) -> (loss, g), got {task_or_fn!r}"
    return task_or_fn


def start(task_or_fn, z0: torch.Tensor, batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L(z_0), g_0) on ``batch``: what the first unroll of an optimizee starts from."""
    loss, g = loss_grad_fn(task_or_fn)(z0.detach(), batch)
    return loss.detach(), g.detach()


def _detached(state: State) -> State:
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def unroll_meta_grad(phi_params: Dict[str, torch.Tensor], config: LearnedOptimizerConfig, task_or_fn,
                     z0: torch.Tensor, state0: State, batches: Sequence[Any], *,
                     loss0: Optional[torch.Tensor] = None, g0: Optional[torch.Tensor] = None,
                     log_loss: bool = False, term_weights: Optional[Sequence[float]] = None) -> Unroll:
    """Run T = len(batches) steps of the learned rule and return the meta-loss and dMeta/dφ (module docstring).

    Args:
        phi_params: φ; not modified (differentiated through leaf copies).
        config: φ's config.
        task_or_fn: A `Task` (its pure `loss_and_projected_grad`) or ``f(z, batch) -> (L, Pᵀ∇L)``.
        z0: The coefficients at the start of the unroll (detached).
        state0: The optimizer state at the start (`init_state` or the previous unroll's; detached here).
        batches: T batches; batch t evaluates z_{t+1}.
        loss0, g0: (L(z_0), g_0) from the previous unroll's ``loss``/``g`` or from `start`; both None:
            evaluated here on ``batches[0]`` first (then that batch is used twice).
        log_loss: Differentiate Σ_t log L_t instead of Σ_t L_t (``l2o.meta_loss: log``): with the same constant
            gradient inputs, ∂ log L_t/∂φ = (g_t / L_t)ᵀ ∂z_t/∂φ, so the surrogate's g_t is divided by L_t. Every
            unroll then weighs by its relative progress: late in training, where the losses are small, counts as
            much as the first steps (with Σ L_t the first unrolls dominate the meta-gradient). ``meta_loss`` still
            reports Σ L_t.
        term_weights: ω_t of each term (SL2O §3.1's weights; default all 1): the meta-loss differentiated is
            Σ ω_t L_t (or Σ ω_t log L_t), e.g. larger late in an optimizee's horizon (``l2o.late_weight``).

    Returns:
        An `Unroll`.
    """
    assert len(batches) >= 1, "an unroll needs at least one batch"
    assert (loss0 is None) == (g0 is None), "give loss0 and g0 together"
    assert term_weights is None or len(term_weights) == len(batches), "one weight per step of the unroll"
    f = loss_grad_fn(task_or_fn)
    if g0 is None:
        loss0, g0 = start(f, z0, batches[0])
    phi = {k: v.detach().requires_grad_(True) for k, v in phi_params.items()}
    state = _detached(state0)
    z = z0.detach().to(state["m"].dtype)
    g = g0.detach()
    surrogate = z.new_zeros(())
    losses = []
    loss = loss0
    with torch.enable_grad():
        for i, batch in enumerate(batches):
            delta, state = update(phi, config, g, state)
            z = z + delta
            loss, g = f(z.detach(), batch)
            loss, g = loss.detach(), g.detach()
            losses.append(float(loss))
            w = g / loss if log_loss else g  # ∂/∂φ of this term = w_tᵀ ∂z_t/∂φ
            if term_weights is not None:
                w = w * float(term_weights[i])
            surrogate = surrogate + torch.dot(w.to(z.dtype), z)
        keys = list(phi)
        grads = torch.autograd.grad(surrogate, [phi[k] for k in keys], allow_unused=True)
    grads = {k: (torch.zeros_like(phi[k]) if gr is None else gr) for k, gr in zip(keys, grads)}
    return Unroll(meta_loss=float(sum(losses)), losses=losses, grads=grads, z=z.detach(), state=_detached(state),
                  loss=loss, g=g)
