"""The UV reparametrisation (raysub.models.lowrank) and train.init_from (raysub.models.init), no Ray."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raysub.config import load_config
from raysub.engine.flat import param_layout
from raysub.errors import ConfigError, StorageError
from raysub.models.lowrank import LowRankLinear, apply_uv, fold_uv, uv_problems


class Attn(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(x.shape[-1]), -1)
        return x + self.out(a @ self.v(x))


class Tiny(nn.Module):
    """Two attention layers, a 4→... input projection and a head: the names vit uses."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.blocks = nn.ModuleList([nn.Module(), nn.Module()])
        self.blocks[0].attn, self.blocks[1].attn = Attn(), Attn()
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b.attn(h)
        return self.head(self.norm(h).mean(1))


def tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def test_step_zero_logits_are_the_base_models_bit_for_bit():
    """V = 0 makes ΔW = U V exactly 0: a transformation that perturbed W0 (V random, a dropped bias, W0 + Uᵀ…)
    would change the logits."""
    base, uv = tiny(), tiny()
    x = torch.randn(5, 7, 4)
    apply_uv(uv, 2, seed=3)
    assert torch.equal(base(x), uv(x))
    assert all(torch.equal(m.V, torch.zeros_like(m.V)) for m in uv.modules() if isinstance(m, LowRankLinear))


def test_trainable_vector_is_exactly_u_v_and_head():
    model = tiny()
    report = apply_uv(model, 2)
    names = [e.name for e in param_layout(model)]
    expected = [f"blocks.{b}.attn.{t}.{p}" for b in (0, 1) for t in ("q", "k", "v", "out") for p in ("U", "V")]
    assert names == expected + ["head.weight", "head.bias"]
    # 8 layers × (d1 + d2)·r = 8 × 12 × 2, plus the head's 6·3 + 3
    assert report["num_trainable"] == 8 * 12 * 2 + 21 == sum(e.numel for e in param_layout(model))
    assert report["num_params"] == sum(p.numel() for p in tiny().parameters()) + 8 * 12 * 2
    assert report["layers"] == [f"blocks.{b}.attn.{t}" for b in (0, 1) for t in ("q", "k", "v", "out")]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"embed.weight", "norm.weight", "blocks.0.attn.q.weight", "blocks.0.attn.q.bias"} <= frozen


def test_u_is_drawn_from_the_seed_with_std_one_over_sqrt_rank():
    """Pins the draw: the first layer's U is N(0,1)·(1/√r) from Generator(seed), in float64 then cast (a σ of
    1/r, or the global RNG, would differ)."""
    a, b, c = tiny(), tiny(), tiny()
    apply_uv(a, 4, seed=7)
    apply_uv(b, 4, targets=("out", "q", "k", "v"), seed=7)  # the order of targets does not change the draw
    apply_uv(c, 4, seed=8)
    gen = torch.Generator().manual_seed(7)
    expected = (torch.randn(6, 4, generator=gen, dtype=torch.float64) * 0.5).float()
    assert torch.equal(a.blocks[0].attn.q.U, expected)
    assert torch.equal(a.blocks[0].attn.q.U, b.blocks[0].attn.q.U)
    assert not torch.equal(a.blocks[0].attn.q.U, c.blocks[0].attn.q.U)
    d = tiny()
    apply_uv(d, 4, init_std=0.1, seed=7)
    assert torch.allclose(d.blocks[0].attn.q.U, expected * 0.2)


