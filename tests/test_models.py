"""Every registered model builds, runs forward/backward (also through functional_call), and is seeded."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from raysub.errors import ConfigError
from raysub.models import MODELS, build_model

# The input each model is meant for; a newly registered model must add its own here.
NATURAL_INPUT = {
    "mlp": (64,),
    "lenet5": (1, 28, 28),
    "resnet8": (3, 32, 32),
    "resnet20": (3, 32, 32),
    "resnet32": (3, 32, 32),
    "resnet18": (3, 224, 224),
    "vit": (1, 28, 28),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS.names())
def test_forward_backward(name):
    assert name in NATURAL_INPUT, f"add a natural input shape for model {name!r} to NATURAL_INPUT"
    shape = NATURAL_INPUT[name]
    torch.manual_seed(0)
    model = build_model(name, 7, shape)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and out.dtype == torch.float32
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS.names())
def test_functional_call(name):
    """Parameters substituted via torch.func.functional_call are used, differentiably, and left untouched."""
    shape = NATURAL_INPUT[name][:1] + tuple(min(d, 32) for d in NATURAL_INPUT[name][1:])
    torch.manual_seed(1)
    model = build_model(name, 5, shape).eval()  # eval: BN uses running stats, so outputs compare exactly
    x = torch.randn(2, *shape)
    params = {k: (v.detach() * 0.5).requires_grad_() for k, v in model.named_parameters()}
    frozen = {k: v.detach().clone() for k, v in params.items()}
    out = torch.func.functional_call(model, params, (x,))
    out.square().sum().backward()
    assert all(params[k].grad is not None for k in params)
    assert all(torch.equal(params[k].detach(), frozen[k]) for k in params)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(frozen[k])
    torch.testing.assert_close(model(x), out.detach())


@pytest.mark.parametrize(
    "name,shape,classes,count",
    [
        ("lenet5", (3, 32, 32), 10, 62_006),
        ("lenet5", (1, 28, 28), 10, 61_706),
        ("resnet20", (3, 32, 32), 10, 269_722),
        ("resnet32", (3, 32, 32), 10, 464_154),
        # option-A shortcuts; 78,042 / 78,330 are the option-B / option-C variants (see raysub/models.py)
        ("resnet8", (3, 32, 32), 10, 75_290),
        ("resnet18", (3, 224, 224), 1000, 11_689_512),
        ("mlp", (64,), 10, 64 * 64 + 64 + 64 * 10 + 10),
    ],
)
def test_parameter_counts(name, shape, classes, count):
    assert n_params(build_model(name, classes, shape)) == count


def test_lenet5_fc1_gets_400_features():
    for shape in ((1, 28, 28), (3, 32, 32)):
        assert build_model("lenet5", 10, shape)[7].in_features == 400


@pytest.mark.parametrize("name", MODELS.names())
def test_deterministic_construction(name):
    shape = NATURAL_INPUT[name]
    torch.manual_seed(42)
    a = build_model(name, 10, shape).state_dict()
    torch.manual_seed(42)
    b = build_model(name, 10, shape).state_dict()
    torch.manual_seed(43)
    c = build_model(name, 10, shape).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_mlp_hidden_option():
    model = build_model("mlp", 3, (1, 4, 4), hidden=[8, 5])
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [8, 5, 3]
    assert build_model("mlp", 3, (64,), hidden=[])(torch.randn(2, 64)).shape == (2, 3)
    with pytest.raises(ConfigError, match="hidden"):
        build_model("mlp", 3, (64,), hidden=[0])


def test_resnet18_other_channels():
    assert build_model("resnet18", 4, (1, 64, 64))(torch.randn(2, 1, 64, 64)).shape == (2, 4)


def test_config_errors():
    with pytest.raises(ConfigError) as e:
        build_model("vgg", 10, (3, 32, 32))
    assert all(name in str(e.value) for name in MODELS.names())
    with pytest.raises(ConfigError, match="model 'mlp' got unexpected option\\(s\\) 'foo': its options are hidden"):
        build_model("mlp", 10, (64,), foo=1)
    with pytest.raises(ConfigError, match="model 'lenet5' got unexpected option\\(s\\) 'depth': it takes no"):
        build_model("lenet5", 10, (1, 28, 28), depth=3)
    with pytest.raises(ConfigError, match="needs image inputs"):
        build_model("resnet20", 10, (64,))
    with pytest.raises(ConfigError, match="too small"):
        build_model("lenet5", 10, (1, 8, 8))
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("mlp", 0, (64,))
