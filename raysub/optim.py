"""Optimizers over the subspace coefficients z (D floats), with a registry.

Each entry is a factory ``(params, cfg: TrainConfig) -> torch.optim.Optimizer`` over ``[z]``. Momentum and
adaptive statistics therefore live in D dimensions. The daggered names of the SL2O tables (SGD†, Momentum†,
Adam†, RMSprop†) are these optimizers applied to z.
"""
from __future__ import annotations

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
