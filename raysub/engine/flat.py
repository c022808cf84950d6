"""The flat trainable-parameter vector of a model and its layout.

Shape suffixes used in numeric code across raysub: N = number of trainable parameters, D = subspace
dimension, T = number of trajectory snapshots, B = batch, C = classes. A module using others says so in its
docstring. (K names the snapshots' Gram matrix, never a dimension.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch


@dataclass(frozen=True)
class ParamEntry:
    name: str
    shape: Tuple[int, ...]
    offset: int
    numel: int


def param_layout(model: torch.nn.Module) -> List[ParamEntry]:
    """Trainable parameters in `named_parameters` order with their offsets in the flat vector.

    BatchNorm running statistics are buffers, not parameters: they are not part of the vector.
    """
    layout, offset = [], 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            layout.append(ParamEntry(name, tuple(p.shape), offset, p.numel()))
            offset += p.numel()
    return layout


def layout_to_json(layout: List[ParamEntry]) -> List[Dict]:
    return [{"name": e.name, "shape": list(e.shape), "offset": e.offset, "numel": e.numel} for e in layout]


def flatten_params(model: torch.nn.Module) -> torch.Tensor:
    """The trainable parameters concatenated into one detached vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


class FlatParams:
    """Parameters living as views into one flat buffer, with gradients landing in one flat buffer.

    The subspace step writes theta = theta0 + P z into ``theta_N`` in place and reads the full gradient from
    ``grad_N`` after backward: the per-parameter gradients are pre-assigned views of ``grad_N``, so autograd
    accumulates into them in place and no n-sized temporary is allocated for flattening.

    ``bind=True`` also makes these views the module's own parameters, so ``model(x)`` evaluates at theta with
    no re-parametrization per call; `state` serves `torch.func.functional_call` either way (both evaluate the
    same function; jobs/bench/step.py measures the step).

    Args:
        model: Supplies the layout and the buffers (BatchNorm statistics), which stay the model's own.
        theta_N: Initial flat parameter values (copied).
        bind: Replace the model's parameters by the flat views.
    """

    def __init__(self, model: torch.nn.Module, theta_N: torch.Tensor, bind: bool = False):
        self.layout = param_layout(model)
        self.theta_N = theta_N.detach().clone()
        self.grad_N = torch.zeros_like(self.theta_N)
        self.params: Dict[str, torch.Tensor] = {}
        for e in self.layout:
            p = self.theta_N[e.offset : e.offset + e.numel].view(e.shape)
            p.requires_grad_(True)
            p.grad = self.grad_N[e.offset : e.offset + e.numel].view(e.shape)
            self.params[e.name] = p
        self.buffers = dict(model.named_buffers())
        if bind:
            for name, p in self.params.items():
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                param = torch.nn.Parameter(p)  # an alias of the view: same storage
                param.grad = p.grad
                module._parameters[attr] = param
                self.params[name] = param

    def zero_grad(self) -> None:
        self.grad_N.zero_()

    def state(self) -> Dict[str, torch.Tensor]:
        """Parameters and buffers, for `torch.func.functional_call`."""
        return {**self.params, **self.buffers}
