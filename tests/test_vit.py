"""The "vit" model: shapes, size, init, option errors, the attention and block math, names and gradients."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raysub.errors import ConfigError
from raysub.models import build_model
from raysub.models.vit import Attention


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape,patch,grid", [
    ((1, 28, 28), 7, 4),      # an explicit patch of 7: 4x4 patches
    ((1, 28, 28), 4, 7),      # 7x7 patches
    ((1, 28, 28), None, 4),   # default H // 4 = 7
    ((3, 32, 32), None, 4),   # default 8
    ((64,), None, 4),         # digits: read as (1, 8, 8), default patch 2
])
def test_shapes(shape, patch, grid):
    """Catches a wrong default patch or a wrong patch grid (pos_embed has 1 + grid² rows)."""
    model = build_model("vit", 10, shape, **({} if patch is None else {"patch": patch}))
    assert model.pos_embed.shape == (1, 1 + grid * grid, 64)
    assert model.cls_token.shape == (1, 1, 64)
    assert model(torch.randn(3, *shape)).shape == (3, 10)


def test_flat_input_is_the_image_read_row_major():
    """A (64,) digit is the (1, 8, 8) image row by row: same parameters give the same logits."""
    torch.manual_seed(0)
    flat = build_model("vit", 10, (64,), dim=8, depth=1, heads=2)
    torch.manual_seed(0)
    image = build_model("vit", 10, (1, 8, 8), dim=8, depth=1, heads=2)
    x = torch.randn(3, 64)
    torch.testing.assert_close(flat(x), image(x.reshape(3, 1, 8, 8)), rtol=0, atol=0)


@pytest.mark.parametrize("head_hidden", [0, 5])
def test_parameter_count(head_hidden):
    """(3, 8, 8) input, patch 4 (N = 4 patches of 3*4*4 = 48 values), dim 8, depth 2, heads 2, mlp_ratio 1.5
    (m = 12), 3 classes. Catches a missing bias, a missing LayerNorm, a wrong MLP width or a pos_embed without
    the class token's row."""
    dim, m, depth, classes = 8, 12, 2, 3
    patch_embed = 3 * 4 * 4 * dim + dim        # 392
    cls, pos = dim, (4 + 1) * dim              # 8, 40
    attn = 4 * (dim * dim + dim)               # 288
    mlp = dim * m + m + m * dim + dim          # 212
    norms = 2 * 2 * dim                        # 32
    block = attn + mlp + norms                 # 532
    final_norm = 2 * dim                       # 16
    head = dim * classes + classes if head_hidden == 0 else dim * 5 + 5 + 5 * classes + classes  # 27 or 63
    expected = patch_embed + cls + pos + depth * block + final_norm + head
    assert expected == (1547 if head_hidden == 0 else 1583)
    model = build_model("vit", classes, (3, 8, 8), patch=4, dim=dim, depth=depth, heads=2, mlp_ratio=1.5,
                        head_hidden=head_hidden)
    assert n_params(model) == expected


def test_default_parameter_count():
    """The count the module docstring quotes for (1, 28, 28), 10 classes and the defaults."""
    assert n_params(build_model("vit", 10, (1, 28, 28))) == 139_018


def test_deterministic_and_init():
    """Same seed, same parameters; another seed, others. Linear weights, cls and pos are N(0, 0.02) and biases 0
    (catches torch's default Linear init left in place: uniform ±1/8 has std 0.072 at fan-in 64)."""
    torch.manual_seed(3)
    a = build_model("vit", 10, (1, 28, 28), head_hidden=16).state_dict()
    torch.manual_seed(3)
    b = build_model("vit", 10, (1, 28, 28), head_hidden=16).state_dict()
    torch.manual_seed(4)
    c = build_model("vit", 10, (1, 28, 28), head_hidden=16).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a if k.endswith("weight") and "norm" not in k)
    linear_weights = torch.cat([a[k].flatten() for k in a if k.endswith("weight") and ("attn" in k or "mlp" in k
                                                                                        or "head" in k)])
    assert abs(linear_weights.std().item() - 0.02) < 0.001
    assert abs(torch.cat([a["cls_token"].flatten(), a["pos_embed"].flatten()]).std().item() - 0.02) < 0.003
    assert all(not a[k].any() for k in a if k.endswith("bias") and not k.startswith(("patch_embed", "blocks.0.norm")))
    assert all(torch.equal(a[k], torch.ones_like(a[k])) for k in a if "norm" in k and k.endswith("weight"))


