"""The learner of meta-training, on the driver: it turns the optimizees' meta-gradients into φ's step and picks
the best φ among the meta-validations.

- `pes_contributions` — PES's antithetic pairs of optimizees turned into one meta-gradient estimate per pair;
- `combine` — drop the non-finite (or diverged) contributions, clip each by global norm, average;
- `step_phi` — one Adam step of φ on that average;
- `mean_validation` — one meta-validation's row, the mean over its optimizees;
- `select` — the best row (val accuracy within a tolerance, then the fastest convergence step).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch


def combine(contributions: Sequence[Tuple[str, Dict[str, torch.Tensor], Optional[str]]], clip: float, say=print
            ) -> Tuple[Optional[Dict[str, torch.Tensor]], List[str], float]:
    """Average the optimizees' meta-gradients, each clipped to global norm ``clip`` first; drop the bad ones.

    Clipping each contribution (not only the average) keeps one optimizee whose loss is taking off — its
    meta-gradient can be 10⁶× the others' — from steering φ alone.

    Args:
        contributions: (optimizee name, meta-grad dict, why it is dropped or None) triples, dicts with the same
            keys; a contribution with non-finite values is dropped too.
        clip: The largest global L2 norm of one optimizee's meta-gradient.

    Returns:
        (the average, or None when every contribution was dropped; the names dropped; the mean of the kept
        contributions' norms before clipping (nan when none)).
    """
    kept, dropped, norms = [], [], []
    for name, grads, why in contributions:
        if why is None and not all(bool(torch.isfinite(v).all()) for v in grads.values()):
            why = "non-finite values"
        if why is not None:
            dropped.append(name)
            say(f"raysub: warning: dropped the meta-gradient of {name}: {why}")
            continue
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in grads.values()))
        norms.append(norm)
        kept.append({k: v.double() * (clip / norm if norm > clip else 1.0) for k, v in grads.items()})
    if not kept:
        return None, dropped, float("nan")
    avg = {k: torch.stack([g[k] for g in kept]).mean(0).to(contributions[0][1][k].dtype) for k in kept[0]}
    return avg, dropped, sum(norms) / len(norms)


def pes_estimate(value_plus: float, value_minus: float, xi: Dict[str, torch.Tensor], sigma: float
                 ) -> Dict[str, torch.Tensor]:
    """PES's antithetic estimate of dMeta/dφ from one pair (Vicol et al. 2021, eq. 8 with N = 1 pair):
    (L(φ+ε) − L(φ−ε)) · ξ / (2σ²), where L± are the pair's meta-losses over this unroll and ξ the + particle's
    perturbations summed over every unroll of its optimizee so far (its own and the earlier ones): the earlier
    perturbations shaped the state this unroll starts from, so the estimate is unbiased for the whole horizon."""
    scale = (value_plus - value_minus) / (2.0 * sigma * sigma)
    return {k: v * scale for k, v in xi.items()}


def pes_contributions(results: Sequence[Dict[str, Any]], sigma: float
                      ) -> List[Tuple[str, Dict[str, torch.Tensor], Optional[str]]]:
    """`combine`'s input from PES particles: each pair's two results (``r["pes"]`` = {"pair", "sign", "value",
    "xi"}) become one estimate (`pes_estimate`); a pair with a non-finite meta-loss is dropped with its reason.
    Pairs are combined before `combine` clips: the two halves are huge and nearly cancel."""
    pairs: Dict[int, Dict[int, Dict[str, Any]]] = {}
    for r in results:
        pairs.setdefault(r["pes"]["pair"], {})[r["pes"]["sign"]] = r
    out = []
    for k in sorted(pairs):
        plus, minus = pairs[k].get(1), pairs[k].get(-1)
        assert plus is not None and minus is not None, f"PES pair {k} is missing a particle"
        vp, vm = plus["pes"]["value"], minus["pes"]["value"]
        why = None if math.isfinite(vp) and math.isfinite(vm) else (
            f"a non-finite meta-loss in the pair ({vp:.4g}, {vm:.4g})")
        xi = plus["pes"]["xi"]
        out.append((f"PES pair {k} ({plus['name']})",
                    pes_estimate(vp, vm, xi, sigma) if why is None else {n: torch.zeros_like(v) for n, v in xi.items()},
                    why))
    return out


def select(rows: Sequence[Optional[Dict[str, Any]]], tolerance: float, by: str = "speed") -> Optional[int]:
    """Index of the best meta-validation in ``rows`` (None entries skipped; None if there is none).

    The rule (``l2o.select_tolerance`` = tol): among the rows whose val accuracy is within tol of the best val
    accuracy, the smallest mean convergence step (None = never converged = ∞); ties → higher val accuracy, then
    the earlier row. So φ is chosen for speed (SL2O's metric) without giving up accuracy: the meta-test goal
    asks for both. With tol = 0 it is "highest val accuracy, ties → smaller convergence step".
    """
    live = [(i, r) for i, r in enumerate(rows) if r is not None]
    if not live:
        return None
    top = max(r["val_acc"] for _, r in live)
    inf = float("inf")

    def key(r):  # by="final_loss" (``l2o.select_by``): the lowest smoothed training loss at the runs' end instead
        if by == "final_loss":
            loss = r.get("final_loss")
            return loss if loss is not None and math.isfinite(loss) else inf
        return r["convergence_step"] if r["convergence_step"] is not None else inf

    ok = [(key(r), -r["val_acc"], i) for i, r in live if r["val_acc"] >= top - tolerance]
    return min(ok)[2]


def mean_validation(rows: List[Dict[str, Any]], meta_step: int) -> Dict[str, Any]:
    """One meta-validation's history row: the mean over its optimizees' `OptimizeeWorker.validate` rows (the
    convergence step is None unless every optimizee converged)."""
    steps = [r["convergence_step"] for r in rows]
    return {"meta_step": meta_step, "val_acc": sum(r["val_acc"] for r in rows) / len(rows),
            "val_loss": sum(r["val_loss"] for r in rows) / len(rows),
            "final_train_loss": sum(r["final_train_loss"] for r in rows) / len(rows),
            "convergence_step": (sum(steps) / len(steps)) if all(s is not None for s in steps) else None,
            "final_loss": sum(r.get("final_loss", math.inf) for r in rows) / len(rows),
            "seeds": [r["seed"] for r in rows]}


def step_phi(adam: torch.optim.Optimizer, phi: Dict[str, torch.Tensor], avg: Dict[str, torch.Tensor]) -> None:
    """One step of the meta-optimizer ``adam`` over φ with the averaged meta-gradient ``avg`` (`combine`)."""
    adam.zero_grad(set_to_none=False)
    for k, v in phi.items():
        v.grad = avg[k].to(v.dtype)
    adam.step()
