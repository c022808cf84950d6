"""Optimizers over the subspace coefficients z (D floats), with a registry.

Each entry is a factory ``(params, cfg: TrainConfig) -> torch.optim.Optimizer`` over ``[z]``. Momentum and
adaptive statistics therefore live in D dimensions. The daggered names of the SL2O tables (SGD†, Momentum†,
Adam†, RMSprop†) are these optimizers applied to z.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from raysub.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")


@OPTIMIZERS.register("psgd")
def psgd(params, cfg):
    """P-SGD (DLDR): SGD with heavy-ball momentum on z (Momentum†)."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("sgd")
def sgd(params, cfg):
    """Plain SGD on z (SGD†): no momentum, whatever train.momentum says."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def adam(params, cfg):
    """Adam on z (Adam†); train.momentum is beta1."""
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("rmsprop")
def rmsprop(params, cfg):
    """RMSprop on z (RMSprop†); train.momentum is its momentum."""
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_optimizer(name: str, params, cfg) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(name)(params, cfg)


class PBFGS(torch.optim.Optimizer):
    """P-BFGS (DLDR Algorithm 2): BFGS on z with a backtracking Armijo line search on the same mini-batch.

    B (D×D) approximates the inverse Hessian, B0 = I, updated by the rank-two formula (13)
    ``B ← Vᵀ B V + ρ s sᵀ``, ``V = I − ρ y sᵀ``, ``ρ = 1/(yᵀs)``. The direction is ``p = −B g̃``; the step
    ``α`` starts at 1 and shrinks by β until Armijo (14) holds: ``L(z + α p) ≤ L(z) + c α g̃ᵀp``.

    Robustness the reference code lacked:
    - the curvature pair is skipped when ``yᵀs ≤ ε·‖s‖‖y‖`` (B would lose positive definiteness);
    - p is replaced by −g̃ (and B reset) when it is not a descent direction;
    - a line search that fails after ``max_backtracks`` leaves z where it was (restored from memory, D floats)
      and resets B to I;
    - trial points are evaluated by the caller's ``evaluate(z)`` under ``no_grad``; under DDP it returns the
      all-reduced loss, so every worker takes the same decision;
    - ``y_same_batch``: form y from two gradients on the same batch (``grad_at(z_new) − g̃``) instead of
      consecutive batches (one extra forward/backward per step, much less noisy curvature).

    Args:
        params: ``[z]``.
        c: Armijo constant (paper: 0.4; the reference code silently used 0.4 as well).
        beta: Backtracking factor in (0, 1) (paper: 0.55).
        max_backtracks: Trials before the search is declared failed.
        eps: Relative curvature threshold for skipping an update.
        y_same_batch: See above.
    """

    needs_evaluate = True

    def __init__(self, params, c: float = 0.4, beta: float = 0.55, max_backtracks: int = 20,
                 eps: float = 1e-10, y_same_batch: bool = False):
        super().__init__(params, dict(lr=1.0, c=c, beta=beta, max_backtracks=max_backtracks, eps=eps,
                                      y_same_batch=y_same_batch))
        self.stats = {"steps": 0, "backtracks": 0, "failed": 0, "skipped": 0, "resets": 0}

    def _z(self):
        return self.param_groups[0]["params"][0]

    def _update_inverse_hessian(self, B, s, y, eps) -> bool:
        sy = float(s @ y)
        if sy <= eps * float(s.norm() * y.norm()) or sy <= 0:
            self.stats["skipped"] += 1
            return False
        rho = 1.0 / sy
        eye = torch.eye(len(s), dtype=B.dtype, device=B.device)
        V = eye - rho * torch.outer(y, s)
        B.copy_(V.t() @ B @ V + rho * torch.outer(s, s))
        return True

    @torch.no_grad()
    def step(self, loss: float, evaluate: Callable[[torch.Tensor], float],
             grad_at: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, Any]:
        """One P-BFGS step from ``z`` with gradient ``z.grad`` and loss ``loss`` (both global, same batch).

        Args:
            loss: L(z) on this batch (all-reduced under DDP).
            evaluate: ``z_trial -> L(z_trial)`` on the same batch, no gradient (all-reduced under DDP).
            grad_at: ``z -> g̃(z)`` on the same batch; needed when ``y_same_batch``.
        Returns:
            {"alpha", "backtracks", "failed"} of this step.
        """
        group = self.param_groups[0]
        z = self._z()
        g = z.grad.detach().to(z.dtype)
        st = self.state[z]
        if "B" not in st:
            st["B"] = torch.eye(len(z), dtype=z.dtype, device=z.device)
        B = st["B"]
        if not group["y_same_batch"] and "g_prev" in st:
            self._update_inverse_hessian(B, st["s_prev"], g - st["g_prev"], group["eps"])
        p = -(B @ g)
        slope = float(g @ p)
        if not slope < 0:
            B.copy_(torch.eye(len(z), dtype=z.dtype, device=z.device))
            self.stats["resets"] += 1
            p = -g
            slope = -float(g @ g)
        z0 = z.detach().clone()
        alpha, accepted = 1.0, False
        for k in range(group["max_backtracks"] + 1):
            if evaluate(z0 + alpha * p) <= loss + group["c"] * alpha * slope:
                accepted = True
                break
            alpha *= group["beta"]
            self.stats["backtracks"] += 1
        self.stats["steps"] += 1
        if not accepted:
            z.copy_(z0)
            B.copy_(torch.eye(len(z), dtype=z.dtype, device=z.device))
            st.pop("g_prev", None)
            self.stats["failed"] += 1
            return {"alpha": 0.0, "backtracks": k, "failed": True}
        s = alpha * p
        z.copy_(z0 + s)
        if group["y_same_batch"]:
            assert grad_at is not None, "y_same_batch needs grad_at"
            self._update_inverse_hessian(B, s, grad_at(z.detach()) - g, group["eps"])
        else:
            st["g_prev"], st["s_prev"] = g.clone(), s
        return {"alpha": alpha, "backtracks": k, "failed": False}


@OPTIMIZERS.register("pbfgs")
def pbfgs(params, cfg):
    """P-BFGS (DLDR Algorithm 2); train.lr is not used (the line search picks the step)."""
    return PBFGS(params, c=cfg.line_search_c, beta=cfg.line_search_beta, max_backtracks=cfg.max_backtracks,
                 y_same_batch=cfg.y_same_batch)
