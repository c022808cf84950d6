"""Outages around a run: an MLflow tracking server that is down, hangs, or dies mid-run; Ray Train controller and
Tune failures whose cause must reach the one-line error; what a kill -9 of the driver leaves of its local cluster.

Loopback servers only: a closed port (connection refused), a listening socket that never answers, and a small fake
of MLflow's REST API that can be switched to "dead" (closed) or "hung" (reads the request, never answers).
"""
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import raysub
from raysub import cli
from raysub.config import load_config
from raysub.errors import ConfigError
from raysub.storage import RunDir
from helpers import tree as tree_digest

CODE = os.path.dirname(os.path.dirname(os.path.abspath(raysub.__file__)))  # the raysub under test, for subprocesses


@pytest.fixture
def closed_port():
    """A loopback port nobody listens on: a connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def mlflow_env(monkeypatch):
    """MLflow's HTTP settings unset for the test, and restored after it (raysub sets them with setdefault)."""
    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER"):
        monkeypatch.setenv(key, "")  # recorded, so whatever the test sets is undone
        monkeypatch.delenv(key)
    import raysub.tracking

    down = getattr(raysub.tracking, "_DOWN", set())  # the servers this process gave up on: none before, none after
    down.clear()
    yield
    down.clear()
    import mlflow

    mlflow.set_tracking_uri(None)  # Ray's MLflow logger set the process-wide URI to a server now gone


class FakeMLflow:
    """The part of MLflow's REST API that Ray's MLflow logger uses, on loopback. ``mode``: "ok", "hang" (the
    request is read, no answer ever comes), or dead after `stop` (connections refused)."""

    def __init__(self):
        self.calls, self.mode, self.release = [], "ok", threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                fake.calls.append(path)
                if fake.mode == "hang":
                    fake.release.wait(120)
                    return
                info = {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1", "status": "RUNNING", "start_time": 1,
                        "lifecycle_stage": "active", "run_name": "s", "artifact_uri": "/nonexistent"}
                if path.endswith("experiments/get-by-name"):
                    out = {"experiment": {"experiment_id": "1", "name": "e", "lifecycle_stage": "active"}}
                elif path.endswith(("runs/create", "runs/get")):
                    out = {"run": {"info": info, "data": {}}}
                elif path.endswith("runs/update"):
                    out = {"run_info": info}
                else:
                    out = {}
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_mlflow():
    server = FakeMLflow()
    yield server
    server.release.set()
    if server.mode != "dead":
        server.stop()


def timed(call, limit: float):
    """Run ``call`` in a thread; its seconds, or pytest.fail past ``limit`` (the call may hang for minutes)."""
    box = {}

    def run():
        t0 = time.perf_counter()
        call()
        box["s"] = time.perf_counter() - t0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    if "s" not in box:
        pytest.fail(f"still running after {limit:g} s")
    return box["s"]


# -- the probe before anything starts ------------------------------------------------------------------------

@pytest.mark.parametrize("server", ["refused", "silent"])
@pytest.mark.system  # a loopback server of its own
def test_unreachable_tracking_server_is_refused_in_one_line_before_anything_starts(
        tmp_path, capsys, monkeypatch, closed_port, silent_port, server):
    """``raysub run`` with a tracking server that refuses connections, or accepts and never answers: exit 2 within
    seconds, one line naming the URI, the reason and the fixes; Ray never starts, nothing is written. Mistakes
    caught: no probe (the old code started the run and stalled minutes in MLflow's retries), a probe without a
    timeout (hangs on the silent server), a probe after the run directory is created."""
    import raysub.engine.cluster as cluster

    monkeypatch.setattr(cluster, "ensure_ray", lambda *a, **k: pytest.fail("Ray started"))
    port = closed_port if server == "refused" else silent_port
    uri = f"http://127.0.0.1:{port}"
    before = tree_digest(tmp_path)
    t0 = time.perf_counter()
    code = cli.main(["run", "tracking.mlflow=true", f"tracking.mlflow_tracking_uri={uri}", f"run_dir={tmp_path}/r"])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    why = "connection refused within 3 s" if server == "refused" else "no answer within 3 s"
    assert err == (f"raysub: error: tracking.mlflow_tracking_uri={uri} cannot be reached ({why}): start the server, "
                   f"fix the URI, or set tracking.mlflow=false\n")
    assert elapsed < 10
    assert tree_digest(tmp_path) == before and not (tmp_path / "r").exists()


