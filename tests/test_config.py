import pytest
import yaml

from raysub.config import Config, load_config, parse_overrides
from raysub.pipeline.plan import check, validate
from raysub.pipeline.sample import num_snapshots, snapshot_steps
from raysub.errors import ConfigError


def test_defaults_are_valid():
    assert validate(Config()) == []


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.5}, "model": {"name": "mlp", "options": {"hidden": [8]}}}))
    cfg = load_config(str(path), ["train.lr=2", "model.options.hidden=[4,4]", "sample.epochs=3"])
    assert cfg.train.lr == 2.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.options == {"hidden": [4, 4]}
    assert cfg.sample.epochs == 3


def test_roundtrip_dict():
    cfg = load_config(None, ["basis.dim=7", "sgd.lr_milestones=[3,5]"])
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as exc:
        Config.from_dict({"trian": {}, "train": {"lr": "fast", "epochs": 1.5}, "seed": True})
    problems = exc.value.problems
    assert len(problems) == 4
    assert any("unknown key 'trian'" in p for p in problems)
    assert any("train.lr" in p and "number" in p for p in problems)
    assert any("train.epochs" in p and "integer" in p for p in problems)
    assert any("seed" in p for p in problems)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.name=nosuchnet", "unknown model 'nosuchnet'"),
        ("data.name=nosuchdata", "unknown dataset 'nosuchdata'"),
        ("train.optimizer=nosuchopt", "unknown optimizer 'nosuchopt'"),
        ("basis.dim=0", "basis.dim=0"),
        ("basis.dim=-3", "basis.dim=-3"),
        ("basis.dim=21", "basis.dim=21 must be <"),
        ("train.lr=-1", "train.lr=-1.0"),
        ("sgd.lr=-0.1", "sgd.lr=-0.1"),
        ("train.momentum=1.5", "train.momentum=1.5"),
        ("data.batch_size=63", "not divisible"),
        ("sample.epochs=31", "sample.epochs=31 exceeds"),
    ],
)
def test_bad_values_name_the_input(override, needle):
    cfg = load_config(None, [override, "sample.epochs=10", "sample.snapshots_per_epoch=2"]
                      if not override.startswith("sample.epochs") else [override])
    problems = validate(cfg)
    assert any(needle in p for p in problems), problems
    with pytest.raises(ConfigError):
        check(cfg)


def test_unknown_name_lists_choices():
    problems = validate(load_config(None, ["model.name=vgg"]))
    assert any("lenet5" in p and "mlp" in p for p in problems)


def test_missing_data_dir_is_reported():
    problems = validate(load_config(None, ["data.name=fashion-mnist", "data.root=/nonexistent/fmnist"]))
    assert any("/nonexistent/fmnist" in p for p in problems)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])


def test_snapshot_schedule():
    cfg = load_config(None, ["sample.epochs=2", "sample.snapshots_per_epoch=3"])
    assert num_snapshots(cfg, 10) == 7
    assert snapshot_steps(cfg, 10) == [4, 7, 10, 14, 17, 20]
    cfg = load_config(None, ["sample.epochs=2", "sample.snapshot_every_steps=4"])
    assert num_snapshots(cfg, 10) == 6
    assert snapshot_steps(cfg, 10) == [4, 8, 12, 16, 20]


def test_options_belong_to_their_plugin():
    """Switching train.optimizer (or projection) by override drops the old plug-in's options — a run made with
    P-BFGS options can be retrained with psgd; `{}` clears options; other keys merge as before."""
    from raysub.config import merge

    base = load_config(None, ["train.optimizer=pbfgs", "train.optimizer_options={c: 0.3, beta: 0.5}",
                              "train.projection=fastjl", "train.projection_options={index: mod}"]).to_dict()
    cfg = Config.from_dict(merge(base, parse_overrides(["train.optimizer=psgd"])))
    assert cfg.train.optimizer == "psgd" and cfg.train.optimizer_options == {}
    assert cfg.train.projection_options == {"index": "mod"}  # the projection did not change
    same = Config.from_dict(merge(base, parse_overrides(["train.optimizer=pbfgs", "train.lr=0.5"])))
    assert same.train.optimizer_options == {"c": 0.3, "beta": 0.5}
    more = Config.from_dict(merge(base, parse_overrides(["train.optimizer_options={max_backtracks: 3}"])))
    assert more.train.optimizer_options == {"c": 0.3, "beta": 0.5, "max_backtracks": 3}
    cleared = Config.from_dict(merge(base, parse_overrides(["train.optimizer_options={}"])))
    assert cleared.train.optimizer_options == {}
    proj = Config.from_dict(merge(base, parse_overrides(["train.projection=dense"])))
    assert proj.train.projection_options == {} and proj.train.optimizer_options == {"c": 0.3, "beta": 0.5}