def test_forward_is_x_times_w0_plus_uv_transposed():
    """y = x (W0 + U V)ᵀ + b with U d1×r and V r×d2, against the formula (a V U product, or W0ᵀ, would differ)."""
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    layer = LowRankLinear(base, 2, 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.V.copy_(torch.randn(2, 5))
    x = torch.randn(4, 5)
    expected = x @ (base.weight + layer.U @ layer.V).T + base.bias
    assert layer.U.shape == (3, 2) and layer.V.shape == (2, 5)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_gradients_of_u_and_v_are_the_chain_rule_of_the_weight_gradient():
    """∂L/∂U = G Vᵀ and ∂L/∂V = Uᵀ G with G = ∂L/∂W of the merged weight (a transposed product would differ);
    frozen W0 and b get no gradient."""
    torch.manual_seed(1)
    base = nn.Linear(5, 4)
    layer = LowRankLinear(base, 3, 1.0, torch.Generator().manual_seed(2))
    with torch.no_grad():
        layer.V.copy_(torch.randn(3, 5))
    x, t = torch.randn(6, 5), torch.randn(6, 4)
    ((layer(x) - t) ** 2).sum().backward()
    w = (base.weight + layer.U @ layer.V).detach().requires_grad_(True)
    ((F.linear(x, w, base.bias) - t) ** 2).sum().backward()
    G = w.grad
    assert torch.allclose(layer.U.grad, G @ layer.V.detach().T, atol=1e-5)
    assert torch.allclose(layer.V.grad, layer.U.detach().T @ G, atol=1e-5)
    assert layer.weight.grad is None and layer.bias.grad is None


def test_fold_gives_the_base_architecture_computing_the_same_function():
    uv = tiny()
    apply_uv(uv, 2, seed=1)
    with torch.no_grad():
        for m in uv.modules():
            if isinstance(m, LowRankLinear):
                m.V.normal_()
    base = tiny(5)
    base.load_state_dict(fold_uv(uv.state_dict()))
    x = torch.randn(3, 7, 4)
    assert not torch.equal(uv(x), tiny()(x))  # V ≠ 0 changed the function
    assert torch.allclose(base(x), uv(x), atol=1e-5)
    assert fold_uv(tiny().state_dict()).keys() == tiny().state_dict().keys()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"rank": 0}, "model.uv.rank=0: must be a positive integer"),
    ({"rank": -3}, "model.uv.rank=-3: must be a positive integer"),
    ({"rank": 7}, "model.uv.rank=7 exceeds min(d1, d2)=6 of blocks.0.attn.q (6×6): choose 1..6"),
    ({"rank": 2, "targets": ("qq",)}, "model.uv.targets: 'qq' matches no module of model 'model': its linear layers "
                                      "are named embed, head, k, out, q, v"),
    ({"rank": 2, "targets": ("attn",)}, "'attn' matches blocks.0.attn, a Attn, not a linear layer"),
    ({"rank": 2, "trainable": ("classifier",)}, "model.uv.trainable: 'classifier' matches no parameter"),
    ({"rank": 2, "targets": ()}, "model.uv.targets is empty"),
])
def test_bad_uv_settings_are_one_line_errors(kwargs, fragment):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        apply_uv(model, **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert model.state_dict().keys() == before.keys()  # nothing was replaced before the error


def test_uv_problems_of_the_config_section():
    cfg = load_config(None, ["model.uv.rank=0", "model.uv.init_std=-1", "model.uv.targets=[]"])
    problems = uv_problems(cfg.model.uv)
    assert len(problems) == 3 and "model.uv.rank=0" in problems[0]
    assert uv_problems(load_config(None).model.uv) == []  # unset: no reparametrisation


def test_the_config_and_a_direct_call_check_uv_settings_with_one_copy():
    """`uv_problems` (the plan) and `apply_uv` (a direct call) said different things about the same settings:
    σ = 0 got two messages, and a direct call stopped at the first problem. Now one list, the same lines."""
    cfg = load_config(None, ["model.uv.rank=0", "model.uv.init_std=0", "model.uv.targets=[]"])
    problems = uv_problems(cfg.model.uv)
    assert problems == ["model.uv.rank=0: must be a positive integer ≤ min(d1, d2) of the layers (SL2O uses 16); "
                        "leave it unset for no UV reparametrisation",
                        "model.uv.targets is empty: name the linear layers to reparametrise, e.g. [q, k, v, out]",
                        f"model.uv.init_std={cfg.model.uv.init_std!r}: must be a finite number > 0 (default 1/√rank)"]
    with pytest.raises(ConfigError) as err:
        apply_uv(tiny(), 0, targets=(), init_std=cfg.model.uv.init_std)
    assert err.value.problems == problems


# ---------------------------------------------------------------------------------------------------------
# through the config: model_for, build_task, the plan, the sweep's count

def _uv_overrides(tmp_path):
    return [f"run_dir={tmp_path}/run", "model.name=mlp", "model.options.hidden=[32,16]", "model.uv.rank=4",
            "model.uv.targets=['1','3']", "model.uv.trainable=['5']", "train.projection=identity"]


def test_build_task_trains_only_u_v_and_head_and_leaves_w0(tmp_path):
    """The flat vector the optimizers see is U, V, head: a step of psgd on the identity projection moves them and
    nothing else (a vector that held the frozen W0 would move it)."""
    from raysub.engine.task import build_task, train_step
    from raysub.optim import build_optimizer

    cfg = load_config(None, _uv_overrides(tmp_path) + ["train.lr=0.5"])
    task = build_task(cfg)
    n_uv = (32 + 64) * 4 + (16 + 32) * 4 + 16 * 10 + 10
    assert task.dim == task.theta0_N.numel() == n_uv
    w0 = task.model[1].weight.detach().clone()
    z = task.new_z()
    opt = build_optimizer("psgd", z, cfg.train)
    x, y = next(task.data.batches("train", [torch.arange(32)], augment=False, seed=0))
    for _ in range(3):
        train_step(task, z, opt, x, y)
    assert torch.equal(task.model[1].weight, w0)
    assert float(task.model[1].V.detach().norm()) > 0 and float(z.norm()) > 0


def test_plan_and_sweep_count_trainable_parameters_only(tmp_path):
    from raysub.pipeline.plan import describe_params, plan
    from raysub.pipeline.sweep import plan_sweep

    cfg = load_config(None, _uv_overrides(tmp_path))
    info = plan(cfg)
    n_uv = (32 + 64) * 4 + (16 + 32) * 4 + 16 * 10 + 10
    total = 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10 + (32 + 64) * 4 + (16 + 32) * 4
    assert (info["num_params"], info["num_params_total"]) == (n_uv, total)
    assert describe_params(cfg, info) == f"{n_uv:,} trainable of {total:,} parameters (UV rank 4 on 2 layers)"
    sweep = load_config(None, _uv_overrides(tmp_path) + ["data.val_fraction=0.1", "sweep.families=[dense]",
                                                         "sweep.dims=[10]"])
    assert plan_sweep(sweep)["num_params"] == n_uv


# ---------------------------------------------------------------------------------------------------------
# train.init_from

def _base_run(tmp_path, name="base", model="mlp", options=None, classes=10, state=None):
    """A run directory holding trained weights as 'raysub sample' commits them (manifest + model.pt)."""
    from raysub.models import build_model
    from raysub.storage import RunDir

    options = {"hidden": [32, 16]} if options is None else options
    torch.manual_seed(123)
    net = build_model(model, classes, (64,) if model == "mlp" else (1, 28, 28), **options)
    run = RunDir(str(tmp_path / name))
    run.makedirs()
    sha = run.write_torch("model.pt", state if state is not None else net.state_dict())
    run.write_json("manifest.json", {"shards": {"model.pt": sha},
                                     "config": {"model": {"name": model, "options": options}}})
    return run, net


def test_init_from_loads_the_base_weights_then_uv_keeps_them_frozen(tmp_path):
    from raysub.engine.task import build_task

    run, net = _base_run(tmp_path)
    cfg = load_config(None, _uv_overrides(tmp_path) + [f"train.init_from={run.uri}"])
    task = build_task(cfg)
    assert torch.equal(task.model[1].weight, net[1].weight) and torch.equal(task.model[0 + 3].bias, net[3].bias)
    assert torch.equal(task.model[5].weight, net[5].weight)  # the head too: same class count
    x, _ = next(task.data.batches("test", [torch.arange(16)], augment=False, seed=0))
    task.sub.set_z(task.new_z())
    assert torch.equal(task.model(x), net(x))  # the base model's logits at step 0


def test_init_from_a_head_of_another_class_count_starts_fresh(tmp_path):
    from raysub.pipeline.plan import describe_params, plan

    run, net = _base_run(tmp_path, classes=5)
    cfg = load_config(None, [f"run_dir={tmp_path}/r", "model.name=mlp", "model.options.hidden=[32,16]",
                             f"train.init_from={run.uri}"])
    info = plan(cfg)
    model = info["model"]
    assert torch.equal(model[3].weight, net[3].weight)
    from raysub.models import build_model

    torch.manual_seed(cfg.seed)  # the fresh head is the seeded model's (not zeros, not the base's rows)
    seeded = build_model("mlp", 10, (64,), hidden=[32, 16])
    assert torch.equal(model[5].weight, seeded[5].weight) and torch.equal(model[5].bias, seeded[5].bias)
    assert info["init_from"]["fresh"] == ["5.weight", "5.bias"]
    assert info["init_from"]["sha256"] == run.read_json("manifest.json")["shards"]["model.pt"]
    assert "fresh 5 (another class count)" in describe_params(cfg, info)


def test_init_from_a_uv_run_folds_its_u_v(tmp_path):
    from raysub.models import build_model

    torch.manual_seed(3)
    net = build_model("mlp", 10, (64,), hidden=[32, 16])
    apply_uv(net, 4, targets=("1",), trainable=())
    with torch.no_grad():
        net[1].V.normal_()
    run, _ = _base_run(tmp_path, state=net.state_dict())
    cfg = load_config(None, [f"run_dir={tmp_path}/r", "model.name=mlp", "model.options.hidden=[32,16]",
                             f"train.init_from={run.uri}"])
    from raysub.pipeline.plan import plan

    model = plan(cfg)["model"]
    assert torch.allclose(model[1].weight, net[1].merged_weight(), atol=1e-6)


@pytest.mark.parametrize("setup, fragment", [
    ("missing", "does not exist: pass the run directory of a finished 'raysub sample'"),
    ("not_run", "is not a raysub run directory (no manifest.json)"),
    ("no_model", "holds no trained weights (model.pt): it was not made by 'raysub sample'"),
    ("unfinished", "holds no trained weights (model.pt): its sampling is unfinished: finish it with raysub sample"),
    ("other_model", "is a 'lenet5' run, this run's model is 'mlp': init_from needs a run of the same architecture"),
    ("other_options", "is another mlp (hidden=[32, 8] there, [32, 16] here)"),
    ("other_shape", "1.weight is (32, 49) there and (32, 64) here (another input shape? data digits): not the same"),
    ("corrupt", "model.pt is corrupted (xxh3_128 does not match the manifest)"),
])
def test_init_from_problems_are_one_line_errors(tmp_path, setup, fragment):
    from raysub.pipeline.plan import plan
    from raysub.storage import RunDir

    base = tmp_path / "base"
    if setup == "not_run":
        base.mkdir()
    elif setup in ("no_model", "unfinished"):
        run = RunDir(str(base))
        run.makedirs()
        stages = {"sample": {"complete": False}} if setup == "unfinished" else {"train.psgd": {"complete": True}}
        run.write_json("manifest.json", {"shards": {}, "stages": stages,
                                         "config": {"model": {"name": "mlp", "options": {}}}})
    elif setup == "other_model":
        _base_run(tmp_path, model="lenet5", options={}, state={"x": torch.zeros(1)})
    elif setup == "other_options":
        _base_run(tmp_path, options={"hidden": [32, 8]})
    elif setup == "other_shape":  # same options, another input: the first layer's shape differs
        from raysub.models import build_model

        _base_run(tmp_path, state=build_model("mlp", 10, (49,), hidden=[32, 16]).state_dict())
    elif setup == "corrupt":
        run, _ = _base_run(tmp_path)
        data = bytearray(open(base / "model.pt", "rb").read())
        data[-20] ^= 0xFF
        open(base / "model.pt", "wb").write(bytes(data))
    cfg = load_config(None, [f"run_dir={tmp_path}/r", "model.name=mlp", "model.options.hidden=[32,16]",
                             f"train.init_from={base}"])
    with pytest.raises((ConfigError, StorageError)) as err:  # a corrupted model.pt is a StorageError
        plan(cfg)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "r").exists()