@pytest.mark.system  # a loopback server of its own
def test_probe_passes_a_server_that_answers_and_checks_a_local_store(tmp_path, fake_mlflow):
    """A server that answers (any status) passes; a file-store path under a regular file is refused, a missing
    directory that can be made passes, and nothing is created. Mistakes caught: a probe that refuses a live
    server (its /health answer, or a 404 from a proxy path), a probe that writes into the store."""
    from raysub.tracking import tracking_probe_problems

    def problems(uri):
        return tracking_probe_problems(load_config(None, ["tracking.mlflow=true",
                                                          f"tracking.mlflow_tracking_uri={uri}"]))

    assert problems(fake_mlflow.uri) == [] and problems(fake_mlflow.uri + "/some/prefix/") == []
    assert fake_mlflow.calls == ["/health", "/some/prefix/health"]
    (tmp_path / "afile").write_text("")
    (line,) = problems(f"{tmp_path}/afile/mlruns")
    assert line.startswith(f"tracking.mlflow_tracking_uri={tmp_path}/afile/mlruns is not a writable directory")
    assert problems(f"file://{tmp_path}/new/mlruns") == [] and problems(f"{tmp_path}/new/mlruns") == []
    assert sorted(os.listdir(tmp_path)) == ["afile"]
    assert tracking_probe_problems(load_config(None, ["tracking.mlflow_tracking_uri=http://127.0.0.1:9"])) == []


# -- an outage mid-run ----------------------------------------------------------------------------------------

def _tracker(uri, tmp_path):
    from raysub.tracking import Tracker

    cfg = load_config(None, ["tracking.mlflow=true", "tracking.tensorboard=false",
                             f"tracking.mlflow_tracking_uri={uri}", f"run_dir={tmp_path}/r"])
    return Tracker(cfg, RunDir(f"{tmp_path}/r"), "sample")


@pytest.mark.parametrize("outage", ["dead", "hang"])
@pytest.mark.system  # a loopback server of its own
def test_an_mlflow_outage_mid_stage_warns_once_and_later_calls_return_at_once(
        tmp_path, capsys, mlflow_env, fake_mlflow, outage):
    """The server logs epoch 1, then dies (connections refused) or hangs (never answers): the next epoch's log
    returns within seconds with one warning naming the server; later logs, the end, and the run's next stage return
    at once. Mistakes caught: MLflow's default timeouts and retries (minutes per call: the old code's 273 s), a
    warning per epoch or per stage, retrying the dead server at every epoch or stage, an exception into the stage."""
    tracker = _tracker(fake_mlflow.uri, tmp_path)
    timed(lambda: tracker.log({"loss": 1.0}, step=1), 60)
    assert any(c.endswith("log-metric") or c.endswith("log-batch") for c in fake_mlflow.calls)
    if outage == "dead":
        fake_mlflow.stop()
    fake_mlflow.mode = outage
    assert timed(lambda: tracker.log({"loss": 0.5}, step=2), 25) < 20
    calls = len(fake_mlflow.calls)
    assert timed(lambda: tracker.log({"loss": 0.25}, step=3), 5) < 0.5
    assert timed(lambda: tracker.end(), 5) < 0.5
    next_stage = _tracker(fake_mlflow.uri, tmp_path)
    assert timed(lambda: (next_stage.log({"loss": 0.1}, step=1), next_stage.end()), 5) < 0.5
    assert len(fake_mlflow.calls) == calls  # nothing more was sent
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"raysub: warning: tracking: MLflow at {fake_mlflow.uri} failed during sample (")
    assert err[0].endswith("MLflow tracking stops for this run, training goes on")


@pytest.mark.system  # a loopback server of its own
def test_a_sweeps_mlflow_callback_survives_an_outage(tmp_path, capsys, mlflow_env, fake_mlflow):
    """The MLflow logger Ray Tune runs in the driver for a sweep: the server dies after a trial started, the next
    result returns within seconds with one warning, the rest at once. Mistake caught: the outage guard only in
    raysub's `Tracker`, so Tune's callback raises (the sweep fails) or stalls on every result."""
    from raysub.tracking import _Trial, tune_callbacks

    cfg = load_config(None, ["tracking.mlflow=true", f"tracking.mlflow_tracking_uri={fake_mlflow.uri}",
                             f"run_dir={tmp_path}/sw"])
    (cb,) = tune_callbacks(cfg, RunDir(f"{tmp_path}/sw"), "sweep/coarse")
    trial = _Trial("trial_1", {"lr": 0.1}, str(tmp_path / "t"))
    timed(lambda: (cb.setup(), cb.log_trial_start(trial)), 60)
    fake_mlflow.stop()
    fake_mlflow.mode = "dead"
    assert timed(lambda: cb.log_trial_result(1, trial, {"loss": 1.0, "training_iteration": 1}), 25) < 20
    assert timed(lambda: (cb.log_trial_result(2, trial, {"loss": 0.5, "training_iteration": 2}),
                          cb.log_trial_end(trial)), 5) < 0.5
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"MLflow at {fake_mlflow.uri} failed during sweep/coarse (" in err[0]


