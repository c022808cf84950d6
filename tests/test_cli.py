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
