"""Sweeps: Ctrl-C ends like `raysub run` (the resume command, exit 130) and `--resume` continues; a result of a
trial that never started; a problem shared by several families reported once."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from raysub.cli import CONFIG_DIR
from raysub.config import load_config
from raysub.errors import ConfigError
from raysub.pipeline import sweep
from raysub.storage import RunDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- no Ray ------------------------------------------------------------------------------------------------

def test_a_sweep_dims_problem_is_reported_once_not_once_per_family(tmp_path):
    """Three families share sweep.dims: d=0 and d=5000 are one problem each. Catches the check run per family
    (each problem three times in the one-line error), and dropping a family's own sweep.family_dims problem."""
    cfg = load_config(os.path.join(CONFIG_DIR, "sweep_digits.yaml"),
                      ["sweep.dims=[0,10,5000]", "sweep.family_dims={fastjl: [-3]}", f"run_dir={tmp_path}/sw"])
    with pytest.raises(ConfigError) as err:
        sweep.plan_sweep(cfg)
    assert err.value.problems == [
        "sweep.dims: d=0 must be > 0",
        "sweep.dims: d=5000 exceeds the model's 4,810 parameters: a subspace must be smaller",
        "sweep.family_dims.fastjl: d=-3 must be > 0",
    ]


def test_trial_spec_of_a_trial_that_never_reported():
    """A trial that never started has no config in its result (Ray sets config=None): the spec comes from the
    directory name. Catches reading result.config unguarded (the TypeError of an interrupted sweep) and a
    parse that splits a hyphenated family name or keeps dim and seed as strings."""
    started = SimpleNamespace(config={"trial": {"family": "dense", "dim": 30, "seed": 1}}, path="/x/other-name")
    assert sweep.trial_spec(started) == {"family": "dense", "dim": 30, "seed": 1}
    pending = SimpleNamespace(config=None, path="/runs/sw/tune/coarse/my-fam-d300-s12-5d3a1_00004")
    assert sweep.trial_spec(pending) == {"family": "my-fam", "dim": 300, "seed": 12}


# -- a real Ctrl-C -----------------------------------------------------------------------------------------

# 40 epochs (~4 s a trial on 2 cores): Tune's result.json may show a trial's first line only when it has run a
# while, and with 15 epochs a quiet machine finished the second trial before the Ctrl-C landed (flaky in CI)
EPOCHS = 40
SWEEP = ["sweep_digits", f"train.epochs={EPOCHS}", "train.lr_milestones=[]", "sweep.seeds=[0]", "sweep.refine=0",
         "sweep.baseline=0.97", "sweep.families=[fastjl]", "sweep.dims=[5,300]", "sweep.max_concurrent=1",
         "cluster.num_cpus=2"]


def _cli(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-m", "raysub.cli", "sweep", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _first_result(tune_dir: str, timeout: float) -> None:
    """Wait until a trial of the experiment has reported an epoch (its result.json is not empty)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(tune_dir):
            for d in os.listdir(tune_dir):
                f = os.path.join(tune_dir, d, "result.json")
                if os.path.isfile(f) and os.path.getsize(f) > 0:
                    return
        time.sleep(0.2)
    raise AssertionError(f"no trial reported within {timeout}s")


@pytest.mark.system  # a real CLI sweep in a subprocess, interrupted
def test_ctrl_c_during_a_sweep_exits_130_with_the_resume_command_and_resume_finishes(tmp_path):
    """SIGINT once the first of two trials (one at a time) has reported: the second never started. Before the
    fix the sweep crashed with "TypeError: 'NoneType' object is not subscriptable" (exit 1); catches treating
    the interrupted fit as finished (a ConfigError about unfinished trials, exit 2) and an interrupt that loses
    Tune's experiment state (--resume would start over, or fail)."""
    run_dir = f"{tmp_path}/sw"
    proc = _cli([*SWEEP, f"run_dir={run_dir}"])
    try:
        _first_result(f"{run_dir}/tune/coarse", timeout=300)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err.strip().splitlines()[-1], err[-3000:]
    assert "TypeError" not in err and "Traceback" not in err, err[-3000:]
    assert not os.path.exists(f"{run_dir}/results.json")

    proc = _cli([*SWEEP, f"run_dir={run_dir}", "--resume"])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "restoring" in out
    trial_dirs = [d for d in os.listdir(f"{run_dir}/tune/coarse") if os.path.isdir(f"{run_dir}/tune/coarse/{d}")]
    assert len(trial_dirs) == 2, trial_dirs  # the interrupted trial continued: none ran twice
    res = json.loads(RunDir(run_dir).read_text("results.json"))
    assert sorted((t["dim"], t["epochs_run"]) for t in res["trials"]) == [(5, EPOCHS), (300, EPOCHS)]


def test_prune_checkpoints_keeps_each_trials_latest(tmp_path):
    """A phase keeps every trial checkpoint while it runs (a killed driver's experiment state may name an old one)
    and prunes to the latest when it ends. Catches keeping the oldest (a lexical sort the wrong way), pruning
    across trials, and deleting files that are not checkpoints."""
    exp = tmp_path / "coarse"
    for trial, n in (("t0", 3), ("t1", 1), ("t2", 0)):
        for i in range(n):
            (exp / trial / f"checkpoint_{i:06d}").mkdir(parents=True)
            (exp / trial / f"checkpoint_{i:06d}" / "state.pt").write_bytes(b"x")
        (exp / trial).mkdir(parents=True, exist_ok=True)
        (exp / trial / "result.json").write_text("{}\n")
    (exp / "experiment_state-x.json").write_text("{}")
    assert sweep.prune_checkpoints(RunDir(str(exp))) == 2
    assert sorted(os.listdir(exp / "t0")) == ["checkpoint_000002", "result.json"]
    assert sorted(os.listdir(exp / "t1")) == ["checkpoint_000000", "result.json"]
    assert os.listdir(exp / "t2") == ["result.json"] and (exp / "experiment_state-x.json").exists()
