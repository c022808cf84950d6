"""Sweeps: a driver killed (kill -9) or interrupted (Ctrl-C, which ends like `raysub run`: the resume command, exit
130) is continued by `--resume`, no finished trial run again; a result of a trial that never started; a problem
shared by several families reported once."""
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


# -- a real kill -9 of the driver, then a real Ctrl-C -------------------------------------------------------

# 40 epochs (~4 s a trial on 2 cores): Tune's result.json may show a trial's first line only when it has run a
# while, and with 15 epochs a quiet machine finished the second trial before the Ctrl-C landed (flaky in CI)
EPOCHS = 40
SWEEP = ["sweep_digits", f"train.epochs={EPOCHS}", "train.lr_milestones=[]", "sweep.seeds=[0]", "sweep.refine=0",
         "sweep.baseline=0.97", "sweep.families=[fastjl]", "sweep.dims=[5,50,300]", "sweep.max_concurrent=1",
         "cluster.num_cpus=2"]


def _cli(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("RAY_ADDRESS", None)
    # its own process group: the local Ray cluster the driver starts goes with it when the test kills the group
    return subprocess.Popen([sys.executable, "-m", "raysub.cli", "sweep", *args], cwd=ROOT, env=env, text=True,
                            start_new_session=True, **kwargs)


def _lines(path: str) -> list:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


def _reports(tune_dir: str) -> dict:
    """{trial directory: its result.json lines} of the experiment so far."""
    if not os.path.isdir(tune_dir):
        return {}
    dirs = [os.path.join(tune_dir, d) for d in os.listdir(tune_dir)]
    return {d: _lines(os.path.join(d, "result.json")) for d in dirs if os.path.isdir(d)}


def _wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout}s")


def _end(proc) -> None:
    try:  # the driver's Ray cluster (same process group) goes with it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.system  # a real CLI sweep in a subprocess, killed, interrupted, resumed
def test_a_sweep_driver_killed_then_interrupted_resumes_and_reruns_no_finished_trial(tmp_path):
    """One sweep of three trials (one at a time), its driver stopped twice. kill -9 (the driver alone) once the
    first trial has finished: ``--resume`` restores Tune's experiment from the run directory. Ctrl-C (SIGINT) of
    that resumed driver once it has started an unfinished trial again: it ends like `raysub run` (exit 130, the
    resume command). A last ``--resume`` finishes. Catches a resume that re-runs a finished trial (its result.json
    then holds its epochs twice) or loses it; an interrupt that crashed with "TypeError: 'NoneType' object is not
    subscriptable" (exit 1), that treats the interrupted fit as finished (a ConfigError about unfinished trials,
    exit 2), or that loses Tune's experiment state (--resume would start over, or fail)."""
    run_dir, tune_dir = f"{tmp_path}/sw", f"{tmp_path}/sw/tune/coarse"
    log = open(f"{tmp_path}/driver.log", "w")  # a file, not a pipe nobody drains while the test polls
    proc = _cli([*SWEEP, f"run_dir={run_dir}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def one_finished():
            reports = _reports(tune_dir)
            done = {d: lines for d, lines in reports.items() if len(lines) == EPOCHS}
            return done if 0 < len(done) < 3 else None

        finished = _wait_for(one_finished, 400, "no trial finished before the sweep did")
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone: kill -9
        proc.wait(timeout=30)
    finally:
        _end(proc)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(f"{run_dir}/results.json")

    # files, not pipes: nobody drains a pipe while the test polls, and Tune's trial tables would fill it
    out_path, err_path = f"{tmp_path}/resumed.out", f"{tmp_path}/resumed.err"
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
        proc = _cli([*SWEEP, f"run_dir={run_dir}", "--resume"], stdout=out_f, stderr=err_f)
    try:
        def running_again():  # the resumed driver restored the experiment and started an unfinished trial
            with open(out_path) as f:
                text = f.read()
            return "restoring" in text and "started with configuration" in text

        _wait_for(running_again, 300, "the resumed driver started no trial")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            _end(proc)
    with open(out_path) as f_out, open(err_path) as f_err:
        out, err = f_out.read(), f_err.read()
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err.strip().splitlines()[-1], err[-3000:]
    assert "TypeError" not in err and "Traceback" not in err, err[-3000:]
    assert not os.path.exists(f"{run_dir}/results.json")

    proc = _cli([*SWEEP, f"run_dir={run_dir}", "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        _end(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "restoring" in out
    for d, before in finished.items():
        assert _lines(os.path.join(d, "result.json")) == before  # not one epoch more: not re-run
    assert len(_reports(tune_dir)) == 3  # the interrupted trials continued: none ran twice
    res = json.loads(RunDir(run_dir).read_text("results.json"))
    assert sorted((t["dim"], t["epochs_run"]) for t in res["trials"]) == [(5, EPOCHS), (50, EPOCHS), (300, EPOCHS)]


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
