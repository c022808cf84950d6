"""A small Vision Transformer (Dosovitskiy et al. 2021): patch embedding, a class token, learned position
embeddings, pre-norm encoder blocks, and a head on the final class token. No dropout, no in-place ops on
parameters, so the model can be evaluated with ``torch.func.functional_call`` on parameters held elsewhere.

Registered as "vit": ``vit(num_classes, input_shape, patch=None, dim=64, depth=4, heads=4, mlp_ratio=2.0,
head_hidden=0)``.

Inputs are (C, H, W) images, or a flat (n,) vector with n a perfect square s² (scikit-learn digits is (64,)),
read as a (1, s, s) image. Options:

- ``patch``: side of the square patches; None takes H // 4 when H and W are both divisible by 4 (a 4×4 grid
  of 16 patches on square images: 28 → 7, 32 → 8, digits' 8 → 2), otherwise it must be given. H and W must
  be divisible by it.
- ``dim``: token width; ``heads`` attention heads (dim % heads == 0, head width dim / heads);
  ``depth`` encoder blocks; ``mlp_ratio``: the MLP's hidden width is ``round(mlp_ratio * dim)``.
- ``head_hidden``: 0 gives a linear head; > 0 gives ViT's pre-training head Linear → Tanh → Linear.

Module names are part of the interface (a later low-rank U·V reparametrisation of the attention projections,
SL2O §3.2, finds them by name and keeps only ``head.*`` trainable besides U, V):
``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks.{i}.norm1``, ``blocks.{i}.attn.{q,k,v,out}``
(each an ``nn.Linear(dim, dim)`` called as a module, so it can be swapped for any module with the same call
signature), ``blocks.{i}.norm2``, ``blocks.{i}.mlp.{fc1,act,fc2}``, ``norm``, ``head`` (or ``head.{0,1,2}``).

Parameter count, with N = (H/p)(W/p) patches, m = round(mlp_ratio·dim) and K classes:

    C·p²·dim + dim                                patch_embed (a Conv2d with bias)
  + dim + (N + 1)·dim                              cls_token, pos_embed
  + depth · (4·dim² + 4·dim                        attn q, k, v, out
             + dim·m + m + m·dim + dim             mlp fc1, fc2
             + 4·dim)                              norm1, norm2
  + 2·dim                                          final norm
  + dim·K + K                                      head (head_hidden = 0), or
    dim·h + h + h·K + K                            head (head_hidden = h > 0)

e.g. 139,018 for (1, 28, 28), 10 classes and the defaults (p = 7, N = 16, m = 128).

Initialisation (timm's default ViT init): every nn.Linear weight, ``cls_token`` and ``pos_embed`` are drawn
by ``nn.init.trunc_normal_(std=0.02)`` — torch's (and timm's) default bounds ±2 are absolute, 100 std, so this
is in effect a normal(0, 0.02), as in timm — and Linear biases are zero; LayerNorms keep weight 1, bias 0.
``patch_embed`` keeps torch's default Conv2d init (uniform ±1/sqrt(C·p²) for weight and bias), as timm's
default does: its scale follows the fan-in C·p², so the patch signal keeps the same size next to the 0.02
position embeddings whether a patch is 2×2 (digits) or 8×8 (CIFAR), where a fixed std 0.02 would make a 2×2
patch's embedding ~7x smaller than a 7×7 one's. All draws come from torch's global RNG, in construction order.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
from torch import nn

from raysub.errors import ConfigError
from raysub.models.registry import MODELS

# Attention kernel: a plain softmax(Q Kᵀ · scale) V, not F.scaled_dot_product_attention. Measured on this
# project's CPU machine (torch 2.14.1, 1 thread, batch 128, 17 tokens, dim 64, 4 heads; 20 warm-up calls, then
# 5 alternating repeats of 100 calls each, two runs): forward + backward plain 3.28 / 3.24 ms, SDPA 5.71 / 5.39 ms
# (median per call); forward only plain 1.18 / 1.25 ms, SDPA 1.41 / 1.53 ms. Both work under
# torch.autograd.grad(..., is_grads_batched=True) (raysub's class-gradient QN) and torch.func.functional_call,
# and agree to 1e-6, so the faster plain form is used.


class Attention(nn.Module):
    """Multi-head self-attention with four separate projections ``q``, ``k``, ``v``, ``out`` (each
    ``nn.Linear(dim, dim)``), always called as modules so that a reparametrised replacement is picked up.

    Args:
        dim: Token width.
        heads: Number of heads; ``dim`` must be divisible by it.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, heads, T, dim/heads)
            return y.reshape(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # (B, heads, T, T)
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm encoder block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT on (C, H, W) images, or on flat vectors of length side² read as (1, side, side); see the module
    docstring for the architecture, names and init. Use the registered factory ``vit``, which checks options.

    Args:
        num_classes: Output logits.
        image: (channels, height, width) of the image the model sees.
        patch: Patch side; must divide height and width.
        dim, depth, heads, mlp_hidden: Token width, blocks, heads, MLP hidden width.
        head_hidden: 0 for a linear head, else the hidden width of a Linear → Tanh → Linear head.
        flat_side: When set, inputs are (B, flat_side²) vectors reshaped to (B, 1, flat_side, flat_side).
    """

    def __init__(self, num_classes: int, image: Tuple[int, int, int], patch: int, dim: int, depth: int, heads: int,
                 mlp_hidden: int, head_hidden: int = 0, flat_side: Optional[int] = None):
        super().__init__()
        channels, height, width = image
        self.flat_side = flat_side
        self.num_patches = (height // patch) * (width // patch)
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        if head_hidden:
            self.head = nn.Sequential(nn.Linear(dim, head_hidden), nn.Tanh(), nn.Linear(head_hidden, num_classes))
        else:
            self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flat_side is not None:
            x = x.reshape(x.shape[0], 1, self.flat_side, self.flat_side)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim), patches in row-major order
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))  # LayerNorm is per token, so norming the class token alone is exact


def _vit_image(input_shape: Tuple[int, ...]) -> Tuple[Tuple[int, int, int], Optional[int]]:
    """((C, H, W), flat side or None) for the inputs vit takes, or a one-line ConfigError."""
    if len(input_shape) == 3:
        return tuple(input_shape), None
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side == input_shape[0]:
            return (1, side, side), side
    raise ConfigError(
        f"model 'vit' needs image inputs (channels, height, width) or a flat vector whose length is a perfect "
        f"square, got input_shape {tuple(input_shape)}: pick an image dataset or the mlp model"
    )


@MODELS.register("vit")
def vit(num_classes: int, input_shape: Tuple[int, ...], patch: Optional[int] = None, dim: int = 64, depth: int = 4,
        heads: int = 4, mlp_ratio: float = 2.0, head_hidden: int = 0) -> nn.Module:
    """A small Vision Transformer; see the module docstring for the architecture, names, init and size.

    Args:
        num_classes: Output logits.
        input_shape: (C, H, W), or (s²,) read as (1, s, s).
        patch: Patch side; None takes H // 4 when H and W are both divisible by 4.
        dim: Token width. depth: Encoder blocks. heads: Attention heads (must divide dim).
        mlp_ratio: MLP hidden width over dim (rounded). head_hidden: 0 for a linear head, else the hidden width
            of a Linear → Tanh → Linear head.

    Returns:
        The VisionTransformer, in training mode.

    Raises:
        ConfigError: an input shape it cannot take, or option values out of range (all problems in one line).
    """
    (channels, height, width), flat_side = _vit_image(input_shape)
    problems: List[str] = []
    for name, value in (("dim", dim), ("depth", depth), ("heads", heads)):
        if value < 1:
            problems.append(f"model 'vit' option {name}={value}: set model.options.{name} to a positive integer")
    if dim >= 1 and heads >= 1 and dim % heads:
        problems.append(f"model 'vit': dim={dim} is not divisible by heads={heads}: "
                        "set model.options.dim to a multiple of model.options.heads")
    mlp_hidden = round(mlp_ratio * dim)
    if mlp_ratio <= 0:
        problems.append(f"model 'vit' option mlp_ratio={mlp_ratio}: set model.options.mlp_ratio to a positive number")
    elif dim >= 1 and mlp_hidden < 1:
        problems.append(f"model 'vit' option mlp_ratio={mlp_ratio}: the MLP width round({mlp_ratio} * {dim}) is 0; "
                        "raise model.options.mlp_ratio")
    if head_hidden < 0:
        problems.append(f"model 'vit' option head_hidden={head_hidden}: set model.options.head_hidden to 0 "
                        "(a linear head) or a positive width")
    divisors = [p for p in range(1, math.gcd(height, width) + 1) if height % p == 0 and width % p == 0]
    given = patch is not None
    if patch is None:
        if height % 4 or width % 4:
            problems.append(f"model 'vit': a {height}x{width} input has no default patch size (H and W are not both "
                            f"divisible by 4): set model.options.patch to one of {divisors}")
        else:
            patch = height // 4
    if patch is not None and (patch < 1 or height % patch or width % patch):
        default = "" if given else " (the default H // 4)"
        problems.append(f"model 'vit' option patch={patch}{default} does not divide the {height}x{width} input: "
                        f"set model.options.patch to one of {divisors}")
    if problems:
        raise ConfigError(problems)
    return VisionTransformer(num_classes, (channels, height, width), patch, dim, depth, heads, mlp_hidden,
                             head_hidden, flat_side)