@pytest.mark.parametrize("shape,options,match", [
    ((8, 8), {}, "model 'vit' needs image inputs"),
    ((63,), {}, "model 'vit' needs image inputs .* perfect square"),
    ((1, 2, 3, 4), {}, "model 'vit' needs image inputs"),
    ((1, 30, 30), {}, r"model 'vit': a 30x30 input has no default patch size .*model\.options\.patch"),
    ((1, 28, 28), {"patch": 5}, r"patch=5 does not divide the 28x28 input: set model\.options\.patch"),
    ((3, 32, 36), {}, r"patch=8 \(the default H // 4\) does not divide the 32x36 input.*one of \[1, 2, 4\]"),
    ((1, 28, 28), {"patch": 0}, r"model\.options\.patch"),
    ((1, 28, 28), {"dim": 10}, r"dim=10 is not divisible by heads=4"),
    ((1, 28, 28), {"depth": 0}, r"option depth=0: set model\.options\.depth"),
    ((1, 28, 28), {"dim": 0}, r"option dim=0: set model\.options\.dim"),
    ((1, 28, 28), {"heads": 0}, r"option heads=0: set model\.options\.heads"),
    ((1, 28, 28), {"mlp_ratio": 0.0}, r"option mlp_ratio=0.0: set model\.options\.mlp_ratio"),
    ((1, 28, 28), {"mlp_ratio": 0.001}, r"MLP width .* is 0; raise model\.options\.mlp_ratio"),
    ((1, 28, 28), {"head_hidden": -1}, r"option head_hidden=-1: set model\.options\.head_hidden"),
    ((1, 28, 28), {"heads": 2.0}, r"option heads=2.0: expected an integer"),  # the registry's type check
])
def test_config_errors(shape, options, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_model("vit", 10, shape, **options)
    assert "\n" not in str(e.value)


def test_attention_hand_case():
    """dim 4, 2 heads (width 2), identity projections, zero biases; tokens x0 = (1,1,0,0), x1 = (0,0,1,1).
    Head 0 sees (1,1), (0,0): token 0's scores (2, 0)/√2 give weights (σ, 1−σ), σ = e^√2/(e^√2+1), so its
    output is σ·(1,1); token 1's scores are (0, 0), output (½, ½). Head 1 is the mirror image. Catches a missing
    or wrong 1/sqrt(d_head) (that would give e²/(e²+1) or e^1/(e^1+1)) and a mixed-up head split."""
    attn = Attention(4, 2)
    with torch.no_grad():
        for lin in (attn.q, attn.k, attn.v, attn.out):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
    x = torch.tensor([[[1.0, 1, 0, 0], [0, 0, 1, 1]]])
    s = math.exp(math.sqrt(2)) / (math.exp(math.sqrt(2)) + 1)
    expected = torch.tensor([[[s, s, 0.5, 0.5], [0.5, 0.5, s, s]]])
    torch.testing.assert_close(attn(x), expected)


def reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Multi-head attention written out loop by loop from the Linear weights (Vaswani et al. eq. 1)."""
    b, t, d = x.shape
    h = attn.heads
    dh = d // h
    Q = x @ attn.q.weight.T + attn.q.bias
    K = x @ attn.k.weight.T + attn.k.bias
    V = x @ attn.v.weight.T + attn.v.bias
    concat = torch.zeros(b, t, d, dtype=x.dtype)
    for n in range(b):
        for head in range(h):
            cols = slice(head * dh, (head + 1) * dh)  # head `head` owns features head*dh .. (head+1)*dh-1
            for i in range(t):
                scores = torch.stack([(Q[n, i, cols] * K[n, j, cols]).sum() / math.sqrt(dh) for j in range(t)])
                w = torch.exp(scores - scores.max())
                w = w / w.sum()
                concat[n, i, cols] = sum(w[j] * V[n, j, cols] for j in range(t))
    return concat @ attn.out.weight.T + attn.out.bias


def test_attention_equals_reference():
    """Random (known, seeded) weights and biases, 3 tokens, 2 heads of width 3: catches q/k swapped (Q Kᵀ is
    not symmetric here), a wrong head split/merge (e.g. reshaping to (B, heads, T, d_head) directly), a missing
    scale, softmax over the wrong axis, or a dropped bias."""
    torch.manual_seed(0)
    attn = Attention(6, 2).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    torch.testing.assert_close(attn(x), reference_attention(attn, x))


def test_attention_calls_its_projections_as_modules():
    """q, k, v, out must run through their module call (forward hooks fire), so a low-rank replacement module
    with the same call signature takes effect; reading .weight directly would bypass it."""
    model = build_model("vit", 3, (1, 8, 8), dim=8, depth=2, heads=2)
    calls = []
    for i, block in enumerate(model.blocks):
        for name in ("q", "k", "v", "out"):
            getattr(block.attn, name).register_forward_hook(lambda *_, tag=(i, name): calls.append(tag))
    model(torch.randn(2, 1, 8, 8))
    assert sorted(calls) == sorted((i, n) for i in range(2) for n in ("q", "k", "v", "out"))
    # and a replacement takes effect: zeroing v's output (a new module) zeroes the attention branch
    before = model(torch.ones(1, 1, 8, 8))

    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    for block in model.blocks:
        block.attn.v = Zero()
    assert not torch.allclose(model(torch.ones(1, 1, 8, 8)), before)


def test_module_names():
    """The names a later U·V reparametrisation and a head-only trainable set rely on."""
    model = build_model("vit", 3, (1, 8, 8), dim=8, depth=2, heads=2, head_hidden=4)
    names = {n for n, _ in model.named_parameters()}
    for i in range(2):
        for lin in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc1", "mlp.fc2"):
            assert {f"blocks.{i}.{lin}.weight", f"blocks.{i}.{lin}.bias"} <= names
        assert isinstance(model.blocks[i].attn.q, nn.Linear) and model.blocks[i].attn.q.weight.shape == (8, 8)
        assert isinstance(model.blocks[i].mlp.act, nn.GELU)
        assert {f"blocks.{i}.norm1.weight", f"blocks.{i}.norm2.weight"} <= names
    assert {n for n in names if "head" in n} == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
    assert isinstance(model.head[1], nn.Tanh)
    assert {"cls_token", "pos_embed", "patch_embed.weight", "patch_embed.bias", "norm.weight"} <= names
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_zeroed_blocks_are_the_identity():
    """Pre-norm residual blocks with every Linear weight and bias zeroed add nothing, whatever norm1/norm2 do, so
    the logits are head(norm(cls + pos[0])) for any input. Catches post-norm (norm1/norm2, set to non-trivial
    affine maps here, would then act), a branch without its residual, or a head on a token other than the class
    token (or on the mean of the tokens)."""
    torch.manual_seed(0)
    model = build_model("vit", 5, (1, 8, 8), dim=8, depth=2, heads=2)
    with torch.no_grad():
        for block in model.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.attn.out, block.mlp.fc1, block.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
            for norm in (block.norm1, block.norm2):
                norm.weight.fill_(2.0)
                norm.bias.fill_(0.3)
        model.norm.weight.copy_(torch.rand(8) + 0.5)
        model.norm.bias.copy_(torch.randn(8))
        model.head.bias.copy_(torch.randn(5))
    y = (model.cls_token + model.pos_embed[:, 0]).reshape(8).detach()
    normed = (y - y.mean()) / torch.sqrt(y.var(unbiased=False) + 1e-5) * model.norm.weight + model.norm.bias
    expected = normed @ model.head.weight.T + model.head.bias
    out = model(torch.randn(3, 1, 8, 8))
    torch.testing.assert_close(out, expected.expand(3, 5).detach())


@pytest.mark.parametrize("head_hidden", [0, 6])
def test_gradients_reach_every_parameter(head_hidden):
    """A parameter left out of the graph (an unused pos_embed row, the class token, a norm) gets no gradient."""
    torch.manual_seed(0)
    model = build_model("vit", 4, (64,), dim=8, depth=2, heads=2, head_hidden=head_hidden)
    torch.nn.functional.cross_entropy(model(torch.randn(5, 64)), torch.tensor([0, 1, 2, 3, 0])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (model.pos_embed.grad[0].abs().sum(1) > 0).all()  # every position row, the class token's included


def test_functional_call_matches_forward():
    """functional_call with the module's own parameters reproduces model(x) exactly, and substituted parameters
    are the ones used (halving every parameter changes the logits)."""
    torch.manual_seed(0)
    model = build_model("vit", 4, (64,), dim=8, depth=2, heads=2, head_hidden=3)
    x = torch.randn(5, 64)
    params = dict(model.named_parameters())
    assert torch.equal(torch.func.functional_call(model, params, (x,)), model(x))
    halved = {k: v.detach() * 0.5 for k, v in params.items()}
    assert not torch.allclose(torch.func.functional_call(model, halved, (x,)), model(x))


def test_is_grads_batched_on_flat_theta():
    """raysub's class-gradient QN path (engine.task._class_sums_local): logits through functional_call on views
    of one flat θ, then ONE torch.autograd.grad(..., is_grads_batched=True) over C+1 cotangents must equal C+1
    separate vector-Jacobian products."""
    torch.manual_seed(0)
    model = build_model("vit", 3, (1, 8, 8), dim=8, depth=2, heads=2)
    named = list(model.named_parameters())
    theta = torch.cat([p.detach().flatten() for _, p in named]).requires_grad_()

    def logits_at(theta_N):
        params, offset = {}, 0
        for name, p in named:
            params[name] = theta_N[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
        return torch.func.functional_call(model, params, (x,))

    x = torch.randn(4, 1, 8, 8)
    logits = logits_at(theta)
    cot = torch.randn(4, 4, 3)
    (batched,) = torch.autograd.grad(logits, theta, cot, is_grads_batched=True)
    looped = torch.stack([torch.autograd.grad(logits_at(theta), theta, c)[0] for c in cot])
    torch.testing.assert_close(batched, looped)
    assert batched.abs().sum(1).gt(0).all()


# ---------------------------------------------------------------------------------------------------------
# the UV settings and train.init_from through the CLI: one line, exit 2, nothing written, before Ray starts

UV_CLI = ["model.name=vit", "train.projection=identity", "model.options={dim: 32, depth: 1, heads: 2}"]


@pytest.mark.parametrize("overrides, needle", [
    (["model.uv.rank=0"], "model.uv.rank=0: must be a positive integer"),
    (["model.uv.rank=-1"], "model.uv.rank=-1: must be a positive integer"),
    (["model.uv.rank=33"], "model.uv.rank=33 exceeds min(d1, d2)=32 of blocks.0.attn.q (32×32): choose 1..32"),
    (["model.uv.rank=4", "model.uv.targets=[query]"],
     "model.uv.targets: 'query' matches no module of model 'vit': its linear layers are named fc1, fc2, head, k, "
     "out, q, v"),
    (["model.uv.rank=4", "model.uv.trainable=[classifier]"], "model.uv.trainable: 'classifier' matches no parameter"),
    (["train.init_from=/nonexistent/base"], "train.init_from=/nonexistent/base does not exist"),
    (["train.init_from=LENET"], "is a 'lenet5' run, this run's model is 'vit': init_from needs a run of the same "
                                "architecture"),
    (["train.init_from=VIT8"], "is another vit (dim=8 there, 32 here)"),
])
def test_bad_uv_input_through_the_cli(tmp_path, capsys, overrides, needle):
    from raysub.cli import main
    from raysub.storage import RunDir

    for name, model in (("LENET", {"name": "lenet5", "options": {}}),
                        ("VIT8", {"name": "vit", "options": {"dim": 8, "depth": 1, "heads": 2}})):
        base = RunDir(str(tmp_path / name))
        base.makedirs()
        sha = base.write_torch("model.pt", {})
        base.write_json("manifest.json", {"shards": {"model.pt": sha}, "config": {"model": model}})
        overrides = [o.replace(name, base.uri) for o in overrides]
    run_dir = tmp_path / "run"
    rc = main(["train", "quickstart", *UV_CLI, *overrides, f"run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("raysub: error:"), err
    assert needle in err, err
    assert not run_dir.exists()


def test_pbfgs_on_every_uv_parameter_is_refused_before_it_allocates(tmp_path, capsys):
    """P-BFGS keeps a d×d matrix: on the identity projection of a UV model (d = tens of thousands) it would allocate
    gigabytes; it is refused in one line naming d, the memory and the fix."""
    from raysub.cli import main

    run_dir = tmp_path / "run"
    rc = main(["train", "quickstart", *UV_CLI, "model.options={dim: 128, depth: 1, heads: 2}", "model.uv.rank=32",
               "train.optimizer=pbfgs", f"run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "train.optimizer=pbfgs keeps d×d matrices: d=34,058 needs 4.3 GiB for each (its limit is d ≤ 8,192)" in err  # 4·(128+128)·32 + 1,290
    assert not run_dir.exists()
