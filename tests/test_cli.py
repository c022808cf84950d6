"""Bad input on the command line: one line naming the input and the fix, exit code 2, nothing written."""
import os

import pytest

from raysub.cli import main


def run_cli(capsys, args):
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.name=vgg99", "unknown model 'vgg99'"),
        ("data.name=imagenet22k", "unknown dataset 'imagenet22k'"),
        ("train.optimizer=lion", "unknown optimizer 'lion'"),
        ("train.projection_options={max_bytes: 0}", "projection family 'dldr' got unexpected option(s) 'max_bytes'"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5"),
        ("basis.dim=0", "basis.dim=0: must be > 0"),
        ("basis.dim=-2", "basis.dim=-2: must be > 0"),
        ("basis.dim=21", "basis.dim=21 must be < the 21 snapshots"),
        ("train.lr=-0.5", "train.lr=-0.5: must be > 0"),
        ("sgd.lr=-1", "sgd.lr=-1.0: must be > 0"),
        ("trian.lr=1", "unknown key 'trian'"),
        (("train.optimizer=pbfgs", "train.optimizer_options={c: 0}"),
         "train.optimizer_options.c=0: the Armijo constant must be in (0, 1)"),
        (("train.optimizer=pbfgs", "train.optimizer_options={beta: 1.5}"),
         "train.optimizer_options.beta=1.5: the backtracking factor must be in (0, 1)"),
        (("train.optimizer=pbfgs", "train.optimizer_options={c: fast}"),
         "optimizer 'pbfgs' option c='fast': expected a number"),
        ("train.optimizer_options={line_search_c: 0.4}", "optimizer 'psgd' got unexpected option(s) 'line_search_c'"),
        ("train.line_search_c=0.4", "unknown key 'train.line_search_c'"),
        ("data.label_noise=1.2", "data.label_noise=1.2"),
        ("data.label_noise=-0.1", "data.label_noise=-0.1"),
        ("train.epochs=many", "train.epochs: expected an integer"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, override, needle):
    run_dir = tmp_path / "run"
    overrides = list(override) if isinstance(override, tuple) else [override]
    rc, err = run_cli(capsys, ["run", *overrides, f"run_dir={run_dir}"])
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("raysub: error:")
    assert needle in err, err
    assert not run_dir.exists()


def test_missing_data_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc, err = run_cli(capsys, ["sample", "fashion_mnist_lenet", "data.root=/no/such/fmnist", f"run_dir={run_dir}"])
    assert rc == 2 and err.count("\n") == 1
    assert "/no/such/fmnist" in err and "apt-get install dataset-fashion-mnist" in err
    assert not run_dir.exists()


def test_every_problem_at_once(tmp_path, capsys):
    rc, err = run_cli(capsys, ["run", "model.name=x", "train.lr=-1", "basis.dim=0", f"run_dir={tmp_path}/r"])
    assert rc == 2 and err.count("\n") == 1
    for needle in ("model.name", "train.lr", "basis.dim"):
        assert needle in err


def test_existing_run_dir_needs_a_flag(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "something").write_text("x")
    rc, err = run_cli(capsys, ["run", f"run_dir={run_dir}"])
    assert rc == 2 and "--resume" in err and "--overwrite" in err
    assert os.listdir(run_dir) == ["something"]
    rc, err = run_cli(capsys, ["run", f"run_dir={run_dir}", "--resume", "--overwrite"])
    assert rc == 2 and "exclude" in err


def test_stage_on_a_non_run_directory(tmp_path, capsys):
    rc, err = run_cli(capsys, ["basis", str(tmp_path)])
    assert rc == 2 and "not a raysub run directory" in err
    rc, err = run_cli(capsys, ["train", str(tmp_path)])
    assert rc == 2 and "not a raysub run directory" in err


def test_unknown_config_file(capsys):
    rc, err = run_cli(capsys, ["run", "no_such_config.yaml"])
    assert rc == 2 and "quickstart" in err


# --- config bad input (issue 9) ---

CONFIG_FILES = {  # file name -> bytes; the case "adir" is a directory
    "list.yaml": b"- train\n- sgd\n",
    "scalar.yaml": b"42\n",
    "latin1.yaml": b"train:\n  label: caf\xe9\n",
    "syntax.yaml": b"train:\n  lr: 0.5\n   epochs: 3\n",
}


@pytest.mark.parametrize("config, needle", [
    ("list.yaml", "list.yaml holds a list, not a mapping of sections"),
    ("scalar.yaml", "scalar.yaml holds the single value 42, not a mapping of sections"),
    ("adir", "adir is a directory: pass a YAML file"),
    ("latin1.yaml", "latin1.yaml is not UTF-8 text (byte 0xe9 at offset 19): save it as UTF-8"),
    ("syntax.yaml", "syntax.yaml is not valid YAML (mapping values are not allowed here at line 3, column 10)"),
])
@pytest.mark.parametrize("command", ["run", "sample", "sweep"])
def test_bad_config_file_is_one_line(tmp_path, capsys, command, config, needle):
    """A config file that is a list, a scalar, a directory or not UTF-8 ended in a traceback (exit 1). Catches: any
    of them reaching Python's or PyYAML's own exception instead of a ConfigError, in any command that reads a
    config."""
    for name, content in CONFIG_FILES.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "adir").mkdir()
    run_dir = tmp_path / "run"
    rc, err = run_cli(capsys, [command, str(tmp_path / config), f"run_dir={run_dir}"])
    assert rc == 2 and err.count("\n") == 1 and err.startswith("raysub: error: config ")
    assert needle in err, err
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides, needle", [
    (["train.lr=.nan"], "train.lr: expected a finite number, got nan"),
    (["sgd.lr=.inf"], "sgd.lr: expected a finite number, got inf"),
    (["sgd.momentum=.nan"], "sgd.momentum: expected a finite number, got nan"),
    (["train.optimizer=adam", "train.optimizer_options={eps: .nan}"],
     "optimizer 'adam' option eps=nan: expected a finite number"),
    (["train.optimizer=cgqn", "train.optimizer_options={damping: .inf}"],
     "optimizer 'cgqn' option damping=inf: expected a finite number"),
])
def test_non_finite_number_is_one_line(tmp_path, capsys, overrides, needle):
    """NaN and inf passed validation and `raysub run` went on to start Ray and write the run directory. Catches:
    a non-finite number accepted by the schema's or a plug-in's type check."""
    run_dir = tmp_path / "run"
    rc, err = run_cli(capsys, ["run", *overrides, f"run_dir={run_dir}"])
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not run_dir.exists()


def test_scientific_notation_is_accepted(tmp_path, capsys):
    """`raysub run sgd.weight_decay=5e-4` was rejected ("expected a number, got '5e-4'"); basis.dim=0 stops the run
    before Ray, and the only problem left must be that one. Catches: YAML 1.1 number parsing of overrides."""
    run_dir = tmp_path / "run"
    rc, err = run_cli(capsys, ["run", "sgd.weight_decay=5e-4", "train.lr=1E-1", "basis.dim=0",
                               f"run_dir={run_dir}"])
    assert rc == 2 and err == "raysub: error: basis.dim=0: must be > 0\n"
    assert not run_dir.exists()
