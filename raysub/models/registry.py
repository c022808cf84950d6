"""The model registry: factories ``factory(num_classes, input_shape, **options) -> nn.Module``."""
from __future__ import annotations

from typing import Tuple

from raysub.errors import ConfigError
from raysub.registry import Registry

MODELS: Registry = Registry("model")


def image_shape(name: str, input_shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    """(channels, height, width) of an image model's input, or a one-line ConfigError naming the model."""
    if len(input_shape) != 3:
        raise ConfigError(
            f"model {name!r} needs image inputs (channels, height, width), got input_shape {tuple(input_shape)}: "
            "pick an image dataset or the mlp model"
        )
    return tuple(input_shape)
