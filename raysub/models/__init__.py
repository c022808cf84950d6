"""Models: one registry of factories ``factory(num_classes, input_shape, **options) -> nn.Module``.

All models are plain modules with no dropout and no in-place ops on parameters, so they can be evaluated
with ``torch.func.functional_call`` on parameters that live in a subspace. Construction only draws from
torch's global RNG, so ``torch.manual_seed(s)`` before building gives bit-identical parameters.

- `convnets`: mlp, lenet5, the CIFAR ResNets, ResNet-18; `vit`: a small Vision Transformer;
- `lowrank`: the UV reparametrisation of chosen linear layers (SL2O §3.2), a model transformation;
- `model_for(cfg, data)`: the model a config trains — the registered architecture, its θ0 from
  ``train.init_from`` when set, then the UV transformation when ``model.uv.rank`` > 0.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import nn

from raysub.errors import ConfigError
from raysub.models import convnets, vit  # noqa: F401  (register their models)
from raysub.models.registry import MODELS
from raysub.models.lowrank import apply_uv




def build_model(name: str, num_classes: int, input_shape: Tuple[int, ...], **kwargs) -> nn.Module:
    """Build a registered model with freshly initialized parameters (from torch's global RNG).

    Args:
        name: Registry name (`MODELS.names()`: "mlp", "lenet5", "resnet8", "resnet20", "resnet32", "resnet18", "vit").
        num_classes: Output logits.
        input_shape: Per-example input shape, e.g. ``Dataset.input_shape``.
        **kwargs: Model options (e.g. hidden for mlp).

    Returns:
        The model, in training mode.

    Raises:
        ConfigError: unknown name or option, or an input shape the model cannot take.
    """
    factory = MODELS.get(name)
    MODELS.check_options(name, kwargs, skip=2)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"model {name!r}: num_classes={num_classes!r} must be a positive integer")
    input_shape = tuple(input_shape)
    if not input_shape or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ConfigError(f"model {name!r}: input_shape={input_shape} must be positive integers")
    return factory(num_classes, input_shape, **kwargs)


def model_for(cfg, data, *, init: bool = True, report: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The model ``cfg`` trains: the registered architecture built from torch's global RNG (seed it first, as every
    caller does with ``cfg.seed``), ``train.init_from``'s trained weights when ``init`` (callers that load the run's
    own ``theta0.pt`` next pass False: it holds them already), then the UV reparametrisation of ``model.uv``
    (U drawn from ``cfg.seed``, independently of the global RNG). ``report``, when given, receives
    ``init_from`` (`load_init_from`'s record) and ``uv`` (`apply_uv`'s).

    Raises:
        ConfigError: a bad model option, a bad UV setting, an ``init_from`` that is missing or another
            architecture (one line each).
    """
    model = build_model(cfg.model.name, data.num_classes, data.input_shape, **cfg.model.options)
    if init and cfg.train.init_from:
        # heavy: pyarrow loads here, not when this module is imported
        from raysub.models.init import load_init_from

        info = load_init_from(model, cfg)
        if report is not None:
            report["init_from"] = info
    uv = cfg.model.uv
    if uv.rank is not None:

        info = apply_uv(model, uv.rank, uv.targets, uv.trainable, uv.init_std, cfg.seed, cfg.model.name)
        if report is not None:
            report["uv"] = info
    return model
