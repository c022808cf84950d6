"""Shared fixtures and the test tiers.

Ray integration tests share one session-scoped local Ray cluster (4 logical CPUs, so two Train workers, the Train
controller and the basis actors fit on a 2-core machine).

Every test lands in exactly one tier (markers registered in pyproject.toml), decided at collection:
- ``system``: marked by hand (``pytestmark`` or a decorator) on tests that start their own cluster, server or process;
- ``integration``: tests that use the shared ``ray_session`` fixture, directly or through another fixture;
- ``unit``: everything else. A guard makes a unit test fail loudly if it starts Ray, a subprocess or a server, so the
  tier stays cheap (``python -m pytest -q -m unit``).
Each tier has its own per-test timeout (pytest-timeout), unless a test sets one itself.
"""
import os
import subprocess
import socket
import threading

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# Credentials for the loopback S3 server of tests/test_s3.py, set before any Ray cluster starts so that its
# workers inherit them (a real cluster's nodes have their own, from the AWS default chain). No metadata lookups.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "raysub-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "raysub-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

TIERS = ("unit", "integration", "system")
# Seconds per test, fixture set-up included (a module fixture's run counts against its first test). Generous: a
# timeout is there to end a hung test with a traceback, not to time the healthy ones (--durations does that).
TIMEOUT_S = {"unit": 120, "integration": 600, "system": 900}
SLOW_TIMEOUT_S = 1800  # `slow` and `gpu` tests run for minutes by design


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Every test starts at the process's torch thread count: a benchmark's ``main`` run in-process (and some tests)
    call ``torch.set_num_threads``, and a later in-process run's float sums depend on the thread count (the local-mode
    resume test compares to the session's one-rank run bit for bit)."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from raysub.config import load_config
    from raysub.engine.cluster import ensure_ray

    if not ray.is_initialized():  # the cluster raysub starts for a run: loopback only, quiet
        ensure_ray(load_config(None, ["cluster.num_cpus=4"]))
    yield ray
    ray.shutdown()


# The quickstart shortened for the tests: 3 SGD epochs, 2 sampled, a 3-dim basis, 2 P-SGD epochs (~25 s on 2 cores).
QUICKSTART_SMALL = ["sgd.epochs=3", "sample.epochs=2", "sgd.lr_milestones=[]", "basis.dim=3", "train.epochs=2",
                    "train.lr_milestones=[1]"]


@pytest.fixture(scope="session")
def quickstart_run(ray_session, tmp_path_factory):
    """``raysub run`` of ``QUICKSTART_SMALL`` on a local disk, once per session: its run directory, exit status,
    what it printed and its wall time. One run serves tests/test_pipeline.py (the CLI's output and files) and
    tests/test_s3.py (the local run the same run on s3 must equal), saving two Ray Train fits; they only read it
    (or ``--resume`` it, which skips every stage)."""
    import contextlib
    import io
    import time

    from raysub.cli import main

    run_dir = tmp_path_factory.mktemp("quickstart") / "q"
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # what capsys would have read
        rc = main(["run", *QUICKSTART_SMALL, f"run_dir={run_dir}"])
    return {"run_dir": run_dir, "rc": rc, "out": out.getvalue(), "err": err.getvalue(),
            "wall_s": time.perf_counter() - t0}


# The sampled digits run several modules compare with: 3 SGD epochs, all sampled, a snapshot every 4 steps of batch 64.
SAMPLED = ["sgd.epochs=3", "sample.epochs=3", "sample.snapshot_every_steps=4", "basis.dim=5", "data.batch_size=64",
           "sgd.lr_milestones=[]", "train.epochs=1", "train.lr_milestones=[]"]


@pytest.fixture(scope="session")
def sampled_runs(ray_session, tmp_path_factory):
    """``SAMPLED`` on one rank and on 2 workers (the same global batch and data order), once per session: {1 or 2:
    run directory}. The one-rank run is Ray Train's local mode (cluster.num_workers=0: the loop in this process, no
    worker to start; tests/test_tracking.py samples on one Ray Train worker). The reference of
    tests/test_pipeline.py (2 workers match 1), tests/test_kills.py and tests/test_stream_pipeline.py (a killed or
    restarted run equals the 2-worker one bit for bit): one run each instead of one per module. Tests read them, add
    training labels, or copy them before changing anything else."""
    from raysub import pipeline
    from raysub.config import load_config

    root = tmp_path_factory.mktemp("sampled")
    out = {}
    for workers in (0, 2):
        cfg = load_config(None, SAMPLED + [f"cluster.num_workers={workers}", f"run_dir={root}/w{workers or 1}"])
        pipeline.stage_sample(cfg, say=lambda _line: None)
        out[workers or 1] = cfg.run_dir
    return out