def test_a_train_stage_warning_reaches_the_driver_through_the_progress_queue(capsys, mlflow_env):
    """A Train stage's tracker runs in the Train controller, whose output a quiet local cluster keeps off the
    console: its warning travels on the progress queue and the driver prints it on stderr, not as a progress line.
    Mistakes caught: a warning printed only into Ray's logs (the old code), a warning fed to the progress printer."""
    import queue

    from raysub.engine.cluster import fit_with_progress
    from raysub.tracking import _train_report_tracking

    class Q:  # ray.util.queue.Queue's interface, in-process
        def __init__(self):
            self.q = queue.Queue()

        def put(self, item, timeout=None):
            self.q.put(item)

        def get(self, block=True, timeout=None):
            return self.q.get(block, timeout)

        def get_nowait(self):
            return self.q.get_nowait()

    progress = Q()
    uri = "http://127.0.0.1:9"
    tracker = _tracker(uri, "/nonexistent")
    callback = _train_report_tracking()(tracker, 0)
    callback.relay_warnings(progress)

    class Trainer:
        def fit(self):
            progress.put({"epoch": 1})
            tracker.warn("raysub: warning: tracking: MLflow at X failed", uri)
            return "result"

    printed = []
    assert fit_with_progress(Trainer(), progress, printed.append) == "result"
    assert printed == [{"epoch": 1}]
    assert capsys.readouterr().err == "raysub: warning: tracking: MLflow at X failed\n"
    assert not _tracker(uri, "/nonexistent").settings["mlflow"]  # the next stage leaves that server alone


# -- Ray controller and Tune failures: the cause in the one line -------------------------------------------------

TIMEOUT = ("When uploading part for key 'run/checkpoints/sample/checkpoint_manager_snapshot.json': AWS Error "
           "NETWORK_CONNECTION during UploadPart operation: curlCode: 28, Timeout was reached")


def _controller_error(cause):
    """A Ray Train ControllerError as the driver receives it: pickled by the controller (its __cause__ is lost)."""
    from ray.train.v2.api.exceptions import ControllerError

    return pickle.loads(pickle.dumps(ControllerError(cause)))


