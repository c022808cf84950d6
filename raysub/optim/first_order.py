"""The first-order optimizers of z — SGD†, Momentum† (P-SGD), Adam†, RMSprop† of the SL2O tables: torch's own
optimizers over the single tensor z, so momentum and adaptive statistics live in D dimensions.

Shape suffixes (`raysub.engine.flat`'s legend): ``_D`` the subspace dimension (``z_D``, ``g_D``)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from raysub.optim.base import OPTIMIZERS, BatchClosure, SubspaceOptimizer


class TorchOptimizer(SubspaceOptimizer):
    """A ``torch.optim`` optimizer over ``[z]`` behind the protocol: ``step`` sets ``z.grad = g`` and steps."""

    def __init__(self, z_D: torch.Tensor, make):
        self.z = z_D
        self.opt = make([z_D])
        self.lr = self.opt.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        super().set_lr(lr)
        for group in self.opt.param_groups:
            group["lr"] = self.lr

    @torch.no_grad()
    def step(self, z_D: torch.Tensor, g_D: torch.Tensor, loss: float,
             closure: Optional[BatchClosure] = None) -> Dict[str, float]:
        assert z_D is self.z, "a torch optimizer steps the z it was built over"
        z_D.grad = g_D.to(z_D.dtype)
        self.opt.step()
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.opt.load_state_dict(state)


@OPTIMIZERS.register("psgd")
def psgd(z, *, lr: float, momentum: float, weight_decay: float, nesterov: bool = False):
    """P-SGD (DLDR): SGD with heavy-ball momentum ``train.momentum`` on z (Momentum†)."""
    return TorchOptimizer(z, lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                                       nesterov=nesterov))


@OPTIMIZERS.register("sgd", ignores=("momentum",))
def sgd(z, *, lr: float, momentum: float, weight_decay: float):
    """Plain SGD on z (SGD†): no momentum, whatever train.momentum says."""
    return TorchOptimizer(z, lambda p: torch.optim.SGD(p, lr=lr, momentum=0.0, weight_decay=weight_decay))


@OPTIMIZERS.register("adam")
def adam(z, *, lr: float, momentum: float, weight_decay: float, beta2: float = 0.999, eps: float = 1e-8):
    """Adam on z (Adam†); train.momentum is β1."""
    return TorchOptimizer(z, lambda p: torch.optim.Adam(p, lr=lr, betas=(momentum, beta2), eps=eps,
                                                        weight_decay=weight_decay))


@OPTIMIZERS.register("rmsprop")
def rmsprop(z, *, lr: float, momentum: float, weight_decay: float, alpha: float = 0.99, eps: float = 1e-8):
    """RMSprop on z (RMSprop†); train.momentum is its momentum."""
    return TorchOptimizer(z, lambda p: torch.optim.RMSprop(p, lr=lr, momentum=momentum, alpha=alpha, eps=eps,
                                                           weight_decay=weight_decay))
