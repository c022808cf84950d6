"""Class-gradient quasi-Newton (Tuddenham, Prügel-Bennett & Hare, "Quasi-Newton's method in the class gradient
defined high-curvature subspace"): Newton in the C-dimensional span of the class gradients, SGD in the rest.

A `SubspaceOptimizer` of z registered as ``cgqn``, driven by the one protocol (``step(z, g, loss, closure)``)
through the same loop as every other optimizer. With the ``identity`` projection z = θ − θ0 and D = N, so this
is the paper's full-parameter method; with any other projection it is the same method in z-coordinates (the
class gradients are Pᵀ∇z_k, the gradients of the logits with respect to z). For a cross-entropy classifier with
C classes, in D dimensions:

    c_k^B = (1/|B_k|) Σ_{μ∈B_k} Pᵀ∇z_k^μ                          per-class mean logit gradient   (eq. 16)
    λ_k^B = (1/|B|) Σ_{μ∈B} y_k^μ p_k^μ (1 − p_k^μ) |c_k^B|²        batch curvature along c_k        (eq. 17)
    c̄_k, λ̄_k: bias-corrected EMA of c_k^B and RMS-EMA of λ_k^B, factor γ           (eq. 16–17)
    z' = z − η g − Σ_k (1/λ̄_k − η)(v_kᵀ g) v_k,   v_k = c̄_k/|c̄_k|                (eq. 15)

The class gradients come from the step's closure: ``closure.class_sums(z)`` (`raysub.engine.task.StepClosure`)
is ONE forward and ONE batched vector-Jacobian product of the logits w.r.t. the flat θ
(``torch.autograd.grad(..., is_grads_batched=True)``: the backward vmapped over C+1 cotangents of shape (B, C)): cotangent k (< C) is 1 at (μ, k) for
every μ of class k — its VJP is Σ_{μ∈B_k} ∇z_k^μ — and cotangent C is (p − y), whose VJP is
Σ_μ Σ_k (p_k^μ − y_k^μ) ∇z_k^μ = |B|·g (eq. 5); each row is then projected with Pᵀ. Sums, not means, are
all-reduced under DDP together with the class counts, the curvature sums Σ_{μ∈B_k} p_k(1−p_k), the batch size and
the loss, in one all-reduce; dividing afterwards makes c_k the mean over the GLOBAL batch's class-k examples, so
every rank holds the same statistics and takes the same step. The optimizer itself only sees D-dimensional
tensors: it never touches the model, its parameters or the process group. Cost per step: the loop's own
forward/backward for g, plus forward + (C+1) batched backward passes for the class sums; memory (C+1)·N for the
VJPs (and (C+1)·D after projection) plus C·D for the EMA of the class gradients (fine for LeNet-5: N≈62k,
C=10). Measured on LeNet-5, one thread, batch 64: 81 ms against 12 ms for an SGD step through the same loop
(≈ 7×; the batched conv backward dominates) — the "C backward passes" cost of the paper's appendix B (an earlier
version, whose class sums also served as the gradient, measured 5.6× with 2 DDP workers; jobs/class_gradient_qn.py
reports the ratio of a run). (Grouping the batch by class and vmapping the forward over per-class parameter copies halves
it on LeNet, but changes what BatchNorm sees, so it is not done here.)

Design choices (each is an option):

* Orthogonalisation (``mode``). The paper assumes the c_k orthogonal (eq. 11); they are not (LeNet-5 on
  Fashion-MNIST: mean |cos| between the EMA class gradients ≈ 0.3, max ≈ 0.8–0.9 during training), and then
  eq. 15 taken literally is not a Newton step: the rank-one corrections of overlapping v_k add up (two nearly
  parallel v_k apply the correction along their common direction twice, overshooting to ≈ 2/λ), and
  I − Σ v_k v_kᵀ is not a projector.
  - ``"orthonormal"`` (default): build the paper's own low-rank Hessian from the same EMA statistics,
    H = Σ_k λ̄_k v_k v_kᵀ (eq. 11 without assuming orthogonality), take its exact eigen-system inside span{v_k}
    through the C×C Gram matrix (S = diag(√λ̄_k) V, eigh(S Sᵀ) = W Σ Wᵀ, eigenvectors e_j = Sᵀ w_j/√σ_j, which are
    orthonormal), and apply eq. 15 to (σ_j, e_j): Newton on span{v_k}, SGD on its orthogonal complement, with the
    true projector. It equals eq. 15 exactly whenever the paper's assumption holds, so it tests the paper's idea
    rather than an artefact of the assumption. Directions with σ_j ≤ ``rcond``·max σ (numerically dependent
    class gradients) are left to SGD. Cost: one C×C eigh and two D×C mat-vecs per step.
  - ``"paper"``: eq. 15 literally, v_k = c̄_k/|c̄_k|, with the same statistics (for comparison).
  - ``"sgd"``: the correction off: z' = z − η g (no class sums are computed). A comparison run uses the
    registered ``sgd`` optimizer instead, through the same loop.
* Classes absent from a (global) batch keep their previous EMA: c_k and λ_k are not updated with zeros, and each
  class counts its own observations t_k, so the bias correction (1 − γ)/(1 − γ^{t_k}) weighs exactly the batches
  that contained the class. A class never seen (t_k = 0: c̄_k = 0, λ̄_k = λ_k^(0) = 1) has no direction and takes
  no correction. The direction v_k = c̄_k/|c̄_k| does not depend on the bias correction (it cancels); λ̄_k does.
* γ = 0.9 by default: the paper's appendix D uses γ = 0.9 for all its experiments; sec. 2 argues for γ close to
  one because the class-gradient subspace changes slowly during training (Gur-Ari et al.).
* Weight decay is on z, like every optimizer of z (coupled L2, as torch.optim.SGD): g ← g + wd·z before the
  update, and the curvature of the decayed loss along each Newton direction is σ_j + wd (λ_k + wd in "paper"
  mode). With the ``identity`` projection z = θ − θ0, so it pulls θ towards θ0, not towards 0. ``damping``
  (default 0, the paper has none) adds a constant to the curvature before inverting (Levenberg–Marquardt).
* ``train.momentum`` is not used: the paper's Appendix D used heavy-ball momentum 0.9 for both methods; this
  optimizer has none, as the comparison here is plain SGD vs. plain quasi-Newton at the same η.

What eq. 12 gets wrong (measured on LeNet-5/Fashion-MNIST against the true Gauss–Newton curvature v_kᵀ H_GN v_k
of the batch, H_GN the first term of eq. 6, by a forward-mode JVP batched over the v_k): at initialisation the
logit gradients hardly depend on the class of the example, so the ε terms that eq. 10 drops are as large as the
kept ones and λ_k ≈ 0.015 is ~10× below the true curvature ≈ 0.15; the undamped Newton step along v_k is then
~10× too long and training blows up within a few steps (both modes, with or without bias correction). From the
first epoch on, λ_k is instead ~1–3× LARGER than that curvature (consistent with the sampling noise of c_k^B,
≈13 examples per class per batch of 128, inflating |c_k^B|²), i.e. the steps are too short. ``damping=1`` (the
scale of λ_k^(0)) avoids the blow-up; the shipped config (raysub/configs/fashion_mnist_lenet_cgqn.yaml) uses it.

BatchNorm buffers are not moved by the class sums (they run on copies); the loop's own forward updates them as
for every optimizer, and broadcasts them from rank 0 at the end of each epoch.

Shape suffixes (`raysub.engine.flat`'s legend): ``_D`` the subspace dimension, ``_N`` the parameters, ``_C`` the
classes (C of them; the class sums have C + 1 rows, the last the summed loss's), e.g. ``m_CD`` is C×D.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from raysub.optim.base import OPTIMIZERS, BatchClosure, SubspaceOptimizer
from raysub.errors import ConfigError

MODES = ("orthonormal", "paper", "sgd")


class ClassGradientQN(SubspaceOptimizer):
    """Class-gradient quasi-Newton (eq. 15–17) over z (see the module docstring).

    The statistics — ``m_CD`` (EMA of c_k, not bias-corrected, C×D), ``s_C`` and ``t_C`` — are allocated at the
    first step, when the closure's class sums tell C; a checkpoint restores them into a freshly built optimizer.

    Args:
        z_D: The coefficients (only their size, dtype and device are used here).
        lr: η.
        gamma: EMA factor γ in (0, 1) for the class gradients and the RMS of the eigenvalues (paper: 0.9).
        weight_decay: Coupled L2 decay on z (≥ 0).
        mode: "orthonormal" (default), "paper" or "sgd"; see the module docstring.
        damping: Added to the curvature before inverting (≥ 0; paper: 0).
        rcond: In "orthonormal" mode, eigen-directions with σ ≤ rcond·max σ are left to SGD.
        bias_correction: Eq. 17's (1-γ)/(1-γ^t) correction of the λ_k RMS (default). False: a plain EMA started at
            λ_k^(0) = 1 — the only reading of the paper under which its λ_k^(0) = 1 has any effect.
    """

    def __init__(self, z_D: torch.Tensor, *, lr: float, gamma: float = 0.9, weight_decay: float = 0.0,
                 mode: str = "orthonormal", damping: float = 0.0, rcond: float = 1e-6, bias_correction: bool = True):
        problems = _check({"gamma": gamma, "mode": mode, "damping": damping, "rcond": rcond})
        if problems:

            raise ConfigError([f"cgqn: {p}" for p in problems])
        self.lr, self.gamma, self.weight_decay = float(lr), float(gamma), float(weight_decay)
        self.mode, self.damping, self.rcond = mode, float(damping), float(rcond)
        self.bias_correction = bool(bias_correction)
        self.D, self.dtype, self.device = z_D.numel(), z_D.dtype, z_D.device
        self.C: Optional[int] = None
        self.m_CD: Optional[torch.Tensor] = None  # EMA of c_k (not bias-corrected)
        # (1-γ) Σ_{i≤t} γ^{t-i} (λ_k^(i))²: the EMA of λ_k² without its initial value's share γ^t (λ_k^(0))² = γ^t
        self.s_C: Optional[torch.Tensor] = None
        self.t_C: Optional[torch.Tensor] = None  # batches that contained class k
        self.steps = 0
        self.last: Dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ statistics
    def _allocate(self, C: int) -> None:
        self.C = int(C)
        self.m_CD = torch.zeros(self.C, self.D, device=self.device, dtype=self.dtype)
        self.s_C = torch.zeros(self.C, device=self.device, dtype=torch.float64)
        self.t_C = torch.zeros(self.C, device=self.device, dtype=torch.long)

    @torch.no_grad()
    def _stats_update(self, G_CD: torch.Tensor, extras: torch.Tensor) -> None:
        """Eq. 16–17: update the EMAs of the classes present in the global batch."""
        C, gamma = self.C, self.gamma
        counts, curv, b = extras[:C], extras[C : 2 * C], extras[2 * C]
        present = counts > 0
        G = G_CD[:C].to(self.m_CD.dtype)
        cB_CD = G / counts.clamp(min=1).to(G.dtype)[:, None]  # absent rows are 0 / 1 = 0
        lamB_C = curv / b * cB_CD.double().pow(2).sum(1)  # eq. 17, batch value
        w = (1 - gamma) * present.to(self.m_CD.dtype)
        self.m_CD.lerp_(cB_CD, w[:, None])  # weight 0: an absent class keeps its EMA
        self.s_C = torch.where(present, gamma * self.s_C + (1 - gamma) * lamB_C.pow(2), self.s_C)
        self.t_C += present.long()
        self.last.update(lambda_batch=lamB_C, present=present)

    def lambdas(self) -> torch.Tensor:
        """λ̄_k (float64): bias-corrected RMS-EMA of the batch eigenvalues; λ_k^(0) = 1 for unseen classes."""
        assert self.t_C is not None, "no statistics before the first step"
        g_t = self.gamma ** self.t_C.double()
        if not self.bias_correction:  # plain EMA started at λ_k^(0) = 1: γ^t·1 + (1-γ) Σ γ^{t-i} λ_i²
            return (g_t + self.s_C).sqrt()
        corr = (1 - g_t).clamp(min=1e-300)  # eq. 17
        return torch.where(self.t_C > 0, (self.s_C / corr).sqrt(), torch.ones_like(self.s_C))

    def class_gradients(self) -> torch.Tensor:
        """c̄_k (C, D): bias-corrected EMA of the class gradients; zero rows for unseen classes."""
        assert self.t_C is not None, "no statistics before the first step"
        corr = (1 - self.gamma ** self.t_C.double()).clamp(min=1e-300)
        return torch.where((self.t_C > 0)[:, None], self.m_CD / corr.to(self.m_CD.dtype)[:, None],
                           torch.zeros_like(self.m_CD))

    @torch.no_grad()
    def direction(self, g_D: torch.Tensor) -> torch.Tensor:
        """The step Δ with z' = z − Δ, for the current statistics and gradient g (eq. 15; g includes any decay)."""
        lr = self.lr
        if self.mode == "sgd" or self.m_CD is None:
            return lr * g_D
        g_D = g_D.to(self.m_CD.dtype)
        shift = self.weight_decay + self.damping
        lam = self.lambdas()
        norms = self.m_CD.double().norm(dim=1)
        valid = (self.t_C > 0) & (norms > 0)
        safe = torch.where(valid, norms, torch.ones_like(norms))
        h = (self.m_CD @ g_D).double()  # m_k·g
        if self.mode == "paper":
            # (1/λ_k − η)(v_k·g) v_k with v_k = m_k/|m_k|: coefficient of m_k is (1/λ_k − η)(m_k·g)/|m_k|².
            coef = torch.where(valid, (1.0 / (lam + shift) - lr) * h / safe.pow(2), torch.zeros_like(h))
            self.last.update(kept=int(valid.sum()))
        else:
            # H = Σ λ_k v_k v_kᵀ = SᵀS, S = diag(a) M, a_k = √λ_k/|m_k|; eigh(S Sᵀ) = W diag(σ) Wᵀ; e_j = Sᵀw_j/√σ_j.
            # Σ_j (1/σ_j − η)(e_j·g) e_j = Mᵀ diag(a) W diag((1/σ_j − η)/σ_j) Wᵀ diag(a) M g.
            a = torch.where(valid, lam.sqrt() / safe, torch.zeros_like(lam))
            m64 = self.m_CD.double()
            gram = (m64 @ m64.T) * a[:, None] * a[None, :]
            if not bool(torch.isfinite(gram).all()):  # diverged: propagate NaN instead of failing inside eigh
                self.last.update(sigma=torch.full_like(a, float("nan")), kept=0)
                return lr * g_D + float("nan")
            sigma, W = torch.linalg.eigh(gram)
            smax = sigma.max()
            keep = (sigma > self.rcond * smax) & (smax > 0)
            safe_sigma = torch.where(keep, sigma, torch.ones_like(sigma))
            f = torch.where(keep, (1.0 / (safe_sigma + shift) - lr) / safe_sigma, torch.zeros_like(sigma))
            coef = a * (W @ (f * (W.T @ (a * h))))
            self.last.update(sigma=sigma, kept=int(keep.sum()))
        return lr * g_D + coef.to(self.m_CD.dtype) @ self.m_CD

    # ---------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, z_D: torch.Tensor, g_D: torch.Tensor, loss: float,
             closure: Optional[BatchClosure] = None) -> Dict[str, float]:
        """One step from z with the global gradient g = Pᵀ∇L(z) of this batch; the class sums come from
        ``closure.class_sums(z)`` (global, the same on every rank).

        Returns:
            {"newton_directions": directions corrected this step, "lambda_mean": mean λ̄_k,
            "classes_present": classes in the global batch} ({} in "sgd" mode).
        """
        g = g_D.detach().to(z_D.dtype)
        if self.weight_decay:
            g = g + self.weight_decay * z_D.detach()
        stats: Dict[str, float] = {}
        if self.mode != "sgd":
            assert closure is not None, "class-gradient QN takes its class gradients from the step's closure"
            G_CD, extras = closure.class_sums(z_D.detach().clone())
            C = (extras.numel() - 2) // 2
            assert G_CD.shape == (C + 1, self.D) and extras.numel() == 2 * C + 2, \
                f"class sums of shape {tuple(G_CD.shape)} with {extras.numel()} extras for D={self.D}"
            if self.m_CD is None:
                self._allocate(C)
            assert C == self.C, f"the closure reports {C} classes, the statistics hold {self.C}"
            self._stats_update(G_CD.to(self.device), extras.to(self.device).double())
        z_D.sub_(self.direction(g).to(z_D.dtype))
        self.steps += 1
        if self.mode != "sgd":
            stats = {"newton_directions": float(self.last.get("kept", 0)),
                     "lambda_mean": float(self.lambdas().mean()),
                     "classes_present": float(self.last["present"].sum())}
        return stats

    def counters(self) -> Dict[str, float]:
        return {"steps": self.steps}

    # ------------------------------------------------------------------------------------------ reporting
    @torch.no_grad()
    def diagnostics(self) -> Dict[str, Any]:
        """λ̄_k, |c̄_k|, pairwise cosines of the class gradients and (orthonormal mode) the Newton eigenvalues."""
        if self.m_CD is None:
            return {"steps": self.steps}
        lam = self.lambdas()
        c = self.class_gradients().double()
        norms = c.norm(dim=1)
        seen = norms > 0
        u = c[seen] / norms[seen][:, None]
        cos = u @ u.T
        off = cos[~torch.eye(len(u), dtype=torch.bool)] if len(u) > 1 else torch.zeros(1, dtype=torch.float64)
        out = {"lambda": lam.tolist(), "c_norm": norms.tolist(), "seen_batches": self.t_C.tolist(),
               "cos_abs_mean": float(off.abs().mean()), "cos_abs_max": float(off.abs().max()),
               "steps": self.steps}
        if "sigma" in self.last:
            out["newton_eigenvalues"] = self.last["sigma"].tolist()
            out["newton_directions"] = self.last["kept"]
        return out

    def state_dict(self) -> Dict[str, Any]:
        # the keys keep the names checkpoints were first written with (the class suffix was K then)
        def clone(t):
            return None if t is None else t.detach().clone()
        return {"C": self.C, "m_KD": clone(self.m_CD), "s_K": clone(self.s_C), "t_K": clone(self.t_C),
                "steps": self.steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        if state["m_KD"] is None:  # saved before the first step
            self.C = self.m_CD = self.s_C = self.t_C = None
            return
        self._allocate(int(state["C"]))
        self.m_CD.copy_(state["m_KD"])
        self.s_C.copy_(state["s_K"])
        self.t_C.copy_(state["t_K"])


def _check(options: Dict[str, Any]) -> List[str]:
    problems = []
    gamma, damping = options.get("gamma", 0.9), options.get("damping", 0.0)
    rcond, mode = options.get("rcond", 1e-6), options.get("mode", "orthonormal")
    if not 0 < gamma < 1:
        problems.append(f"gamma={gamma}: must be in (0, 1)")
    if damping < 0:
        problems.append(f"damping={damping}: must be ≥ 0")
    if rcond < 0:
        problems.append(f"rcond={rcond}: must be ≥ 0")
    if mode not in MODES:
        problems.append(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    return problems


@OPTIMIZERS.register("cgqn", check=_check, ignores=("momentum",))
def cgqn(z, *, lr: float, momentum: float, weight_decay: float, gamma: float = 0.9, mode: str = "orthonormal",
         damping: float = 0.0, rcond: float = 1e-6, bias_correction: bool = True):
    """Class-gradient quasi-Newton (Tuddenham et al.; raysub.optim.cgqn): train.lr is η, train.weight_decay is
    coupled L2 on z, train.momentum is not used. Options: ``gamma`` (EMA factor, 0.9), ``mode`` (orthonormal |
    paper | sgd), ``damping`` (added to the curvature, 0), ``rcond`` (1e-6), ``bias_correction`` (true). Needs a
    closure with class sums (`raysub.engine.task.StepClosure`); the ``identity`` projection is the paper's
    full-parameter setting."""
    return ClassGradientQN(z, lr=lr, gamma=gamma, weight_decay=weight_decay, mode=mode, damping=damping,
                           rcond=rcond, bias_correction=bias_correction)