def test_a_controller_storage_failure_names_the_storage_error(tmp_path, capsys, monkeypatch):
    """The Train controller's checkpoint upload times out: the line names the storage error itself and the resume
    command, not "ControllerError: Training failed due to controller error:". Mistake caught: following only a
    task's ``cause``, worker failures and ``__cause__`` (the old code), not ``controller_failure``."""
    from raysub import pipeline

    def fail(*a, **k):
        raise _controller_error(OSError(TIMEOUT))

    monkeypatch.setattr(pipeline, "run_pipeline", fail)
    assert cli.main(["run", f"run_dir={tmp_path}/r"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "ControllerError" not in err[0]
    assert err[0].startswith("raysub: error: a storage operation of the Ray Train controller failed")
    assert "(OSError: When uploading part for key" in err[0] and "Timeout was reached" in err[0]


def test_a_config_error_in_the_controller_is_a_bad_input(tmp_path, capsys, monkeypatch):
    """A ConfigError raised in the Train controller (a callback's) is exit 2 with its own line. Mistake caught:
    `unwrap_train_error` not looking inside a ControllerError (exit 1, "the command failed")."""
    from raysub import pipeline

    def fail(*a, **k):
        raise _controller_error(ConfigError("tracking.mlflow_experiment is deleted in MLflow: restore it"))

    monkeypatch.setattr(pipeline, "run_pipeline", fail)
    assert cli.main(["run", f"run_dir={tmp_path}/r"]) == 2
    assert capsys.readouterr().err == "raysub: error: tracking.mlflow_experiment is deleted in MLflow: restore it\n"


def test_ray_failures_are_classified_by_type():
    """Each kind of Ray failure by its exception type, the innermost cause named. Mistakes caught: classifying by
    class-name substrings (a user error class named like Ray's was called a Ray failure; ActorUnavailableError and
    Tune's errors were missed), a TuneError whose text is a traceback named instead of the error behind it."""
    import ray.exceptions as rex
    from ray.tune.error import TuneError
    from ray.train.v2.api.exceptions import WorkerGroupError

    class ActorDiedSomewhere(Exception):  # a user's error, not Ray's
        pass

    try:
        try:
            raise OSError("s3 timed out")
        except OSError:
            raise TuneError(traceback.format_exc())
    except TuneError as exc:
        tune_error = exc
    cases = [
        (_controller_error(RuntimeError("controller broke")), "the Ray Train controller failed (RuntimeError: "
                                                               "controller broke)"),
        (WorkerGroupError("rank 0", {0: ValueError("bad shard")}), "a Ray Train worker failed (ValueError: bad shard)"),
        (tune_error, "a storage operation of the Ray Tune experiment failed (OSError: s3 timed out)"),
        (rex.ActorUnavailableError("actor unreachable", None), "a Ray actor died (ActorUnavailableError: The actor "
                                                               "None is unavailable: actor unreachable. The task may "
                                                               "or may not have been executed on the actor.)"),
        (rex.GetTimeoutError("get timed out"), "the Ray cluster failed (GetTimeoutError: get timed out)"),
        (ActorDiedSomewhere("mine"), "the command failed (ActorDiedSomewhere: mine)"),
    ]
    for exc, line in cases:
        assert cli.describe_failure(exc) == line


# -- a kill -9 of the driver -------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
@pytest.mark.system  # real processes, killed
def test_reaper_kills_what_the_node_leaves_once_the_driver_is_gone():
    """A fake node: a root process (the raylet) with a child in a session of its own (an agent, which outlives
    the root); the driver and the root are killed together (Ray's fate-sharing). The reaper kills the agent within
    seconds, and leaves alone a process it never saw under the root. Mistakes caught: no reaper, a reaper that kills
    only the roots (the agent was reparented away), one that kills by name or process group."""
    from raysub.engine.reaper import _reap, _started

    py = sys.executable
    driver = subprocess.Popen([py, "-c", "import time; time.sleep(60)"])
    root = subprocess.Popen([py, "-c", "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
                                       "'import time; time.sleep(60)'], start_new_session=True); print(p.pid, "
                                       "flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen([py, "-c", "import time; time.sleep(60)"])
    agent = None
    try:
        agent = int(root.stdout.readline())
        args = [f"{p.pid}:{_started(p.pid)}" for p in (driver, root)]
        reaper = threading.Thread(target=_reap, args=(args, 0.1), daemon=True)
        reaper.start()
        time.sleep(0.5)  # it has seen the tree
        for p in (root, driver):
            p.kill()
            p.wait()
        reaper.join(5)
        assert not reaper.is_alive()
        deadline = time.time() + 3
        while _alive(agent) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(agent) and bystander.poll() is None
    finally:
        for p in (driver, root, bystander):
            p.kill()
            p.wait()
        if agent is not None and _alive(agent):
            os.kill(agent, signal.SIGKILL)


DRIVER = """
import sys, time
from raysub.config import load_config
from raysub.engine.cluster import ensure_ray
ensure_ray(load_config(None, ["cluster.num_cpus=3"]))
print("up", flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
@pytest.mark.system  # real processes, killed
def test_kill9_of_the_driver_leaves_no_ray_process_behind(tmp_path):
    """A driver that started its local Ray cluster is killed with SIGKILL: within 10 s no process of that cluster
    is left. Mistake caught: the old code left the dashboard and runtime-env agents alive ~60 s (they wait on the
    dead GCS), and with them whatever else is not fate-shared with the driver."""
    env = {**os.environ, "PYTHONPATH": CODE}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)

    def session():  # the driver's session: every Ray process it started, reparented or not
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != proc.pid:
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[3]) == proc.pid and fields[0] != "Z":
                    out.append(int(entry))
        return out

    left = []
    try:
        assert proc.stdout.readline().strip() == "up"
        assert session()  # the cluster's processes are in the driver's session
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline:
            left = session()
            if not left:
                break
            time.sleep(0.5)
        names = []
        for pid in left:
            try:
                with open(f"/proc/{pid}/cmdline") as f:
                    names.append(f.read().replace("\0", " ")[:80])
            except OSError:
                pass
        assert not left, f"still running 10 s after the kill: {names}"
    finally:
        for pid in session():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
