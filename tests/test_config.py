import pytest
import yaml

from raysub.config import Config, load_config, parse_overrides
from raysub.pipeline.plan import check, validate
from raysub.pipeline.sample_plan import num_snapshots, snapshot_steps
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
        # issue 11: the streaming Gram's and the adaptive window's keys
        ("sample.stop=adaptive", "sample.stop=adaptive reads the streaming Gram: set sample.stream_gram=true"),
        ("sample.write_basis=true", "sample.write_basis=true needs the streaming Gram"),
        ("sample.stop_threshold=0", "sample.stop_threshold=0.0: must be in (0, 1)"),
        ("sample.stop_threshold=1", "sample.stop_threshold=1.0: must be in (0, 1)"),
        ("sample.stop_patience=0", "sample.stop_patience=0: must be ≥ 1"),
        ("sample.min_snapshots=-1", "sample.min_snapshots=-1: must be ≥ 0"),
        ("sample.min_snapshots=15", "sample.min_snapshots=15 must exceed basis.dim=15"),
        ("sample.stream_gram_budget_mb=0", "sample.stream_gram_budget_mb=0.0: must be > 0"),
    ],
)
def test_bad_values_name_the_input(override, needle):
    cfg = load_config(None, [override, "sample.epochs=10", "sample.snapshots_per_epoch=2"]
                      if not override.startswith("sample.epochs") else [override])
    problems = validate(cfg)
    assert any(needle in p for p in problems), problems
    with pytest.raises(ConfigError):
        check(cfg)


@pytest.mark.parametrize("override, section, key, bad, needle", [
    ("sample.stop=early", "sample", "stop", "early", "sample.stop='early': choose fixed or adaptive"),
    ("basis.gram=fast", "basis", "gram", "fast", "basis.gram='fast': choose auto or posthoc"),
    ("sgd.optimizer=adam", "sgd", "optimizer", "adam", "sgd.optimizer='adam': choose sgd or adamw"),
    ("train.basis_dtype=half", "train", "basis_dtype", "half",
     "train.basis_dtype='half': choose float32 or bfloat16"),
])
def test_literal_choices_are_refused(override, section, key, bad, needle):
    """A `Literal` field: a value outside its choices is refused as the config is read (one line naming the key
    and the choices), and a config built in code with one is refused by the plan's checks, worded the same."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert exc.value.problems == [needle]
    cfg = Config()
    setattr(getattr(cfg, section), key, bad)
    problems = validate(cfg)
    assert problems.count(needle) == 1, problems
    with pytest.raises(ConfigError):
        check(cfg)


def test_literal_choice_keeps_its_type_checks():
    """A choice is a string first: a list, a number or an overlong name gets the string field's message, not a
    second 'choose' line."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["basis.gram=[auto]", "sample.stop=3", "sgd.optimizer=" + "x" * 200])
    assert len(exc.value.problems) == 3, exc.value.problems
    assert "basis.gram: expected a string" in str(exc.value)
    assert "sample.stop='3': choose fixed or adaptive" in str(exc.value)  # a number keeps its spelling, as text
    assert "sgd.optimizer: a name of 200 characters" in str(exc.value)


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


# --- numbers in scientific notation, non-finite numbers, unreadable config files (issue 9) ---------------------

@pytest.mark.parametrize("text, value", [("5e-4", 5e-4), ("1E3", 1000.0), ("1e+3", 1000.0), ("-2.5e-3", -0.0025),
                                         ("1.0e3", 1000.0), (".5e2", 50.0), ("2.5E-1", 0.25)])
def test_scientific_notation_is_a_number(tmp_path, text, value):
    """YAML 1.1 reads '5e-4', '1E3', '1e+3' and '1.0e3' as strings, so `sgd.weight_decay=5e-4` was rejected ("expected
    a number, got '5e-4'"). Catches: no YAML 1.2 float resolver, or one that still demands a dot or a signed
    exponent. Values are exact: a resolver that reads the mantissa alone (1E3 -> 1) fails too; and the config holds
    plain floats, also inside options (no number type of the loader's own left in it)."""
    cfg = load_config(None, [f"sgd.weight_decay={text}", f"train.optimizer_options={{eps: {text}}}"])
    assert cfg.sgd.weight_decay == value and type(cfg.sgd.weight_decay) is float
    assert cfg.train.optimizer_options == {"eps": value} and type(cfg.train.optimizer_options["eps"]) is float
    yaml.safe_dump(cfg.to_dict())  # plain values only: a float subclass in the config would not dump
    path = tmp_path / "c.yaml"
    path.write_text(f"sgd:\n  weight_decay: {text}\nmodel:\n  options: {{hidden: [8], scale: {text}}}\n")
    cfg = load_config(str(path))
    assert cfg.sgd.weight_decay == value and cfg.model.options == {"hidden": [8], "scale": value}