def test_resume_refuses_another_init_from(tmp_path):
    """train.* is stage-checked on resume, but init_from made the run's θ0: changing it must be refused."""
    from raysub.runs.records import STAGE_CHECKED, config_diff

    a = load_config(None, ["train.init_from=runs/a", "train.lr=0.1"]).to_dict()
    b = load_config(None, ["train.init_from=runs/b", "train.lr=0.2"]).to_dict()
    assert [k for k, _, _ in config_diff(a, b, STAGE_CHECKED)] == ["train.init_from"]


def test_init_from_options_compare_as_yaml_writes_them(tmp_path):
    """mlp's default hidden=(64,) is the [64] a YAML base config records, and vit's patch=None (derived: 7 on 28×28)
    matches a base that wrote patch: 7 — the same architecture must not be refused."""
    from raysub.pipeline.plan import plan

    run, _ = _base_run(tmp_path, options={"hidden": [64]})
    plan(load_config(None, [f"run_dir={tmp_path}/r", "model.name=mlp", "model.options={}",
                            f"train.init_from={run.uri}"]))
    from raysub.models.init import _resolved_options

    assert _resolved_options("vit", {"patch": 7})["patch"] == 7 and _resolved_options("vit", {})["patch"] is None


def test_a_stage_refuses_another_init_from_on_an_existing_run(tmp_path):
    """`raysub train RUN train.init_from=…` cannot change the θ0 the run already holds: one line, not a silent no-op."""
    from raysub.pipeline.run import _stage_config
    from raysub.storage import RunDir

    run = RunDir(str(tmp_path / "r"))
    run.makedirs()
    run.write_json("manifest.json", {"config": load_config(None, ["train.init_from=/a/base"]).to_dict()})
    with pytest.raises(ConfigError, match=r"train.init_from sets a run's θ0, and .* already has its own \(/a/base\)"):
        _stage_config(run, ["train.init_from=/b/base"], "train")
    assert _stage_config(run, ["train.lr=0.5"], "train").train.init_from == "/a/base"
