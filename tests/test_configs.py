"""Every shipped config loads and validates, every cluster manifest parses, every job is a safe thin entrypoint."""
from __future__ import annotations

import ast
import glob
import importlib
import os
import sys

import pytest
import yaml

from raysub.config import load_config
from raysub.pipeline.plan import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "raysub", "configs", "*.yaml")))
CLUSTER_YAMLS = sorted(glob.glob(os.path.join(REPO, "cluster", "*.yaml")))
JOBS = sorted(glob.glob(os.path.join(REPO, "jobs", "*.py")))  # jobs/bench/ is not matched: its own tests


def _name(path: str) -> str:
    return os.path.relpath(path, REPO)


def test_files_found():
    assert len(CONFIGS) >= 4 and CLUSTER_YAMLS and JOBS


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert validate(cfg, check_data=False) == []


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_shipped_config_names_its_command(path):
    with open(path) as fh:
        first = fh.readline()
    assert first.startswith(("# raysub", "# python")), f"{_name(path)}: first line must be the command that runs it"
    name = os.path.splitext(os.path.basename(path))[0]
    assert name in first, f"{_name(path)}: the command on line 1 should name the config"


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=_name)
def test_cluster_yaml_parses(path):
    with open(path) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", JOBS, ids=_name)
def test_job_docstring_has_launch_commands(path):
    with open(path) as fh:
        doc = ast.get_docstring(ast.parse(fh.read()))
    assert doc, f"{_name(path)} needs a module docstring with its launch commands"
    assert "ray job submit" in doc and "python jobs/" in doc


@pytest.mark.parametrize("path", JOBS, ids=_name)
def test_job_import_has_no_side_effects(path, monkeypatch, capsys):
    """Importing a job runs nothing: no Ray, no CLI, no output. The work sits under ``__main__``."""
    import raysub.cli

    calls = []
    monkeypatch.setattr(raysub.cli, "main", lambda *a, **k: calls.append(a) or 0)
    monkeypatch.syspath_prepend(REPO)  # jobs/ by its module name, wherever pytest was started
    name = f"jobs.{os.path.basename(path)[:-3]}"
    monkeypatch.delitem(sys.modules, name, raising=False)  # run the module's top level again
    ray_imported = "ray" in sys.modules
    ray_was_initialized = ray_imported and sys.modules["ray"].is_initialized()
    path_before, environ_before = list(sys.path), dict(os.environ)
    module = importlib.import_module(name)
    assert calls == []
    assert capsys.readouterr() == ("", "")
    assert sys.path == path_before and dict(os.environ) == environ_before
    if not ray_imported:
        assert "ray" not in sys.modules, f"importing {_name(path)} imported ray"
    if not ray_was_initialized:
        assert not ("ray" in sys.modules and sys.modules["ray"].is_initialized())
    if not os.path.basename(path).startswith("_"):
        assert callable(getattr(module, "main", None)), f"{_name(path)} needs main(argv=None) -> int"


@pytest.fixture
def ray_state(monkeypatch):
    """Set whether this process counts as inside a Ray session (other test files may hold a real one open)."""

    def set_initialized(value: bool) -> None:
        if value or "ray" in sys.modules:
            import ray

            monkeypatch.setattr(ray, "is_initialized", lambda: value)

    set_initialized(False)
    return set_initialized


def _load_job(name: str, monkeypatch):
    monkeypatch.syspath_prepend(REPO)  # jobs/ by its module name, wherever pytest was started
    return importlib.import_module(f"jobs.{name}")


@pytest.mark.parametrize(
    "job, argv, env, expected",
    [
        ("dldr", ["run_dir=/tmp/x", "--overwrite"], {}, ["run", "run_dir=/tmp/x", "--overwrite"]),
        ("dldr", ["--overwrite", "cfg.yaml", "seed=1"], {"RAY_ADDRESS": "10.0.0.1:6379"},
         ["run", "cfg.yaml", "seed=1", "cluster.address=auto", "--overwrite"]),
        ("sample", ["cluster.address=ray://h:10001"], {"RAY_ADDRESS": "10.0.0.1:6379"},
         ["sample", "cluster.address=ray://h:10001"]),
        ("basis", ["/runs/a", "basis.dim=5"], {"RAY_ADDRESS": "auto"},
         ["basis", "/runs/a", "basis.dim=5", "cluster.address=auto"]),
        ("train", ["s3://b/r", "--resume"], {}, ["train", "s3://b/r", "--resume"]),
        ("l2o_meta_train", ["l2o_fashion_mnist_lenet", "--resume", "l2o.actors=4"], {"RAY_ADDRESS": "auto"},
         ["l2o", "meta-train", "l2o_fashion_mnist_lenet", "l2o.actors=4", "cluster.address=auto", "--resume"]),
        ("l2o_tune", ["l2o_tune_digits"], {}, ["l2o", "tune", "l2o_tune_digits"]),
    ],
)
def test_job_builds_cli_arguments(job, argv, env, expected, monkeypatch, ray_state):
    """Jobs pass their arguments through and add cluster.address=auto only when a cluster is there to join."""
    import raysub.cli

    calls = []
    monkeypatch.setattr(raysub.cli, "main", lambda args: calls.append(args) or 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _load_job(job, monkeypatch).main(argv) == 0
    assert calls == [expected]


def test_job_joins_the_ray_session_it_runs_in(monkeypatch, ray_state):
    """Called from a process that already did ray.init (a notebook, a test), a job joins that session."""
    import raysub.cli

    calls = []
    monkeypatch.setattr(raysub.cli, "main", lambda args: calls.append(args) or 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_state(True)
    assert _load_job("train", monkeypatch).main(["/runs/a"]) == 0
    assert calls == [["train", "/runs/a", "cluster.address=auto"]]


def test_imagenet_job_uses_its_config(monkeypatch, ray_state):
    import raysub.cli

    calls = []
    monkeypatch.setattr(raysub.cli, "main", lambda args: calls.append(args) or 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _load_job("imagenet_resnet18", monkeypatch).main(["train.epochs=2"]) == 0
    command, config, *rest = calls[0]
    assert command == "run" and os.path.samefile(config, os.path.join(REPO, "raysub", "configs",
                                                                      "imagenet_resnet18.yaml"))
    assert rest == ["train.epochs=2"]


def test_job_rejects_job_server_address(monkeypatch, capsys):
    """RAY_ADDRESS=http://HEAD:8265 is for the `ray job` CLI; a driver cannot use it: one line, exit 2."""
    import raysub.cli

    monkeypatch.setattr(raysub.cli, "main", lambda args: pytest.fail("must not reach the CLI"))
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert _load_job("dldr", monkeypatch).main([]) == 2
    err = capsys.readouterr().err
    assert "RAY_API_SERVER_ADDRESS" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("path", [p for p in CONFIGS if os.path.basename(p).startswith("sweep_")], ids=_name)
def test_shipped_sweep_config_plans(path):
    """A shipped sweep passes every sweep check (grid, families, validation split, d ≤ N) where its data is."""
    from raysub.data import validate_dataset
    from raysub.pipeline.sweep import plan_sweep

    cfg = load_config(path)
    if validate_dataset(cfg.data.name, cfg.data.root) and os.environ.get("RAYSUB_REQUIRE_FASHION_MNIST") != "1":
        pytest.skip(f"{cfg.data.name} is not installed here")  # under .ci/run the data must be there: no skip
    info = plan_sweep(cfg)
    assert all(0 < d <= info["num_params"] for dims in info["grid"].values() for d in dims)