def test_load_yaml_reads_yaml_1_2_floats_as_plain_values():
    """`load_yaml` (for every YAML raysub reads) gives plain floats/ints — a number type of our own would make
    yaml.safe_dump fail — and leaves what is not a number a string. Catches: returning the spelled numbers, or a
    resolver that swallows '1e' or '1.2.3'."""
    from raysub.config import load_yaml

    data = load_yaml("a: [5e-4, 1E3, 1.5, 7, 1e, e3, 1.2.3, 1e3x, mod]\nb: {c: -2.5e-3}\n")
    assert data == {"a": [0.0005, 1000.0, 1.5, 7, "1e", "e3", "1.2.3", "1e3x", "mod"], "b": {"c": -0.0025}}
    assert [type(v) for v in data["a"][:4]] == [float, float, float, int] and type(data["b"]["c"]) is float
    assert yaml.safe_load(yaml.safe_dump(data)) == data


@pytest.mark.parametrize("text", ["1e-3", "1E3", "007", "1.50", "0x1F", "1_000"])
def test_strings_that_look_like_numbers_keep_their_spelling(tmp_path, text):
    """A string-valued field given something YAML reads as a number keeps the text as written. Catches: rejecting
    it ("expected a string, got 0.001" — what the new float resolver alone does to `train.label=1e-3`, a string
    before), or str() of the number ('0.001', '7', '1.5', '31')."""
    cfg = load_config(None, [f"train.label={text}", f"run_dir={text}", f"sweep.families=[dense, {text}]"])
    assert (cfg.train.label, cfg.run_dir, cfg.sweep.families) == (text, text, ["dense", text])
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  label: {text}\n")
    assert load_config(str(path)).train.label == text


