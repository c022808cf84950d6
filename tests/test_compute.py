"""The ``compute`` section (raysub/engine/compute.py): bfloat16 autocast and channels_last in the forward passes of
sampling and subspace training. CPU checks run by default (bf16 is CPU autocast there); the CUDA ones are marked
``gpu``."""
from __future__ import annotations

import pytest
import torch

from raysub.config import load_config
from raysub.engine.compute import Compute
from raysub.engine.flat import flatten_params
from raysub.engine.task import build_task, loss_and_projected_grad, train_step
from raysub.models import build_model
from raysub.optim import build_optimizer


class Images:
    """A dataset stand-in: build_task only reads its name, class count and input shape."""

    name, num_classes, input_shape = "images", 3, (3, 16, 16)


def batch(seed=0, n=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def task_of(tmp_path, *overrides, device="cpu"):
    cfg = load_config(None, ["model.name=resnet8", "train.projection=dense", "train.dim=6", "train.lr=0.5",
                             f"run_dir={tmp_path}/run", *overrides])
    return build_task(cfg, device=device, data=Images()), cfg


def one_step(task, cfg, x, y):
    z = task.new_z()
    opt = build_optimizer(cfg.train.optimizer, z, cfg.train)
    loss, _ = train_step(task, z, opt, x.to(task.device), y.to(task.device))
    return float(loss), z


def fc_output_dtypes(model):
    """The dtype of every output of the model's last Linear, recorded by a forward hook."""
    seen = []
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    last.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_default_compute_leaves_the_forward_bit_identical(tmp_path):
    """compute off (the default): the subspace forward is exactly model(x) — no cast, no copy into another format.
    Catches a default path that changes the math (a loss that is no longer bit-identical under a fixed seed)."""
    task, _ = task_of(tmp_path)
    x, _ = batch()
    assert task.sub.compute == Compute("cpu", False, False)
    assert torch.equal(task.sub.forward(x), task.model(x))


def test_channels_last_sampled_model(tmp_path):
    """prepare_model makes every conv kernel NHWC, yet the flat vector (the snapshots) is the same as the
    contiguous model's, element for element, and outputs and gradients agree to float32 rounding. Catches
    snapshots taken in memory order (NHWC) instead of the parameters' logical order."""
    torch.manual_seed(0)
    plain = build_model("resnet8", 3, (3, 16, 16))
    nhwc = build_model("resnet8", 3, (3, 16, 16))
    nhwc.load_state_dict(plain.state_dict())
    compute = Compute("cpu", channels_last=True)
    compute.prepare_model(nhwc)
    convs = [p for p in nhwc.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    assert torch.equal(flatten_params(nhwc), flatten_params(plain))
    x, y = batch()
    assert compute.input(x).is_contiguous(memory_format=torch.channels_last)
    out_plain, out_nhwc = plain(x), compute.forward(nhwc, x)
    torch.testing.assert_close(out_nhwc, out_plain, rtol=1e-4, atol=1e-5)
    torch.nn.functional.cross_entropy(out_plain, y).backward()
    torch.nn.functional.cross_entropy(out_nhwc, y).backward()
    grads = {name: torch.cat([p.grad.reshape(-1) for p in m.parameters()]) for name, m in
             (("plain", plain), ("nhwc", nhwc))}
    torch.testing.assert_close(grads["nhwc"], grads["plain"], rtol=1e-3, atol=1e-5)


def test_channels_last_subspace_step_matches(tmp_path):
    """Subspace training with channels_last (NHWC input, flat θ buffer kept in the trajectory's order): one P-SGD
    step and the functional path agree with the default to float32 rounding, and the gradients still land in the
    flat buffer. Catches the in-place gradient views lost when the kernels' gradients come back NHWC."""
    x, y = batch()
    plain, cfg = task_of(tmp_path)
    nhwc, _ = task_of(tmp_path, "compute.channels_last=true")
    assert nhwc.sub.compute.channels_last
    loss_p, z_p = one_step(plain, cfg, x, y)
    loss_n, z_n = one_step(nhwc, cfg, x, y)
    assert abs(loss_n - loss_p) < 1e-5 and float(z_p.norm()) > 0
    torch.testing.assert_close(z_n, z_p, rtol=1e-4, atol=1e-6)
    assert float(nhwc.sub.flat.grad_N.abs().sum()) > 0
    lp, gp = loss_and_projected_grad(plain, z_p, (x, y))
    ln, gn = loss_and_projected_grad(nhwc, z_p, (x, y))
    torch.testing.assert_close(ln, lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gn, gp, rtol=1e-4, atol=1e-6)


def test_bf16_on_cpu_runs_under_cpu_autocast(tmp_path):
    """compute.bf16 on a CPU worker is allowed and means CPU autocast: the head computes in bfloat16, the logits
    come back float32, the loss is within bf16 rounding of float32's, and θ, the gradient buffer and z stay
    float32. Catches bf16 silently ignored on CPU (logits bit-identical to float32) and bf16 leaking into the
    optimizer state."""
    x, y = batch()
    plain, cfg = task_of(tmp_path)
    bf16, _ = task_of(tmp_path, "compute.bf16=true")
    dtypes = fc_output_dtypes(bf16.model)
    logits_p, logits_b = plain.sub.forward(x), bf16.sub.forward(x)
    assert dtypes == [torch.bfloat16] and logits_b.dtype == torch.float32
    assert not torch.equal(logits_b, logits_p)
    torch.testing.assert_close(logits_b, logits_p, rtol=0.05, atol=0.05)
    loss_p, z_p = one_step(plain, cfg, x, y)
    loss_b, z_b = one_step(bf16, cfg, x, y)
    assert abs(loss_b - loss_p) < 0.02
    assert bf16.sub.flat.theta_N.dtype == bf16.sub.flat.grad_N.dtype == z_b.dtype == torch.float32
    assert torch.isfinite(z_b).all() and torch.nn.functional.cosine_similarity(z_b, z_p, dim=0) > 0.98


def test_compute_config_is_typed_and_documented():
    """compute.* are booleans with help text; a string is refused before anything starts."""
    import dataclasses

    from raysub.config import ComputeConfig
    from raysub.errors import ConfigError

    assert all(f.metadata.get("help") for f in dataclasses.fields(ComputeConfig))
    cfg = load_config(None, ["compute.bf16=true", "compute.channels_last=true"])
    assert Compute.of(cfg, "cpu") == Compute("cpu", True, True)
    with pytest.raises(ConfigError, match="compute.bf16: expected true or false"):
        load_config(None, ["compute.bf16=yes please"])


# ----------------------------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
def test_bf16_and_channels_last_on_cuda(tmp_path):
    """On a GPU: CUDA autocast computes the head in bfloat16, convolutions run NHWC, logits come back float32, and
    a P-SGD step stays within bf16 rounding of the float32 step on the same GPU."""
    x, y = batch(n=16)
    plain, cfg = task_of(tmp_path, device="cuda")
    fast, _ = task_of(tmp_path, "compute.bf16=true", "compute.channels_last=true", device="cuda")
    assert fast.sub.compute == Compute("cuda", True, True)
    dtypes = fc_output_dtypes(fast.model)
    conv_formats = []
    first_conv = [m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d)][0]
    first_conv.register_forward_hook(
        lambda _m, _i, out: conv_formats.append(out.is_contiguous(memory_format=torch.channels_last)))
    logits = fast.sub.forward(x.cuda())
    assert dtypes == [torch.bfloat16] and logits.dtype == torch.float32 and conv_formats == [True]
    loss_p, z_p = one_step(plain, cfg, x, y)
    loss_f, z_f = one_step(fast, cfg, x, y)
    assert abs(loss_f - loss_p) < 0.02 and torch.isfinite(z_f).all()
    assert torch.nn.functional.cosine_similarity(z_f, z_p, dim=0) > 0.98


@pytest.mark.gpu
def test_sampled_model_channels_last_on_cuda():
    """The sampled model on a GPU: NHWC kernels and activations, same flat vector, outputs within bf16 rounding."""
    torch.manual_seed(0)
    plain = build_model("resnet8", 3, (3, 16, 16)).cuda()
    fast = build_model("resnet8", 3, (3, 16, 16)).cuda()
    fast.load_state_dict(plain.state_dict())
    compute = Compute("cuda", bf16=True, channels_last=True)
    compute.prepare_model(fast)
    assert torch.equal(flatten_params(fast), flatten_params(plain))
    x, _ = batch(n=16)
    torch.testing.assert_close(compute.forward(fast, x.cuda()), plain(x.cuda()), rtol=0.05, atol=0.05)


def test_a_float64_model_keeps_float64_logits():
    """Compute's forward casts bf16/fp16 logits to float32 and nothing else: a blanket .float() rounded the float64
    models of the exactness tests (class-gradient QN, the meta-gradient) to float32 — 1e-8 errors against 1e-12."""
    from raysub.engine.compute import Compute

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    out = Compute().forward(model, x)
    assert out.dtype == torch.float64
    assert torch.equal(out, model(x))
