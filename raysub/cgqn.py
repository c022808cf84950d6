"""Class-gradient quasi-Newton (Tuddenham, Prügel-Bennett & Hare, "Quasi-Newton's method in the class gradient
defined high-curvature subspace"): Newton in the C-dimensional span of the class gradients, SGD in the rest.

Over the FULL flat parameter vector θ (N floats, not a subspace), for a cross-entropy classifier with C classes:

    c_k^B = (1/|B_k|) Σ_{μ∈B_k} ∇z_k^μ                            per-class mean logit gradient   (eq. 16)
    λ_k^B = (1/|B|) Σ_{μ∈B} y_k^μ p_k^μ (1 − p_k^μ) |c_k^B|²        batch curvature along c_k        (eq. 17)
    c̄_k, λ̄_k: bias-corrected EMA of c_k^B and RMS-EMA of λ_k^B, factor γ           (eq. 16–17)
    θ' = θ − η g − Σ_k (1/λ̄_k − η)(v_kᵀ g) v_k,   v_k = c̄_k/|c̄_k|                (eq. 15)

One step is ONE forward and ONE batched vector-Jacobian product: ``torch.func.vjp`` of the logits w.r.t. the
parameters, then ``torch.func.vmap`` of the vjp function over C+1 cotangents of shape (B, C):
cotangent k (< C) is 1 at (μ, k) for every μ of class k — its VJP is Σ_{μ∈B_k} ∇z_k^μ — and cotangent C is
(p − y), whose VJP is Σ_μ Σ_k (p_k^μ − y_k^μ) ∇z_k^μ = |B|·g (eq. 5). Sums, not means, are all-reduced under DDP
together with the class counts, the curvature sums Σ_{μ∈B_k} p_k(1−p_k), the batch size and the loss, in one
all-reduce; dividing afterwards makes c_k the mean over the GLOBAL batch's class-k examples, so every rank holds
the same statistics and takes the same step. Cost: forward + (C+1) batched backward passes; memory (C+1)·N for
the VJPs plus C·N for the EMA of the class gradients (fine for LeNet-5: N≈62k, C=10). Measured on LeNet-5/
Fashion-MNIST, batch 128 over 2 CPU workers: ≈ 5.6× the SGD step of the same code (jobs/class_gradient_qn.py; the
batched conv backward dominates) — the "C backward passes" cost of the paper's appendix B. (Grouping the batch by
class and vmapping the forward over per-class parameter copies halves it on LeNet, but changes what BatchNorm
sees, so it is not done here.)

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
    class gradients) are left to SGD. Cost: one C×C eigh and two N×C mat-vecs per step.
  - ``"paper"``: eq. 15 literally, v_k = c̄_k/|c̄_k|, with the same statistics (for comparison).
  - ``"sgd"``: the correction off: θ' = θ − η g from the same forward/VJP/all-reduce code path (one cotangent),
    so a comparison with the quasi-Newton step uses identical machinery.
* Classes absent from a (global) batch keep their previous EMA: c_k and λ_k are not updated with zeros, and each
  class counts its own observations t_k, so the bias correction (1 − γ)/(1 − γ^{t_k}) weighs exactly the batches
  that contained the class. A class never seen (t_k = 0: c̄_k = 0, λ̄_k = λ_k^(0) = 1) has no direction and takes
  no correction. The direction v_k = c̄_k/|c̄_k| does not depend on the bias correction (it cancels); λ̄_k does.
* γ = 0.9 by default: the paper's appendix D uses γ = 0.9 for all its experiments; sec. 2 argues for γ close to
  one because the class-gradient subspace changes slowly during training (Gur-Ari et al.).
* Weight decay (coupled L2, as torch.optim.SGD): g ← g + wd·θ before the update, and the curvature of the
  decayed loss along each Newton direction is σ_j + wd (λ_k + wd in "paper" mode). ``damping`` (default 0, the
  paper has none) adds a constant to the curvature before inverting (Levenberg–Marquardt).
* The paper's Appendix D used heavy-ball momentum 0.9 for both methods; this optimizer (and its "sgd" mode) has
  none, as the comparison here is plain SGD vs. plain quasi-Newton at the same η.

What eq. 12 gets wrong (measured with `curvature_check` on LeNet-5/Fashion-MNIST): at initialisation the logit
gradients hardly depend on the class of the example, so the ε terms that eq. 10 drops are as large as the kept
ones and λ_k ≈ 0.015 is ~10× below the true Gauss–Newton curvature v_kᵀ H_GN v_k ≈ 0.15; the undamped Newton step
along v_k is then ~10× too long and training blows up within a few steps (both modes, with or without bias
correction). From the first epoch on, λ_k is instead ~1–3× LARGER than that curvature (consistent with the
sampling noise of c_k^B, ≈13 examples per class per batch of 128, inflating |c_k^B|²), i.e. the steps are too
short. ``damping=1`` (the scale of λ_k^(0)) avoids the blow-up.

BatchNorm buffers are updated by each rank's own forward (as DDP without SyncBatchNorm does); broadcast them
(``raysub.loop.broadcast_buffers_``) before evaluating when the model has any.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from raysub.errors import ConfigError

MODES = ("orthonormal", "paper", "sgd")


def _dist_world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def check_logits(model: torch.nn.Module, probe_x: torch.Tensor, num_classes: int, name: str) -> None:
    """One probe forward (eval mode, no grad; the model's mode is restored): the output must be (B, C) logits.

    Raises:
        ConfigError: one line naming the model and what is wrong.
    """
    b = int(probe_x.shape[0]) if probe_x.dim() > 0 else 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(probe_x)
    except Exception as e:  # any failure of the probe is a model/input mismatch for the user
        msg = " ".join(str(e).split())
        raise ConfigError(f"model {name!r} fails on a probe batch of shape {tuple(probe_x.shape)}: "
                          f"{type(e).__name__}: {msg[:200]}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"model {name!r} returns {type(out).__name__}, expected a ({b}, {num_classes}) tensor "
                          f"of class logits")
    if not out.is_floating_point():
        raise ConfigError(f"model {name!r} returns {out.dtype} values, expected floating-point class logits")
    if out.dim() != 2 or out.shape[0] != b or out.shape[1] != num_classes:
        raise ConfigError(f"model {name!r} returns shape {tuple(out.shape)} on a probe batch of {b} examples, "
                          f"expected ({b}, {num_classes}): one logit per class (num_classes={num_classes})")


class ClassGradientQN:
    """Class-gradient quasi-Newton (eq. 15–17) over all trainable parameters of ``model``.

    The trainable parameters are moved into one flat vector ``theta_N`` (each ``p.data`` becomes a view of it),
    so ``model(x)`` always evaluates at the current θ and the optimizer updates θ in place.

    Args:
        model: A classifier returning (B, num_classes) logits; trained with cross-entropy.
        num_classes: C.
        probe_x: An input batch used once to check the model's output shape.
        lr: η (> 0).
        gamma: EMA factor γ in (0, 1) for the class gradients and the RMS of the eigenvalues (paper: 0.9).
        weight_decay: Coupled L2 decay (≥ 0).
        mode: "orthonormal" (default), "paper" or "sgd"; see the module docstring.
        damping: Added to the curvature before inverting (≥ 0; paper: 0).
        rcond: In "orthonormal" mode, eigen-directions with σ ≤ rcond·max σ are left to SGD.
        bias_correction: Eq. 17's (1-γ)/(1-γ^t) correction of the λ_k RMS (default). False: a plain EMA started at
            λ_k^(0) = 1 — the only reading of the paper under which its λ_k^(0) = 1 has any effect.
        name: The model's name in error messages (default: its class name).
        sync_initial: Under DDP, broadcast rank 0's θ to every rank at construction (a collective: every rank
            must construct the optimizer).

    Raises:
        ConfigError: bad hyperparameters, or a model whose output is not (B, C) logits.
    """

    def __init__(self, model: torch.nn.Module, num_classes: int, probe_x: torch.Tensor, *, lr: float,
                 gamma: float = 0.9, weight_decay: float = 0.0, mode: str = "orthonormal", damping: float = 0.0,
                 rcond: float = 1e-6, bias_correction: bool = True, name: Optional[str] = None,
                 sync_initial: bool = True):
        name = name or type(model).__name__
        problems = []
        if not isinstance(num_classes, int) or num_classes < 2:
            problems.append(f"num_classes={num_classes!r} must be an integer ≥ 2")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            problems.append(f"lr={lr!r} must be > 0")
        if not (isinstance(gamma, (int, float)) and 0 < gamma < 1):
            problems.append(f"gamma={gamma!r} must be in (0, 1)")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            problems.append(f"weight_decay={weight_decay!r} must be ≥ 0")
        if not (isinstance(damping, (int, float)) and damping >= 0):
            problems.append(f"damping={damping!r} must be ≥ 0")
        if mode not in MODES:
            problems.append(f"mode={mode!r}: choose one of {', '.join(MODES)}")
        if problems:
            raise ConfigError([f"ClassGradientQN for model {name!r}: {p}" for p in problems])
        check_logits(model, probe_x, num_classes, name)

        self.model, self.name, self.C = model, name, num_classes
        self.lr, self.gamma, self.weight_decay = float(lr), float(gamma), float(weight_decay)
        self.mode, self.damping, self.rcond = mode, float(damping), float(rcond)
        self.bias_correction = bool(bias_correction)

        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError(f"ClassGradientQN: model {name!r} has no trainable parameters")
        kinds = {(p.dtype, p.device) for _, p in trainable}
        if len(kinds) > 1:
            raise ConfigError(f"ClassGradientQN: model {name!r} mixes parameter dtypes/devices "
                              f"{sorted(str(k) for k in kinds)}; one flat vector needs a single dtype and device")
        self.names = [n for n, _ in trainable]
        self.theta_N = torch.cat([p.detach().reshape(-1) for _, p in trainable])
        self.N = self.theta_N.numel()
        self._views: List[torch.Tensor] = []
        offset = 0
        for _, p in trainable:
            view = self.theta_N[offset : offset + p.numel()].view(p.shape)
            p.data = view  # the module's parameter now lives in theta_N
            self._views.append(view)
            offset += p.numel()
        self._frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        if sync_initial and _dist_world() > 1:
            import torch.distributed as dist

            dist.broadcast(self.theta_N, src=0)

        dev, dt = self.theta_N.device, self.theta_N.dtype
        self.m_KN = torch.zeros(self.C, self.N, device=dev, dtype=dt)  # EMA of c_k (not bias-corrected)
        # (1-γ) Σ_{i≤t} γ^{t-i} (λ_k^(i))²: the EMA of λ_k² without its initial value's share γ^t (λ_k^(0))² = γ^t
        self.s_K = torch.zeros(self.C, device=dev, dtype=torch.float64)
        self.t_K = torch.zeros(self.C, device=dev, dtype=torch.long)  # batches that contained class k
        self.steps = 0
        self.last: Dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ gradients
    def _logits_fn(self, x: torch.Tensor):
        model, names, frozen = self.model, self.names, self._frozen

        def f(*params):
            state = dict(zip(names, params))
            state.update(frozen)
            state.update(dict(model.named_buffers()))
            return torch.func.functional_call(model, state, (x,))

        return f

    def batch_sums(self, x: torch.Tensor, y: torch.Tensor, with_classes: bool = True
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's sums from one forward and one batched VJP (no all-reduce, no update).

        Returns:
            G_KN: (C+1, N) if ``with_classes`` — rows k < C: Σ_{μ∈B_k} ∇z_k^μ, row C: Σ_μ (p^μ − y^μ)·∇z^μ
                (= |B|·g); else (1, N) holding only the last row.
            extras: (2C+2,) [class counts (C), Σ_{μ∈B_k} p_k(1−p_k) (C), |B|, Σ_μ loss^μ].
        """
        C = self.C
        logits, vjp_fn = torch.func.vjp(self._logits_fn(x), *self._views)
        with torch.no_grad():
            logits = logits.detach()
            probs = torch.softmax(logits, dim=1)
            onehot = F.one_hot(y, C).to(probs.dtype)
            resid = probs - onehot
            if with_classes:
                b = y.numel()
                cot = torch.zeros(C + 1, b, C, device=logits.device, dtype=logits.dtype)
                cot[y, torch.arange(b, device=y.device), y] = 1.0
                cot[C] = resid
                grads = torch.func.vmap(vjp_fn)(cot)
                k = C + 1
            else:
                grads = tuple(g.unsqueeze(0) for g in vjp_fn(resid.to(logits.dtype)))
                k = 1
            G_KN = torch.cat([g.reshape(k, -1) for g in grads], dim=1)
            extras = torch.cat([
                onehot.sum(0),
                (onehot * probs * (1 - probs)).sum(0),
                torch.tensor([float(y.numel())], dtype=probs.dtype, device=probs.device),
                F.cross_entropy(logits, y, reduction="sum").reshape(1).to(probs.dtype),
            ])
        return G_KN, extras

    def _global_sums(self, x, y, with_classes: bool):
        G_KN, extras = self.batch_sums(x, y, with_classes)
        if _dist_world() > 1:
            import torch.distributed as dist

            k, n = G_KN.shape
            buf = torch.cat([G_KN.reshape(-1), extras.to(G_KN.dtype)])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            G_KN, extras = buf[: k * n].view(k, n), buf[k * n :]
        return G_KN, extras.double()

    # ---------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def _stats_update(self, G_KN: torch.Tensor, extras: torch.Tensor) -> None:
        """Eq. 16–17: update the EMAs of the classes present in the global batch."""
        C, gamma = self.C, self.gamma
        counts, curv, b = extras[:C], extras[C : 2 * C], extras[2 * C]
        present = counts > 0
        cB_KN = G_KN[:C] / counts.clamp(min=1).to(G_KN.dtype)[:, None]  # absent rows are 0 / 1 = 0
        lamB_K = curv / b * cB_KN.double().pow(2).sum(1)  # eq. 17, batch value
        w = (1 - gamma) * present.to(self.m_KN.dtype)
        self.m_KN.lerp_(cB_KN, w[:, None])  # weight 0: an absent class keeps its EMA
        self.s_K = torch.where(present, gamma * self.s_K + (1 - gamma) * lamB_K.pow(2), self.s_K)
        self.t_K += present.long()
        self.last.update(lambda_batch=lamB_K, present=present)

    def lambdas(self) -> torch.Tensor:
        """λ̄_k (float64): bias-corrected RMS-EMA of the batch eigenvalues; λ_k^(0) = 1 for unseen classes."""
        g_t = self.gamma ** self.t_K.double()
        if not self.bias_correction:  # plain EMA started at λ_k^(0) = 1: γ^t·1 + (1-γ) Σ γ^{t-i} λ_i²
            return (g_t + self.s_K).sqrt()
        corr = (1 - g_t).clamp(min=1e-300)  # eq. 17
        return torch.where(self.t_K > 0, (self.s_K / corr).sqrt(), torch.ones_like(self.s_K))

    def class_gradients(self) -> torch.Tensor:
        """c̄_k (C, N): bias-corrected EMA of the class gradients; zero rows for unseen classes."""
        corr = (1 - self.gamma ** self.t_K.double()).clamp(min=1e-300)
        return torch.where((self.t_K > 0)[:, None], self.m_KN / corr.to(self.m_KN.dtype)[:, None],
                           torch.zeros_like(self.m_KN))

    @torch.no_grad()
    def direction(self, g_N: torch.Tensor) -> torch.Tensor:
        """The step Δ with θ' = θ − Δ, for the current statistics and gradient g (eq. 15)."""
        lr = self.lr
        if self.mode == "sgd":
            return lr * g_N
        shift = self.weight_decay + self.damping
        lam = self.lambdas()
        norms = self.m_KN.double().norm(dim=1)
        valid = (self.t_K > 0) & (norms > 0)
        safe = torch.where(valid, norms, torch.ones_like(norms))
        h = (self.m_KN @ g_N).double()  # m_k·g
        if self.mode == "paper":
            # (1/λ_k − η)(v_k·g) v_k with v_k = m_k/|m_k|: coefficient of m_k is (1/λ_k − η)(m_k·g)/|m_k|².
            coef = torch.where(valid, (1.0 / (lam + shift) - lr) * h / safe.pow(2), torch.zeros_like(h))
        else:
            # H = Σ λ_k v_k v_kᵀ = SᵀS, S = diag(a) M, a_k = √λ_k/|m_k|; eigh(S Sᵀ) = W diag(σ) Wᵀ; e_j = Sᵀw_j/√σ_j.
            # Σ_j (1/σ_j − η)(e_j·g) e_j = Mᵀ diag(a) W diag((1/σ_j − η)/σ_j) Wᵀ diag(a) M g.
            a = torch.where(valid, lam.sqrt() / safe, torch.zeros_like(lam))
            m64 = self.m_KN.double()
            gram = (m64 @ m64.T) * a[:, None] * a[None, :]
            if not bool(torch.isfinite(gram).all()):  # diverged: propagate NaN instead of failing inside eigh
                self.last.update(sigma=torch.full_like(a, float("nan")), kept=0)
                return lr * g_N + float("nan")
            sigma, W = torch.linalg.eigh(gram)
            smax = sigma.max()
            keep = (sigma > self.rcond * smax) & (smax > 0)
            safe_sigma = torch.where(keep, sigma, torch.ones_like(sigma))
            f = torch.where(keep, (1.0 / (safe_sigma + shift) - lr) / safe_sigma, torch.zeros_like(sigma))
            coef = a * (W @ (f * (W.T @ (a * h))))
            self.last.update(sigma=sigma, kept=int(keep.sum()))
        return lr * g_N + coef.to(self.m_KN.dtype) @ self.m_KN

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One step on the batch (this rank's shard under DDP). Returns the global batch's mean loss before it."""
        if y.numel() == 0:
            raise ValueError("ClassGradientQN.step: empty batch")
        correct = self.mode != "sgd"
        G_KN, extras = self._global_sums(x, y, correct)
        with torch.no_grad():
            b = extras[2 * self.C]
            g_N = G_KN[-1] / b.to(G_KN.dtype)
            if self.weight_decay:
                g_N = g_N + self.weight_decay * self.theta_N
            if correct:
                self._stats_update(G_KN, extras)
            self.theta_N.sub_(self.direction(g_N))
        self.steps += 1
        return float(extras[2 * self.C + 1] / b)

    # ------------------------------------------------------------------------------------------ reporting
    @torch.no_grad()
    def diagnostics(self) -> Dict[str, Any]:
        """λ̄_k, |c̄_k|, pairwise cosines of the class gradients and (orthonormal mode) the Newton eigenvalues."""
        lam = self.lambdas()
        c = self.class_gradients().double()
        norms = c.norm(dim=1)
        seen = norms > 0
        u = c[seen] / norms[seen][:, None]
        cos = u @ u.T
        off = cos[~torch.eye(len(u), dtype=torch.bool)] if len(u) > 1 else torch.zeros(1, dtype=torch.float64)
        out = {"lambda": lam.tolist(), "c_norm": norms.tolist(), "seen_batches": self.t_K.tolist(),
               "cos_abs_mean": float(off.abs().mean()), "cos_abs_max": float(off.abs().max()),
               "steps": self.steps}
        if "sigma" in self.last:
            out["newton_eigenvalues"] = self.last["sigma"].tolist()
            out["newton_directions"] = self.last["kept"]
        return out

    def curvature_check(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, List[float]]:
        """The paper's λ̄_k next to the Gauss–Newton curvature v_kᵀ H_GN v_k on the batch (x, y) (local, no
        all-reduce), H_GN the first term of eq. 6: (1/|B|) Σ_μ J_μᵀ (diag p^μ − p^μ p^μᵀ) J_μ. One forward-mode JVP
        batched over the seen classes' v_k. A diagnostic of eq. 10–12 (which drop the ε terms of eq. 9)."""
        c = self.class_gradients()
        norms = c.norm(dim=1)
        seen = (norms > 0).nonzero().flatten()
        lam = self.lambdas()
        out = {"class": seen.tolist(), "lambda": lam[seen].tolist(), "gn": []}
        if len(seen) == 0:
            return out
        V = c[seen] / norms[seen][:, None]
        f = self._logits_fn(x)

        def flat_f(theta):
            params, offset = [], 0
            for v in self._views:
                params.append(theta[offset : offset + v.numel()].view(v.shape))
                offset += v.numel()
            return f(*params)

        with torch.no_grad():
            p = torch.softmax(flat_f(self.theta_N), dim=1)
            jv = torch.func.vmap(lambda t: torch.func.jvp(flat_f, (self.theta_N,), (t,))[1])(V)  # (K, B, C)
            curv = ((p * jv * jv).sum(2) - (p * jv).sum(2).pow(2)).mean(1)
        out["gn"] = curv.double().tolist()
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"theta_N": self.theta_N.clone(), "m_KN": self.m_KN.clone(), "s_K": self.s_K.clone(),
                "t_K": self.t_K.clone(), "steps": self.steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.theta_N.copy_(state["theta_N"])
        self.m_KN.copy_(state["m_KN"])
        self.s_K.copy_(state["s_K"])
        self.t_K.copy_(state["t_K"])
        self.steps = int(state["steps"])
