"""P-BFGS (DLDR Algorithm 2): BFGS on z with a backtracking Armijo line search on the same mini-batch.

Shape suffixes (`raysub.engine.flat`'s legend): ``_D`` the subspace dimension (``z_D``, ``g_D``; B is D×D).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from raysub.errors import ConfigError
from raysub.optim.base import OPTIMIZERS, BatchClosure, SubspaceOptimizer

COUNTERS = ("steps", "backtracks", "failed", "skipped", "resets")
INIT_SCALES = ("none", "first_pair")


class PBFGS(SubspaceOptimizer):
    """P-BFGS (DLDR Algorithm 2).

    B (D×D) approximates the inverse Hessian, B0 = I, updated by the rank-two formula (13)
    ``B ← Vᵀ B V + ρ s sᵀ``, ``V = I − ρ y sᵀ``, ``ρ = 1/(yᵀs)``. The direction is ``p = −B g̃``; the step
    ``α`` starts at 1 (after a failed search: below) and shrinks by β until Armijo (14) holds:
    ``L(z + α p) ≤ L(z) + c α g̃ᵀp``.

    Robustness the reference code lacked:
    - the curvature pair is skipped when ``yᵀs ≤ ε·‖s‖‖y‖`` (B would lose positive definiteness);
    - p is replaced by −g̃ (and B reset) when it is not a descent direction;
    - a line search that fails after ``max_backtracks`` leaves z where it was (restored from memory, D floats),
      drops the curvature pair and keeps B; the next step's search goes on from the trial this one would have
      made next (first α = β^(max_backtracks+1) × this search's first α; 1 again after an accepted step).
      Restarting at α = 1 never reached a step that needs α < β^max_backtracks (1e5·z² never moved), and
      resetting B at every failure, even with the search continued, took 3–6× scipy's iterations on a
      quadratic with condition number 1e6;
    - trial points are evaluated by ``closure.loss(z)`` (no gradient, BatchNorm statistics frozen; under DDP the
      all-reduced loss, so every worker takes the same decision);
    - ``y_same_batch``: form y from two gradients on the same batch (``closure.grad(z_new) − g̃``) instead of
      consecutive batches (one extra forward/backward per step, much less noisy curvature);
    - ``init_scale: first_pair``: B0 = (sᵀy / yᵀy) I (Nocedal & Wright 6.20) in place of I, set from the first
      accepted curvature pair (and again after a reset), before that pair's update. Off by default: on the
      Fashion-MNIST LeNet-5 3-epoch window it cut backtracks from 0.68 to 0.51 per step but ended 0.5 point lower
      after 4 epochs; the per-coordinate scale the loss needs is not one number (dldr ``scale: std`` gives it).

    Args:
        z_D: The coefficients (only their size, dtype and device are used here).
        c: Armijo constant (paper: 0.4; the reference code silently used 0.4 as well).
        beta: Backtracking factor in (0, 1) (paper: 0.55).
        max_backtracks: Trials before the search is declared failed.
        eps: Relative curvature threshold for skipping an update.
        y_same_batch: See above.
        init_scale: ``none`` (B0 = I, the paper) or ``first_pair`` (see above).
    """

    def __init__(self, z_D: torch.Tensor, c: float = 0.4, beta: float = 0.55, max_backtracks: int = 20,
                 eps: float = 1e-10, y_same_batch: bool = False, init_scale: str = "none"):
        self.c, self.beta, self.max_backtracks = float(c), float(beta), int(max_backtracks)
        self.eps, self.y_same_batch = float(eps), bool(y_same_batch)
        if init_scale not in INIT_SCALES:  # a user option: checked even without the config (and under python -O)
            raise ConfigError(f"pbfgs init_scale={init_scale!r}: choose one of {', '.join(INIT_SCALES)}")
        self.init_scale = init_scale
        self.B = torch.eye(len(z_D), dtype=z_D.dtype, device=z_D.device)
        self.scaled = False  # B0 = γ I already applied since the start or the last reset
        self.alpha0 = 1.0  # the first trial of the next search
        self.g_prev: Optional[torch.Tensor] = None
        self.s_prev: Optional[torch.Tensor] = None
        self.stats = {k: 0 for k in COUNTERS}

    def counters(self) -> Dict[str, float]:
        return dict(self.stats)

    def _reset(self) -> None:
        self.B.copy_(torch.eye(len(self.B), dtype=self.B.dtype, device=self.B.device))
        self.scaled = False

    def _update_inverse_hessian(self, s: torch.Tensor, y: torch.Tensor) -> bool:
        sy = float(s @ y)
        if sy <= self.eps * float(s.norm() * y.norm()) or sy <= 0:
            self.stats["skipped"] += 1
            return False
        if self.init_scale == "first_pair" and not self.scaled:
            # Nocedal & Wright (6.20): B0 = (sᵀy / yᵀy) I, the inverse curvature along s, before the first update
            self.B.copy_(torch.eye(len(s), dtype=self.B.dtype, device=self.B.device) * (sy / float(y @ y)))
            self.scaled = True
        rho = 1.0 / sy
        eye = torch.eye(len(s), dtype=self.B.dtype, device=self.B.device)
        V = eye - rho * torch.outer(y, s)
        self.B.copy_(V.t() @ self.B @ V + rho * torch.outer(s, s))
        return True

    @torch.no_grad()
    def step(self, z_D: torch.Tensor, g_D: torch.Tensor, loss: float,
             closure: Optional[BatchClosure] = None) -> Dict[str, float]:
        """One P-BFGS step from z with the global gradient g̃ and loss L(z) of this batch.

        Returns:
            {"alpha", "backtracks", "failed"} of this step.
        """
        assert closure is not None, "P-BFGS evaluates trial points through the step's closure"
        g = g_D.detach().to(z_D.dtype)
        if not self.y_same_batch and self.g_prev is not None:
            self._update_inverse_hessian(self.s_prev, g - self.g_prev)
        p = -(self.B @ g)
        slope = float(g @ p)
        if not slope < 0:
            self._reset()
            self.stats["resets"] += 1
            p = -g
            slope = -float(g @ g)
        z0 = z_D.detach().clone()
        alpha, accepted = self.alpha0, False
        for k in range(self.max_backtracks + 1):
            if closure.loss(z0 + alpha * p) <= float(loss) + self.c * alpha * slope:
                accepted = True
                break
            alpha *= self.beta
        self.stats["steps"] += 1
        self.stats["backtracks"] += k  # shrinks between trials: a failed search's last shrink tries nothing
        if not accepted:
            z_D.copy_(z0)
            self.alpha0 = alpha  # the next search goes on from here
            self.g_prev = self.s_prev = None
            self.stats["failed"] += 1
            return {"alpha": 0.0, "backtracks": k, "failed": 1}
        self.alpha0 = 1.0
        s = alpha * p
        z_D.copy_(z0 + s)
        if self.y_same_batch:
            _, g_new = closure.grad(z_D.detach().clone())
            self._update_inverse_hessian(s, g_new.to(z_D.dtype) - g)
        else:
            self.g_prev, self.s_prev = g.clone(), s
        return {"alpha": alpha, "backtracks": k, "failed": 0}

    def state_dict(self) -> Dict[str, Any]:
        return {"B": self.B.clone(), "alpha0": self.alpha0, "g_prev": self.g_prev, "s_prev": self.s_prev,
                "stats": dict(self.stats), "scaled": self.scaled}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.B.copy_(state["B"])
        self.alpha0 = float(state.get("alpha0", 1.0))  # checkpoints from before alpha0 always started at 1
        # a checkpoint is loaded on the CPU: the pair moves to where B lives
        def move(t):
            return None if t is None else t.to(self.B.device, self.B.dtype)
        self.g_prev, self.s_prev = move(state["g_prev"]), move(state["s_prev"])
        self.stats = dict(state["stats"])
        # checkpoints from before init_scale: B still I means no pair was taken since the start or a reset
        eye = torch.eye(len(self.B), dtype=self.B.dtype, device=self.B.device)
        self.scaled = bool(state.get("scaled", not torch.equal(self.B, eye)))


def _check(options: Dict[str, Any]) -> List[str]:
    problems = []
    c, beta, k = options.get("c", 0.4), options.get("beta", 0.55), options.get("max_backtracks", 20)
    if not 0 < c < 1:
        problems.append(f"c={c}: the Armijo constant must be in (0, 1)")
    if not 0 < beta < 1:
        problems.append(f"beta={beta}: the backtracking factor must be in (0, 1)")
    if k < 1:
        problems.append(f"max_backtracks={k}: must be > 0")
    scale = options.get("init_scale", "none")
    if scale not in INIT_SCALES:
        problems.append(f"init_scale={scale!r}: choose one of {', '.join(INIT_SCALES)} (first_pair: B0 = "
                        f"(sᵀy/yᵀy)·I from the first curvature pair)")
    return problems


# B is a dense d×d matrix and its update makes ~3 more: at d = 8,192 that is ~1 GiB (float32); beyond, refuse
@OPTIMIZERS.register("pbfgs", check=_check, max_dim=8192, ignores=("momentum",))
def pbfgs(z, *, lr: float, momentum: float, weight_decay: float, c: float = 0.4, beta: float = 0.55,
          max_backtracks: int = 20, y_same_batch: bool = False, init_scale: str = "none"):
    """P-BFGS (DLDR Algorithm 2); train.lr, momentum and weight_decay are not used (the line search picks the
    step). Options: ``c`` (Armijo, 0.4), ``beta`` (backtracking, 0.55), ``max_backtracks`` (20),
    ``y_same_batch`` (false), ``init_scale`` (none | first_pair)."""
    return PBFGS(z, c=c, beta=beta, max_backtracks=max_backtracks, y_same_batch=y_same_batch, init_scale=init_scale)