def test_to_yaml_reads_back_unchanged(tmp_path):
    """config.yaml (written by `to_yaml`) quotes strings that YAML 1.2 reads as numbers, so a run's config reads back
    the same. Catches: dumping with yaml.safe_dump, whose YAML 1.1 resolver writes `tag: 1e3` unquoted, read back
    as the float 1000.0 inside an options mapping (no schema type there to restore the string); and an int field
    left holding the loader's own int type, which no safe dumper writes."""
    cfg = load_config(None, ['model.options={tag: "1e3"}', "train.label=5e-4", "sgd.weight_decay=5e-4", "seed=7"])
    text = cfg.to_yaml()
    assert "tag: '1e3'" in text and "label: '5e-4'" in text and "weight_decay: 0.0005" in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("override, needle", [
    ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
    ("train.lr=.NaN", "train.lr: expected a finite number, got nan"),
    ("sgd.lr=.inf", "sgd.lr: expected a finite number, got inf"),
    ("train.weight_decay=-.inf", "train.weight_decay: expected a finite number, got -inf"),
    ("sgd.momentum=.nan", "sgd.momentum: expected a finite number, got nan"),
    ("cluster.cpus_per_worker=.inf", "cluster.cpus_per_worker: expected a finite number, got inf"),
    ("data.label_noise=.nan", "data.label_noise: expected a finite number, got nan"),
    ("sweep.threshold=.inf", "sweep.threshold: expected a finite number, got inf"),
    ("sweep.baseline=.nan", "sweep.baseline: expected a finite number, got nan"),
    ("train.lr=nan", "train.lr: expected a number, got 'nan'"),
    ("sgd.lr=inf", "sgd.lr: expected a number, got 'inf'"),
])
def test_non_finite_numbers_are_rejected(override, needle):
    """`.nan`/`.inf` are YAML floats and passed every check: `positive()` tests `value < 0 or value == 0`, both False
    for NaN, and inf is > 0. Catches: a type check that accepts any float."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert exc.value.problems == [needle]


@pytest.mark.parametrize("section, key, value, needle", [
    ("train", "lr", float("nan"), "train.lr=nan: must be a finite number > 0"),
    ("sgd", "lr", float("inf"), "sgd.lr=inf: must be a finite number > 0"),
    ("sgd", "momentum", float("nan"), "sgd.momentum=nan: must be a finite number ≥ 0"),
    ("train", "weight_decay", float("inf"), "train.weight_decay=inf: must be a finite number ≥ 0"),
    ("cluster", "cpus_per_worker", float("nan"), "cluster.cpus_per_worker=nan: must be a finite number > 0"),
])
def test_validate_rejects_non_finite_numbers_of_a_built_config(section, key, value, needle):
    """`validate` takes any Config, also one built in code without `from_dict`. Catches: `positive()` without the
    finiteness test (NaN fails both `< 0` and `== 0`; inf is > 0)."""
    from raysub.config import positive

    cfg = Config()
    setattr(getattr(cfg, section), key, value)
    assert needle in validate(cfg, check_data=False)
    problems = []
    positive(problems, "x", 2.0)
    positive(problems, "y", 0.0, allow_zero=True)
    assert problems == []


@pytest.mark.parametrize("name, options, needle", [
    ("adam", {"eps": float("nan")}, "optimizer 'adam' option eps=nan: expected a finite number"),
    ("rmsprop", {"alpha": float("inf")}, "optimizer 'rmsprop' option alpha=inf: expected a finite number"),
    ("cgqn", {"damping": float("inf")}, "optimizer 'cgqn' option damping=inf: expected a finite number"),
    ("cgqn", {"rcond": float("nan")}, "optimizer 'cgqn' option rcond=nan: expected a finite number"),
    ("pbfgs", {"c": float("nan")}, "optimizer 'pbfgs' option c=nan: expected a finite number"),
])
def test_plugin_options_must_be_finite(name, options, needle):
    """The registry's type check accepted any float, so plug-in options without a range check of their own
    (adam's eps, cgqn's `damping < 0`, which NaN fails) took NaN and inf. (pbfgs's `not 0 < c < 1` already
    rejected NaN; it is pinned here to the type check's message.) Catches: `type_problem` without the
    finiteness test."""
    from typing import List

    from raysub.optim import check_optimizer
    from raysub.registry import type_problem

    assert check_optimizer(name, options) == [f"train.optimizer_options: {needle}"]
    assert type_problem(float("nan"), float) == "a finite number" and type_problem(1e-8, float) == ""
    assert type_problem([1.0, float("inf")], List[float]) == "a list of finite numbers"


@pytest.mark.parametrize("content, needle", [
    (b"- train\n- sgd\n", "holds a list, not a mapping of sections"),
    (b"42\n", "holds the single value 42, not a mapping of sections"),
    (b"train.lr=0.5\n", "holds the single value 'train.lr=0.5', not a mapping of sections"),
    (b"train:\n  label: caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 19): save it as UTF-8"),
    (b"\xff\xfet\x00r\x00", "is not UTF-8 text (byte 0xff at offset 0): save it as UTF-8"),
    (b"train:\n  lr: 0.5\n   epochs: 3\n",
     "is not valid YAML (mapping values are not allowed here at line 3, column 10): fix its syntax"),
    (b"train: {lr: 0.5\n", "is not valid YAML (expected ',' or '}', but got '<stream end>' at line 2, column 1)"),
    (b"train:\n  lr: 0.5\x00\n", "is not valid YAML (special characters are not allowed: #x0000 at character 17)"),
])
def test_unreadable_config_file_is_one_config_error(tmp_path, content, needle):
    """A list, a scalar, a non-UTF-8 file ended in ValueError/TypeError/UnicodeDecodeError tracebacks; invalid YAML
    said only "mapping values are not allowed here" with no place. Catches: any of these left to the parser's own
    exception, or a message without the file's name or its position."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), ["train.lr=1"])
    assert len(exc.value.problems) == 1 and "\n" not in str(exc.value)
    assert str(exc.value).startswith(f"config file {path} {needle}")


def test_config_path_that_is_a_directory(tmp_path):
    """`raysub run RUN_DIR` ended in an IsADirectoryError traceback. Catches: the OSError left uncaught, or caught
    without naming the file to pass instead."""
    with pytest.raises(ConfigError) as exc:
        load_config(str(tmp_path))
    assert exc.value.problems == [f"config path {tmp_path} is a directory: pass a YAML file (a run directory's "
                                  f"config is {tmp_path}/config.yaml)"]


def test_empty_config_file_is_the_defaults(tmp_path):
    """An empty or comment-only file is no config at all (not 'holds the single value None')."""
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert load_config(str(path)) == Config()


def test_another_model_drops_the_old_models_options():
    """quickstart's mlp has hidden=[64]; `model.name=vit` must not hand it to the ViT (an unknown option), and
    options given with the new name apply alone; the same name still merges key by key."""
    from raysub.config import load_config

    assert load_config("raysub/configs/quickstart.yaml").model.options  # the mlp's own
    assert load_config("raysub/configs/quickstart.yaml", ["model.name=vit"]).model.options == {}
    assert load_config("raysub/configs/quickstart.yaml",
                       ["model.name=vit", "model.options={dim: 32}"]).model.options == {"dim": 32}
    same = load_config("raysub/configs/vit_fashion_mnist_uv.yaml", ["model.options={dim: 32}"]).model.options
    assert same == {"patch": 7, "dim": 32, "depth": 4, "heads": 4}
