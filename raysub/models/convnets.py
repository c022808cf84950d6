"""The convolutional and fully connected models: mlp, lenet5, the CIFAR ResNets (option A), ResNet-18."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from raysub.errors import ConfigError
from raysub.models.registry import MODELS, image_shape as _image_shape


# ---------------------------------------------------------------------------------------------------- MLP


@MODELS.register("mlp")
def mlp(num_classes: int, input_shape: Tuple[int, ...], hidden: Sequence[int] = (64,)) -> nn.Module:
    """Fully connected net: flatten, then Linear+ReLU per hidden width, then a linear head.

    Args:
        num_classes: Output logits.
        input_shape: Per-example input shape (flattened).
        hidden: Hidden layer widths; empty gives logistic regression.
    """
    hidden = list(hidden)
    if not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ConfigError(f"model 'mlp': hidden={hidden} must be a list of positive integers")
    width = 1
    for d in input_shape:
        width *= d
    layers: list = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------- LeNet-5


@MODELS.register("lenet5")
def lenet5(num_classes: int, input_shape: Tuple[int, ...]) -> nn.Module:
    """LeNet-5 with ReLU and max-pooling: conv 6@5x5, pool, conv 16@5x5, pool, fc 120, fc 84, fc out.

    Inputs smaller than 32x32 get padding 2 in the first conv, as LeCun et al. padded MNIST's 28x28 digits
    to 32x32, so both MNIST and CIFAR feed 16x5x5 = 400 features to fc1. For (3, 32, 32) and 10 classes
    this is the 62,006-parameter CIFAR LeNet of the literature.
    """
    channels, height, width = _image_shape("lenet5", input_shape)
    pad = 2 if min(height, width) < 32 else 0
    h, w = (height + 2 * pad - 4) // 2, (width + 2 * pad - 4) // 2
    h, w = (h - 4) // 2, (w - 4) // 2
    if h < 1 or w < 1:
        raise ConfigError(f"model 'lenet5': input_shape {tuple(input_shape)} is too small")
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * h * w, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


# ------------------------------------------------------------------------------------------ CIFAR ResNets


class _BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an option-A shortcut (He et al. 2016, sec. 4.2).

    Option A has no parameters: when the shape changes, the identity is subsampled with stride 2 and the
    new channels are zero-padded, so the CIFAR ResNets keep the paper's parameter counts.
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra = stride, planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: a 3x3 conv to 16 channels, three stages of n basic blocks with 16/32/64
    channels (stride 2 between stages), global average pooling and a linear head.

    Args:
        depth: 6n + 2 (8, 20, 32, 44, 56, 110, ...).
        num_classes: Output logits.
        in_channels: Input channels.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        assert (depth - 2) % 6 == 0, f"CIFAR ResNet depth must be 6n+2, got {depth}"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# Trainable parameter counts for 10 classes: resnet20 269,722 and resnet32 464,154 (the paper's 0.27M and
# 0.46M). resnet8 (n=1, not in the paper, whose table starts at depth 20) is 75,290 with these option-A
# shortcuts. The other figures quoted for resnet8 are other shortcut variants, not this model:
#   78,042 = 75,290 + 2,752: option B, a 1x1 conv + BN projection on the two downsampling blocks
#            (16*32 + 2*32 + 32*64 + 2*64 = 2,752);
#   78,330 = 78,042 + 288: option C, a projection on every block, including stage 1's (16*16 + 2*16 = 288).
# The same +2,752 would apply to resnet20/32 under option B, so option A is the one consistent with them.
def _cifar_resnet(depth: int):
    def factory(num_classes: int, input_shape: Tuple[int, ...]) -> nn.Module:
        channels, _, _ = _image_shape(f"resnet{depth}", input_shape)
        return CifarResNet(depth, num_classes, channels)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts); see CifarResNet."
    return factory


for _depth in (8, 20, 32):
    MODELS.register(f"resnet{_depth}")(_cifar_resnet(_depth))


# --------------------------------------------------------------------------------------- ImageNet ResNet


@MODELS.register("resnet18")
def resnet18(num_classes: int, input_shape: Tuple[int, ...]) -> nn.Module:
    """torchvision's ResNet-18 (random init, never pretrained weights).

    A non-RGB input gets a first conv with that many channels (same shape and init as torchvision's).
    """
    # heavy: torchvision loads here, not when this module is imported
    from torchvision.models import resnet18 as tv_resnet18

    channels, _, _ = _image_shape("resnet18", input_shape)
    model = tv_resnet18(weights=None, num_classes=num_classes)
    if channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
