"""The layerwise low-rank U·V reparametrisation (SL2O §3.2, after LoRA): a model transformation.

Each chosen linear layer y = x Wᵀ + b (W ∈ R^{d1×d2}, d1 = out, d2 = in features) becomes

    y = x (W0 + U V)ᵀ + b,   U ∈ R^{d1×r} drawn N(0, σ²),  V = 0 ∈ R^{r×d2},  W0 and b frozen,

so at the start ΔW = U V is exactly 0 (U @ 0 sums exact zeros, and W0 + 0 = W0 bit for bit): the transformed
model computes the base model's logits exactly. Only U, V and the parameters under the ``trainable`` prefixes
(the classification head) keep ``requires_grad``; every other parameter is frozen (a parameter with
``requires_grad=False``: DDP neither all-reduces nor broadcasts it per step, and raysub's flat vector —
`raysub.engine.flat.param_layout` — holds exactly the trainable ones). So the ``identity`` projection, every
† optimizer and the learned optimizer drive U, V and the head with no special case.

σ defaults to 1/√r: then E[U Uᵀ] = I, so the first gradient step on V, which moves W by −lr·U Uᵀ ∂L/∂W, is full
fine-tuning's step −lr·∂L/∂W in expectation (one draw of U Uᵀ has rank r and eigenvalues near d1/r: the step is
larger, about √((d1 + r + 1)/r)× in norm, and lies in a random r-dimensional subspace). The scale of U sets the
effective learning rate of V; the optimizers' lrs are tuned with it.

SL2O uses r = 16 and, following LoRA, reparametrises only the attention weights (q, k, v, out: `raysub.models.vit`).
The merged weight W0 + U V is formed once per forward (d1·d2·r multiply-adds) and used in one GEMM: cheaper than
the two skinny GEMMs of x Vᵀ Uᵀ whenever the batch has more rows than d1·d2/(d1+d2) (always, in training here).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raysub.errors import ConfigError


class LowRankLinear(nn.Module):
    """y = x (W0 + U V)ᵀ + b with W0 and b frozen and U, V trainable.

    Args:
        base: The linear layer whose weight and bias become the frozen W0 and b (copied).
        rank: r, 1 ≤ r ≤ min(d1, d2).
        init_std: σ of U's entries.
        generator: Draws U (a CPU generator: the draw does not depend on the device).
    """

    def __init__(self, base: nn.Linear, rank: int, init_std: float, generator: torch.Generator):
        super().__init__()
        d1, d2 = base.weight.shape
        self.in_features, self.out_features, self.rank = d2, d1, rank
        w = base.weight.detach()
        self.weight = nn.Parameter(w.clone(), requires_grad=False)
        self.bias = (nn.Parameter(base.bias.detach().clone(), requires_grad=False) if base.bias is not None
                     else None)
        self.U = nn.Parameter((torch.randn(d1, rank, generator=generator, dtype=torch.float64) * init_std)
                              .to(device=w.device, dtype=w.dtype))
        self.V = nn.Parameter(torch.zeros(rank, d2, device=w.device, dtype=w.dtype))

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.U @ self.V

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def uv_problems(uv) -> List[str]:
    """Problems of a ``model.uv`` section that need no model (the rank against each layer's shape, and the
    targets against its names, are `apply_uv`'s). Empty: fine, or no reparametrisation."""
    return [] if uv.rank is None else _setting_problems(uv.rank, uv.targets, uv.init_std)


def _setting_problems(rank, targets: Sequence[str], init_std) -> List[str]:
    """The checks of rank, targets and σ that need no model: one copy, for the config (`uv_problems`) and for a
    direct call (`apply_uv`)."""
    problems = []
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        problems.append(f"model.uv.rank={rank!r}: must be a positive integer ≤ min(d1, d2) of the layers (SL2O uses "
                        f"16); leave it unset for no UV reparametrisation")
    if not targets:
        problems.append("model.uv.targets is empty: name the linear layers to reparametrise, e.g. [q, k, v, out]")
    if init_std is not None and not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
        problems.append(f"model.uv.init_std={init_std!r}: must be a finite number > 0 (default 1/√rank)")
    return problems


def _matches(name: str, target: str) -> bool:
    """A module name matches a target when the target is its last dotted component(s): ``q`` matches
    ``blocks.0.attn.q``, ``attn.q`` too, ``0.attn.q`` too; ``blocks.0.attn.q`` matches only itself."""
    return name == target or name.endswith("." + target)


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def apply_uv(model: nn.Module, rank: int, targets: Sequence[str] = ("q", "k", "v", "out"),
             trainable: Sequence[str] = ("head",), init_std: Optional[float] = None, seed: int = 0,
             model_name: str = "model") -> Dict[str, Any]:
    """Replace the linear layers named by ``targets`` with `LowRankLinear` (in place) and freeze all but U, V and
    the ``trainable`` parameters.

    Args:
        model: The model (its weights become W0).
        rank: r of every reparametrised layer.
        targets: Module-name suffixes (`_matches`) of the linear layers to reparametrise.
        trainable: Parameter-name prefixes that stay trainable besides U and V (module names: ``head`` keeps
            ``head.weight``, ``head.bias``, ``head.0.weight`` …).
        init_std: σ of U (default 1/√r).
        seed: Draws U, layer after layer in module order.
        model_name: For messages.

    Returns:
        {"layers": names of the reparametrised layers, "num_trainable", "num_params" (all, frozen included)}.

    Raises:
        ConfigError: a rank ≤ 0 or above min(d1, d2) of a matched layer, a target matching no module or a module
            that is not linear, a trainable prefix matching no parameter — every problem at once, one line each.
    """
    problems = _setting_problems(rank, targets, init_std)
    if problems:  # nothing below can be checked without a valid rank and targets
        raise ConfigError(problems)
    std = 1.0 / math.sqrt(rank) if init_std is None else float(init_std)
    modules = dict(model.named_modules())
    linear_names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    chosen: List[str] = []
    for target in targets:
        hits = [n for n in modules if n and _matches(n, target)]
        if not hits:
            known = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            problems.append(f"model.uv.targets: {target!r} matches no module of model {model_name!r}: its linear "
                            f"layers are named {', '.join(known)}")
            continue
        not_linear = [n for n in hits if not isinstance(modules[n], nn.Linear)]
        if not_linear:
            problems.append(f"model.uv.targets: {target!r} matches {not_linear[0]}, a "
                            f"{type(modules[not_linear[0]]).__name__}, not a linear layer: name linear layers only")
            continue
        chosen += [n for n in hits if n not in chosen]
    for name in chosen:
        d1, d2 = modules[name].weight.shape
        if rank > min(d1, d2):
            problems.append(f"model.uv.rank={rank} exceeds min(d1, d2)={min(d1, d2)} of {name} ({d1}×{d2}): choose "
                            f"1..{min(d1, d2)}")
            break
    param_names = [n for n, _ in model.named_parameters()]
    for prefix in trainable:
        if not any(_is_under(n, prefix) for n in param_names):
            problems.append(f"model.uv.trainable: {prefix!r} matches no parameter of model {model_name!r} (a module "
                            f"name prefix such as head)")
    if problems:
        raise ConfigError(problems)
    gen = torch.Generator().manual_seed(seed)
    chosen.sort(key=list(modules).index)  # module order: U's draw does not depend on the order of targets
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LowRankLinear(modules[name], rank, std, gen))
    for name, p in model.named_parameters():
        keep = name.endswith(".U") or name.endswith(".V") or any(_is_under(name, t) for t in trainable)
        p.requires_grad_(keep)
    return {"layers": chosen, "num_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "num_params": sum(p.numel() for p in model.parameters())}


def fold_uv(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A UV model's state dict as its base architecture's: W = W0 + U V for every reparametrised layer, U and V
    dropped (what ``train.init_from`` loads from a UV model sampled with ``raysub sample``). A state without U/V
    comes back unchanged."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".U")]:
        prefix = key[: -len(".U")]
        u, v = out.pop(key), out.pop(prefix + ".V")
        w = out[prefix + ".weight"]
        out[prefix + ".weight"] = (w + u.to(w.dtype) @ v.to(w.dtype)).detach()
    return out