@pytest.fixture(scope="session")
def sampled_basis(sampled_runs):
    """The 2-worker ``sampled_runs`` run with its 5-dim basis: P-SGD/L2O/P-BFGS parity (tests/test_pipeline.py),
    the killed runs' basis (tests/test_kills.py) and the sweep's dldr family (tests/test_sweep.py)."""
    from raysub import pipeline

    pipeline.stage_basis(sampled_runs[2], ["basis.dim=5"], say=lambda _line: None)
    return sampled_runs[2]


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def tier_of(item) -> str:
    """The one tier of a collected test: explicit ``system`` wins, then the shared Ray session, else ``unit``."""
    if item.get_closest_marker("system"):
        return "system"
    if "ray_session" in item.fixturenames or item.get_closest_marker("integration"):
        return "integration"
    return "unit"


def pytest_collection_modifyitems(config, items):
    skip_gpu = None if has_gpu() else pytest.mark.skip(reason="needs a CUDA GPU")
    timeouts = config.pluginmanager.hasplugin("timeout")  # pytest-timeout, from the `test` extra
    for item in items:
        tier = tier_of(item)
        if tier != "system":  # system is marked by hand already
            item.add_marker(getattr(pytest.mark, tier))
        if timeouts and not item.get_closest_marker("timeout"):
            long = item.get_closest_marker("slow") or item.get_closest_marker("gpu")
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S if long else TIMEOUT_S[tier]))
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --- the unit-tier guard ----------------------------------------------------------------------------------------
# Installed once for the session and armed only while a `unit` test runs (its fixtures' set-up and tear-down
# included, so a module fixture that starts a server is caught too). In the test's own thread it fails at once; a
# server started in a helper thread (moto's) is let run, so that nothing hangs waiting for it, and the test is
# failed when it ends.
_unit_test_running = False
_violations: list[str] = []


def _refuse(what: str) -> None:
    if not _unit_test_running:
        return
    message = (f"a unit test {what}: mark it integration (use ray_session) or system (pytestmark), "
               "see tests/conftest.py")
    _violations.append(message)
    if threading.current_thread() is threading.main_thread():
        # pytest.fail raises a BaseException: an `except Exception` in the code under test cannot swallow it
        pytest.fail(message)


def _guard(owner, name: str, what: str, allow=lambda *args: False) -> None:
    original = getattr(owner, name)

    def guarded(*args, **kwargs):
        if not allow(*args):
            _refuse(what)
        return original(*args, **kwargs)

    guarded.__wrapped__ = original
    setattr(owner, name, guarded)


# Commands that libraries run for a millisecond to probe the machine, no process a test starts: `git` (a new
# manifest records the code revision), `uname -p` (platform.processor(), on importing mlflow), `ldconfig -p`
# (ctypes.util.find_library).
PROBES = {"git", "uname", "ldconfig"}


def _is_probe(popen, args, *rest) -> bool:
    argv0 = args if isinstance(args, (str, bytes, os.PathLike)) else args[0]
    return os.path.basename(os.fsdecode(argv0)) in PROBES


def pytest_configure(config):
    import ray  # the guard wraps ray.init; every Ray call that starts a cluster (auto-init included) goes through it

    _guard(ray, "init", "started Ray")
    _guard(subprocess.Popen, "_execute_child", "started a subprocess", allow=_is_probe)  # every Popen, run, ...
    _guard(socket.socket, "listen", "started a server")  # any listening socket: HTTP, moto, a fake endpoint


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _unit_test_running
    _unit_test_running = item.get_closest_marker("unit") is not None
    _violations.clear()
    try:
        yield
    finally:
        _unit_test_running = False
        _violations.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _violations and report.passed:  # caught in another thread only: the test itself did not fail
        report.outcome = "failed"
        report.longrepr = _violations[0]
    _violations.clear()  # reported once, in the phase (set-up, call, tear-down) where it happened
