"""sgd.optimizer: the full-parameter run's optimizer (`full_optimizer`), SGD with heavy-ball momentum or AdamW, over
the trainable parameters only. Nothing here starts Ray."""
import pytest
import torch

from raysub.config import Config, load_config
from raysub.errors import ConfigError
from raysub.pipeline.plan import check, validate
from raysub.pipeline.sample import full_optimizer


def tiny(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()


def backward(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (5,), generator=gen)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()


def test_sgd_is_the_configured_heavy_ball_sgd():
    """Catches a dropped momentum or weight decay, or parameters out of model.parameters() order."""
    model = tiny()
    cfg = load_config(None, ["sgd.lr=0.05", "sgd.momentum=0.8", "sgd.weight_decay=0.002"])
    assert cfg.sgd.optimizer == "sgd"  # the default
    opt = full_optimizer(cfg, model)
    assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.8, 0.002)
    assert (group["dampening"], group["nesterov"]) == (0, False)
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_sgd_is_bit_identical_to_the_construction_it_replaced():
    """Every parameter trainable: three steps equal those of the former SGD(model.parameters(), ...) bit for bit,
    and so do the optimizer state dicts (a resumed checkpoint loads into either)."""
    cfg = load_config(None, [])
    a, b = tiny(), tiny()
    opt_a = full_optimizer(cfg, a)
    opt_b = torch.optim.SGD(b.parameters(), lr=cfg.sgd.lr, momentum=cfg.sgd.momentum,
                            weight_decay=cfg.sgd.weight_decay)
    for step in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            backward(model, seed=step)
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert all(torch.equal(sa["state"][k]["momentum_buffer"], sb["state"][k]["momentum_buffer"]) for k in sb["state"])


def test_adamw_step_matches_torch_and_the_hand_formula():
    """One AdamW step equals torch.optim.AdamW's own (built here independently) and the first-step formula
    p1 = p0 (1 - lr wd) - lr g / (|g| + eps); lr and wd differ, so swapping them (or decaying by wd alone, or
    building Adam with L2 instead of decoupled decay) is caught."""
    lr, wd = 0.01, 0.3
    cfg = load_config(None, ["sgd.optimizer=adamw", f"sgd.lr={lr}", f"sgd.weight_decay={wd}"])
    a, b = tiny(), tiny()
    p0 = [p.detach().clone() for p in a.parameters()]
    opt = full_optimizer(cfg, a)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (lr, wd, (0.9, 0.999))
    ref = torch.optim.AdamW(b.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=wd)
    backward(a), backward(b)
    grads = [p.grad.clone() for p in a.parameters()]
    opt.step(), ref.step()
    for p, q, w, g in zip(a.parameters(), b.parameters(), p0, grads):
        assert torch.equal(p, q)
        torch.testing.assert_close(p.detach(), w * (1 - lr * wd) - lr * g / (g.abs() + 1e-8), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_frozen_parameters_are_left_out(name, kind):
    """A low-rank reparametrised model keeps its base weights frozen: they must not be in the optimizer (catches
    model.parameters() passed whole: the optimizer would hold, and could step, the frozen weights)."""
    model = tiny()
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    opt = full_optimizer(load_config(None, [f"sgd.optimizer={name}"]), model)
    assert type(opt) is kind
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert held == [id(model[0].bias), id(model[2].weight)]
    frozen = model[0].weight.detach().clone()
    backward(model)
    opt.step()
    assert torch.equal(model[0].weight, frozen)


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="sgd.optimizer='adam': choose sgd or adamw"):
        load_config(None, ["sgd.optimizer=adam"])  # a Literal field: refused as the config is read
    cfg = Config()
    cfg.sgd.optimizer = "adam"  # built in code, past the reader: the plan and the stage still refuse it
    assert "sgd.optimizer='adam': choose sgd or adamw" in validate(cfg)
    with pytest.raises(ConfigError):
        check(cfg)
    with pytest.raises(ConfigError, match="choose sgd or adamw"):
        full_optimizer(cfg, tiny())
    assert not [p for p in validate(load_config(None, ["sgd.optimizer=adamw"])) if "sgd.optimizer" in p]
    with pytest.raises(ConfigError, match="sgd.optimizer: expected a string"):
        load_config(None, ["sgd.optimizer=[sgd]"])


def test_resume_refuses_a_changed_optimizer_or_class_subset():
    """sgd.* and data.classes change results: a resume with another value is refused (neither is resume-safe
    nor stage-checked); a stored config from before these keys existed reads back with their defaults."""
    from raysub.runs.records import RESUME_SAFE, STAGE_CHECKED, config_diff

    old = Config().to_dict()
    for override, key in (("sgd.optimizer=adamw", "sgd.optimizer"), ("data.classes=[5,6]", "data.classes")):
        new = load_config(None, [override]).to_dict()
        assert [d[0] for d in config_diff(old, new, RESUME_SAFE + STAGE_CHECKED)] == [key]
    legacy = Config().to_dict()
    del legacy["sgd"]["optimizer"], legacy["data"]["classes"]
    assert config_diff(Config.from_dict(legacy).to_dict(), old) == []


def test_a_restart_after_an_adaptive_window_ended_the_stage_trains_no_more(tmp_path, monkeypatch):
    """sample.stop=adaptive with sgd.epochs = sample.epochs: the window closing at epoch 1 ends the stage. A worker
    group restarted from that last checkpoint (Ray's max_failures, or --resume after the driver died) trained one
    more epoch before this was caught, and committed that model as model.pt; it must report nothing and write the
    same model.pt. One process, Ray Train's calls replaced."""
    from raysub.engine import loop
    from raysub.pipeline import sample as S
    from raysub.pipeline import stream_gram as SG
    from raysub.pipeline.plan import plan
    from raysub.runs.records import init_run
    from raysub.storage import RunDir

    cfg = load_config(None, [f"run_dir={tmp_path}/r", "model.options={hidden: [16]}", "sgd.epochs=3", "sample.epochs=3",
                             "sample.stop=adaptive", "sample.stream_gram=true", "sample.snapshots_per_epoch=4",
                             "basis.dim=2", "cluster.num_workers=1", "sgd.lr_milestones=[]"])
    init_run(cfg, plan(cfg), False, False)
    run = RunDir(cfg.run_dir)
    reports, state = [], {"ckpt": None}
    monkeypatch.setattr(loop, "worker_context", lambda config: loop.WorkerContext(
        cfg, None, 0, 1, torch.device("cpu"), run, "train"))
    monkeypatch.setattr(loop, "load_checkpoint", lambda session="train": state["ckpt"])
    monkeypatch.setattr(loop, "report", lambda metrics, ckpt, session="train": reports.append((metrics, ckpt)))
    monkeypatch.setattr(SG, "stop_decision", lambda *a, **k: True)  # the window closes at the first check
    monkeypatch.setattr(SG, "close_window", lambda *a, **k: None)
    monkeypatch.setattr(S, "min_window_snapshots", lambda cfg: 0)
    config = {"cfg": cfg.to_dict(), "progress": None, "stream_gram": True}
    S.sample_loop(config)
    first = run.read_torch("model.pt")
    assert [m["epoch"] for m, _ in reports] == [1] and reports[-1][0]["window_epochs"] == 1
    state["ckpt"] = reports[-1][1]
    reports.clear()
    S.sample_loop(config)
    assert reports == []
    second = run.read_torch("model.pt")
    assert all(torch.equal(first[k], second[k]) for k in first)
