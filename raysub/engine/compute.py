"""How forward passes run on the worker's device: bfloat16 autocast and channels_last (config section ``compute``).

One `Compute` per loop, built from the config and the worker's device, wraps every forward pass of the sampling
SGD, of subspace training (`raysub.engine.task.SubspaceModel`, its closures and the functional path) and of
evaluation, so the three run alike:

- ``compute.bf16``: the forward runs under ``torch.autocast(device_type, dtype=torch.bfloat16)`` — CUDA on a GPU
  worker, CPU autocast on a CPU worker (allowed: the same code path runs and is tested without a GPU; it is fast
  only on CPUs with AMX/AVX-512 BF16). Parameters, gradients, optimizer state, the projection and all-reduces stay
  float32; the logits are cast back to float32 before the loss, so the loss and accuracy are computed in float32.
- ``compute.channels_last``: 4-D inputs go NHWC. The sampled model's parameters are converted too
  (`prepare_model`: conv kernels NHWC; snapshots are taken in the logical order, so the trajectory is the same
  vector either way). Subspace training keeps its parameters as views of the flat θ buffer in the trajectory's
  order — the convolutions see a channels_last input and choose the NHWC kernels themselves (cuDNN and oneDNN
  convert the small weights per call), so activations, the bulk of the memory traffic, are NHWC in both stages.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Compute:
    """The forward-pass settings of one loop.

    Args:
        device_type: ``"cuda"`` or ``"cpu"`` (autocast's device type).
        bf16: bfloat16 autocast.
        channels_last: NHWC inputs (and `prepare_model` converts 4-D parameters).
    """

    device_type: str = "cpu"
    bf16: bool = False
    channels_last: bool = False

    @classmethod
    def of(cls, cfg: Any, device) -> "Compute":
        """The ``compute`` section of ``cfg`` (a `raysub.config.Config`) on ``device``."""
        return cls(torch.device(device).type, cfg.compute.bf16, cfg.compute.channels_last)

    def autocast(self):
        """``torch.autocast`` to bfloat16 on this device when ``bf16``, else a no-op context."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory format the forward wants (NHWC for a 4-D batch when ``channels_last``)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with its 4-D parameters and buffers NHWC when ``channels_last`` (in place; returned)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def forward(self, module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` under these settings; bfloat16/float16 logits come back as float32, any other dtype (a
        float64 model, as the exactness tests use) as it is."""
        with self.autocast():
            out = module(self.input(x))
        return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out

    def forward_fn(self, module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> self.forward(module, x)``, for `raysub.engine.loop.evaluate`."""
        return lambda x: self.forward(module, x)
