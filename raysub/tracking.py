"""Experiment tracking: live curves of every stage in TensorBoard, and in MLflow when asked, written by Ray's own
logger integrations — Ray Tune's ``TBXLoggerCallback`` and Ray's ``MLflowLoggerCallback``.

Where the curves go (``tensorboard --logdir RUN`` finds them all):

    RUN/tensorboard/sample, RUN/tensorboard/train-LABEL   the Ray Train stages, one point per epoch
    RUN/tensorboard/l2o                                    meta-training: per meta-step, and each meta-validation
    RUN/tune/PHASE/TRIAL/events.out.tfevents.*             sweep trials (Tune's own trial directories)
    RUN/tune/l2o/TRIAL/..., RUN/trials/TRIAL/tensorboard/l2o   `raysub l2o tune`: Tune's per-trial curves of the
                                                           meta-validations, and each trial's meta-training curves
                                                           (TensorBoard only: MLflow has the trial from Tune)
    RUN/mlruns                                             MLflow's file store, with ``tracking.mlflow=true`` and no
                                                           ``tracking.mlflow_tracking_uri``: one MLflow run per
                                                           stage (per trial in a sweep), in the experiment named by
                                                           ``tracking.mlflow_experiment`` (default: the run
                                                           directory's name)

Scalars carry the tags Ray gives every Tune result (``ray/tune/METRIC``; step = the epoch, the meta-step, or
Tune's ``training_iteration``); nested values are flattened (``stop_signal/reach_residual``); MLflow gets the same
metrics, and the stage's config as its params.

How each kind of stage reaches Ray's callbacks (Ray 2.60, Train V2):

- Ray Tune stages (`raysub.pipeline.sweep`, `raysub.l2o.tune`): Tune writes TensorBoard event files into every
  trial directory by default (its default loggers include ``TBXLoggerCallback``) and syncs them to the
  experiment's storage — under RUN/tune/, local or on object storage; `tune_callbacks` adds
  ``MLflowLoggerCallback`` to the experiment's ``RunConfig(callbacks=...)`` when asked. Those event files are
  Tune's, so ``tracking.tensorboard`` does not switch them off.
- Ray Train stages (`raysub.pipeline.sample`, `raysub.pipeline.train`): Train V2's ``RunConfig`` refuses Tune's
  logger callbacks — it takes only ``ray.train.UserCallback``s (ray-project/ray#49454). Ray's way out for users
  who rely on them, running the trainer as a single Tune trial, would put a Tune experiment (controller, trial
  actor, experiment directory, Tune's failure and restore handling) around every stage's own restart and
  ``--resume`` logic. Instead `TrainReportTracking` — a ``UserCallback``, Train V2's hook for reports, as Ray's
  own ``TuneReportCallback`` is — hands each report (rank 0's metrics, as ``TuneReportCallback`` does) to the same
  two Ray callbacks, which do all the writing: tags, flattening, which values are scalars, the MLflow run, its
  params and status. It runs in the Train controller, which Ray places on the driver's node.
- Meta-training (`raysub.l2o.train`) is a learner loop on the driver with optimizee actors, in no Train or Tune
  session: it drives a `Tracker` — the same two Ray callbacks — from that loop.

Object storage: Ray's TensorBoard logger writes local files. For a run directory on object storage a `Tracker`
writes them to a local staging directory and copies it to RUN/tensorboard/STAGE on the run's own filesystem
(`raysub.storage.RunDir.fs`) after every result, so the curves stay live there too (tensorboardX writes from a
background thread: a copy holds the points up to about the previous result, the last one holds them all).
MLflow's file store is local only: with such a run directory MLflow needs ``tracking.mlflow_tracking_uri`` (a
server, or a local path).
MLflow ≥ 3.7 refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE=true`` (it steers new users to a database):
raysub's MLflow logger, aimed at one, sets it in the process that opens the store, unless the environment already
says.

Outages: every command probes a configured tracking server before anything starts (`tracking_probe_problems`: an
HTTP GET of its ``/health`` within 3 s; a local store must be writable) and refuses one it cannot reach. During a
run, MLflow's calls are bounded (`MLFLOW_HTTP_ENV`: MLflow's own defaults, a 120 s timeout and 7 retries with
backoff, stalled a stage for minutes), and the first failure of one makes raysub's MLflow logger warn once and do
nothing more, in a Tune experiment as in a `Tracker`, and the command's later stages skip that server: training
waits on MLflow ~10 s at most, once.
A Train stage's logger runs in the Train controller, whose output a quiet local run keeps off the console: its
warning travels to the driver on the stage's progress queue (`raysub.engine.cluster.torch_trainer`).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import posixpath
import shutil
import socket
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, List, Optional

import pyarrow.fs as pafs

from raysub import credentials

TB_DIR = "tensorboard"  # RUN/tensorboard/STAGE
MLFLOW_DIR = "mlruns"  # RUN/mlruns: the default MLflow file store
INSTALL = "pip install 'raysub[tracking]'"
PROBE_TIMEOUT_S = 3.0  # the tracking server's probe before anything starts
# MLflow's HTTP client reads these at every call (mlflow.environment_variables); one immediate second try rides out
# a dropped connection, and a server that is down or hangs costs a stage ~10 s at most, once, instead of minutes per
# call (its defaults: 120 s timeouts, 7 retries with exponential backoff, and a 503's Retry-After obeyed)
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "3", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                   "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false"}
WARNING_KEY = "raysub_warning"  # a progress-queue item that is a warning line, not an epoch's progress
_DOWN = set()  # MLflow tracking URIs that failed in this command: its later stages do not try them again


# ---------------------------------------------------------------------------------------------------------
# checks (called by raysub.config.schema_problems, so every command checks them before Ray starts)

def _remote(run_dir: str) -> bool:
    return "://" in run_dir and not run_dir.startswith("file://")


def tracking_problems(cfg) -> List[str]:
    """Problems of the ``tracking`` section (one line each); empty: fine."""
    t = cfg.tracking
    problems: List[str] = []
    if t.mlflow and importlib.util.find_spec("mlflow") is None:
        problems.append(f"tracking.mlflow=true needs MLflow, which is not installed: {INSTALL} (or set "
                        f"tracking.mlflow=false)")
    if t.mlflow and t.mlflow_tracking_uri is None and _remote(cfg.run_dir):
        problems.append(f"tracking.mlflow=true with run_dir on object storage: MLflow's default file store "
                        f"({MLFLOW_DIR}/ in the run directory) must be local; set tracking.mlflow_tracking_uri (an "
                        f"MLflow server such as http://HOST:5000, or a local path)")
    if t.mlflow_experiment is not None and not t.mlflow_experiment.strip():
        problems.append("tracking.mlflow_experiment is empty: give a name, or leave it unset for the run "
                        "directory's name")
    return problems


def tracking_probe_problems(cfg, timeout: float = PROBE_TIMEOUT_S) -> List[str]:
    """Whether ``tracking.mlflow_tracking_uri`` can be used, checked before anything starts (one line; empty: fine).

    An ``http(s)://`` server must answer a GET of its ``/health`` within ``timeout`` seconds (any HTTP status counts:
    it is there); a local path or ``file:`` URI must be a writable directory, or creatable. Nothing is written.
    Other stores (``sqlite:``, ``databricks``) are left to MLflow. The default store, RUN/mlruns, is the run
    directory's, which the run lock checks.
    """
    from raysub.storage import redact

    t = cfg.tracking
    if not t.mlflow or t.mlflow_tracking_uri is None:
        return []
    uri = t.mlflow_tracking_uri
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("http", "https"):
        why = _unreachable(parts, timeout)
        return [f"tracking.mlflow_tracking_uri={redact(uri)} cannot be reached ({why}): start the server, fix the "
                f"URI, or set tracking.mlflow=false"] if why else []
    if parts.scheme in ("", "file") and not uri.startswith("databricks"):
        path = urllib.parse.unquote(parts.path) if parts.scheme else os.path.expanduser(uri)
        why = _unwritable(os.path.abspath(path))
        return [f"tracking.mlflow_tracking_uri={uri} is not a writable directory ({why}): choose a writable path, "
                f"or set tracking.mlflow=false"] if why else []
    return []


def _unreachable(parts: urllib.parse.SplitResult, timeout: float) -> Optional[str]:
    """Why the server at ``parts`` does not answer within ``timeout`` seconds, or None when it answers."""
    if not parts.hostname:
        return "no host in it"
    try:
        port = parts.port
    except ValueError:
        return "its port is not a number"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    # credentials stay out of the probe: /health needs none, and any answer, a 401 too, says the server is there
    url = urllib.parse.urlunsplit((parts.scheme, host + (f":{port}" if port else ""),
                                   parts.path.rstrip("/") + "/health", "", ""))
    box: Dict[str, Any] = {}

    def get():
        try:
            with urllib.request.urlopen(url, timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass
        except Exception as exc:
            box["error"] = getattr(exc, "reason", exc) if isinstance(exc, urllib.error.URLError) else exc
        box["done"] = True

    # a thread bounds the whole probe, name resolution included (urlopen's timeout covers each socket operation)
    thread = threading.Thread(target=get, name="raysub-mlflow-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    err = box.get("error")
    if "done" not in box or isinstance(err, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout:g} s"
    if err is None:
        return None
    if isinstance(err, ConnectionRefusedError):
        return f"connection refused within {timeout:g} s"
    if isinstance(err, socket.gaierror):
        return f"unknown host {parts.hostname}"
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def _unwritable(path: str) -> Optional[str]:
    """Why MLflow could not keep a file store at ``path`` (a directory, made when missing), or None."""
    probe = path
    while not os.path.exists(probe):  # the first existing ancestor is where the store's directories get made
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


# ---------------------------------------------------------------------------------------------------------
# MLflow settings

def _file_uri(path: str) -> str:
    """A local path as a ``file://`` URI (absolute: resolved where the config is read, not in the Train
    controller); a URI (``http://``, ``file://``, ``sqlite:///``, ``databricks``) as it is."""
    if "://" in path or path.startswith("databricks"):
        return path
    return "file://" + os.path.abspath(os.path.expanduser(path))


def _mlflow_uri(settings: Dict[str, Any], run) -> str:
    """The tracking URI: the configured one, else the file store RUN/mlruns (a local run directory's)."""
    if settings["mlflow_tracking_uri"] is not None:
        return settings["mlflow_tracking_uri"]
    assert isinstance(run.fs, pafs.LocalFileSystem)  # tracking_problems refuses the rest
    return _file_uri(run.path(MLFLOW_DIR))


def _experiment(settings: Dict[str, Any], run) -> str:
    return settings["mlflow_experiment"] or posixpath.basename(run.root.rstrip("/")) or "raysub"


@functools.lru_cache(maxsize=None)
def _mlflow_logger_class():
    """Ray's ``MLflowLoggerCallback``, opening a file store in any process (built on first use: importing Ray's
    integrations takes seconds, and this module is imported by every config check)."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class MLflowLogger(MLflowLoggerCallback):
        """``MLflowLoggerCallback`` that survives an MLflow outage, in the process that talks to MLflow — the Train
        controller, the driver, a restored Tune experiment's:

        - aimed at a file store, it sets ``MLFLOW_ALLOW_FILE_STORE=true`` unless the environment says otherwise
          (MLflow ≥ 3.7 refuses a file store without it);
        - MLflow's HTTP calls are bounded (`MLFLOW_HTTP_ENV`, unless the environment sets them);
        - the first call that fails warns once (``warn``, a callable taking the line and the URI; stderr by
          default) and every later call does nothing: the stage it watches goes on, and never waits on MLflow again;
          the command's later stages skip that server (`mlflow_down`).
        """

        warn: Optional[Callable[[str], None]] = None
        stage = "this stage"
        _failed = False

        def setup(self, *args, **kwargs):
            if str(self.tracking_uri).startswith("file:"):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            for key, value in MLFLOW_HTTP_ENV.items():
                os.environ.setdefault(key, value)
            self._guard(super().setup, *args, **kwargs)

        def log_trial_start(self, trial):
            self._guard(super().log_trial_start, trial)

        def log_trial_result(self, iteration, trial, result):
            self._guard(super().log_trial_result, iteration, trial, result)

        def log_trial_end(self, trial, failed=False):
            self._guard(super().log_trial_end, trial, failed=failed)

        def _guard(self, call, *args, **kwargs):
            if self._failed:
                return
            try:
                call(*args, **kwargs)
            except Exception as exc:
                self._failed = True
                _DOWN.add(str(self.tracking_uri))
                from raysub.storage import redact

                first = (str(exc).strip().splitlines() or [""])[0][:200]
                (self.warn or _stderr)(f"raysub: warning: tracking: MLflow at {redact(str(self.tracking_uri))} "
                                       f"failed during {self.stage} ({type(exc).__name__}: {first}); MLflow tracking "
                                       f"stops for this run, training goes on", str(self.tracking_uri))

    return MLflowLogger


def _stderr(line: str, down: Optional[str] = None) -> None:
    print(line, file=sys.stderr, flush=True)


def show_warning(item: Any) -> bool:
    """Print ``item`` on stderr if it is a warning a `Tracker` sent from the Train controller (and note the MLflow
    server it gave up on, for the command's later stages); whether it was one."""
    if not (isinstance(item, dict) and WARNING_KEY in item):
        return False
    if item.get("mlflow_down"):
        _DOWN.add(item["mlflow_down"])
    _stderr(item[WARNING_KEY])
    return True


def mlflow_down(settings: Dict[str, Any], run) -> bool:
    """Whether MLflow is asked for and its server already failed in this command (warned about then)."""
    return bool(settings["mlflow"]) and _mlflow_uri(settings, run) in _DOWN


def _mlflow_callback(settings: Dict[str, Any], run, stage: str, warn: Optional[Callable[[str], None]] = None):
    """Ray's MLflow logger for ``stage`` of ``run`` (every MLflow run tagged with both); ``warn`` takes its one
    warning line should MLflow fail (stderr by default)."""
    logger = _mlflow_logger_class()(tracking_uri=_mlflow_uri(settings, run),
                                    experiment_name=_experiment(settings, run),
                                    tags={"raysub.run_dir": run.uri, "raysub.stage": stage})
    logger.stage, logger.warn = stage, warn
    return logger


def _settings(cfg) -> Dict[str, Any]:
    t = cfg.tracking
    uri = None if t.mlflow_tracking_uri is None else _file_uri(t.mlflow_tracking_uri)
    return {"tensorboard": t.tensorboard, "mlflow": t.mlflow, "mlflow_tracking_uri": uri,
            "mlflow_experiment": t.mlflow_experiment}


def tune_callbacks(cfg, run, stage: str) -> List[Any]:
    """Callbacks for a Ray Tune experiment's ``RunConfig(callbacks=...)``: Ray's ``MLflowLoggerCallback`` with
    ``tracking.mlflow`` (one MLflow run per trial), else none. TensorBoard needs nothing: Tune's default loggers
    write every trial's event files."""
    settings = _settings(cfg)
    return [_mlflow_callback(settings, run, stage)] if cfg.tracking.mlflow and not mlflow_down(settings, run) else []


# ---------------------------------------------------------------------------------------------------------
# a stage run outside Tune

class _Trial:
    """What Ray's logger callbacks read of a Tune trial: its name (``str``), ``config`` (MLflow's params),
    ``local_path`` and ``init_local_path`` (the TensorBoard directory) and ``evaluated_params`` (the swept
    hyperparameters of TensorBoard's hparams table: none here)."""

    evaluated_params: Dict[str, Any] = {}

    def __init__(self, name: str, config: Dict[str, Any], local_path: str):
        self.name, self.config, self.local_path = name, config, local_path

    def init_local_path(self) -> None:
        os.makedirs(self.local_path, exist_ok=True)

    def __str__(self) -> str:
        return self.name


class Tracker:
    """Ray's ``TBXLoggerCallback`` and ``MLflowLoggerCallback`` for one stage run outside a Tune experiment.

    It holds plain data until the first `log`, so it can travel to the process that logs (the Train controller);
    Ray's callbacks are built there.

    Args:
        cfg: The run's config (its ``tracking`` section; its dict is MLflow's params).
        run: The run directory (`raysub.storage.RunDir`).
        stage: The stage's name: RUN/tensorboard/STAGE, and the MLflow run's name.
    """

    def __init__(self, cfg, run, stage: str):
        self.settings = _settings(cfg)
        # MLflow's params: no credential of a URI written into the config (a weights path, a basis run)
        self.run, self.stage, self.config = run, stage, credentials.strip_values(cfg.to_dict())
        if mlflow_down(self.settings, run):
            self.settings["mlflow"] = False
        self._callbacks: Optional[List[Any]] = None
        self._trial: Optional[_Trial] = None
        self._staging: Optional[str] = None
        self.warnings = None  # a queue that carries warning lines to the driver (set by torch_trainer), else stderr

    @property
    def enabled(self) -> bool:
        return bool(self.settings["tensorboard"] or self.settings["mlflow"])

    def __getstate__(self):
        assert self._callbacks is None, "a Tracker travels before it logs"
        return self.__dict__

    def _start(self) -> None:
        from ray.tune.logger import TBXLoggerCallback

        local = self.run.path(TB_DIR, self.stage)
        if self.settings["tensorboard"] and not isinstance(self.run.fs, pafs.LocalFileSystem):
            # Ray's logger writes local files: staged here, copied to the run's filesystem after every result
            self._staging = tempfile.mkdtemp(prefix="raysub-tensorboard-")
            local = self._staging
            self.run.makedirs(TB_DIR, self.stage)  # a filesystem with real directories needs it
        callbacks = []
        if self.settings["tensorboard"]:
            callbacks.append(TBXLoggerCallback())
        if self.settings["mlflow"]:
            mlflow = _mlflow_callback(self.settings, self.run, self.stage, warn=self.warn)
            mlflow.setup()
            callbacks.append(mlflow)
        self._trial = _Trial(self.stage, self.config, local)
        for cb in callbacks:
            cb.log_trial_start(self._trial)
        self._callbacks = callbacks

    def log(self, result: Dict[str, Any], step: int) -> None:
        """Log ``result``'s scalars (nested dicts flattened) at ``step``. Lists and tuples — a run's whole history or
        step losses, attached to its last report — are left out: they are records, not points of a curve."""
        from ray.air.constants import TRAINING_ITERATION

        if not self.enabled:
            return
        try:
            if self._callbacks is None:
                self._start()
            point = {k: v for k, v in result.items() if not isinstance(v, (list, tuple))}
            point[TRAINING_ITERATION] = step
            for cb in self._callbacks:
                cb.log_trial_result(step, self._trial, point)
            self._sync()
        except Exception as exc:  # a tracking outage (MLflow server, storage) must not fail the stage it watches
            self._give_up(exc)

    def end(self, failed: bool = False) -> None:
        """Close the event file and end the MLflow run (FINISHED, or FAILED); nothing if nothing was logged."""
        if self._callbacks is None:
            return
        try:
            for cb in self._callbacks:
                cb.log_trial_end(self._trial, failed=failed)
            self._sync()
        except Exception as exc:
            self._give_up(exc)
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        self._callbacks = None

    def warn(self, line: str, mlflow_down: Optional[str] = None) -> None:
        """Print a warning line where the user sees it: on the driver's stderr, through ``warnings`` (a
        ``ray.util.queue.Queue`` the driver relays: `raysub.engine.cluster.fit_with_progress`) when set, with the
        MLflow server it gave up on (``mlflow_down``), if any."""
        if self.warnings is not None:
            try:
                self.warnings.put({WARNING_KEY: line, "mlflow_down": mlflow_down}, timeout=5)
                return
            except Exception:  # the queue's actor is gone: stderr (Ray's logs) is all there is
                pass
        _stderr(line)

    def _give_up(self, exc: BaseException) -> None:
        """Tracking stops for the rest of the stage, with one warning; the stage itself goes on."""
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        self.warn(f"raysub: warning: experiment tracking of {self.stage} stopped ({type(exc).__name__}: {first}); the "
                  f"stage continues and its results are still recorded in the run directory")
        self.settings = {**self.settings, "tensorboard": False, "mlflow": False}  # `enabled` is now False
        self._callbacks = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _sync(self) -> None:
        if self._staging is not None:
            pafs.copy_files(self._staging, self.run.path(TB_DIR, self.stage), destination_filesystem=self.run.fs)


@functools.lru_cache(maxsize=None)
def _train_report_tracking():
    """The ``UserCallback`` class, built on first use (importing ``ray.train`` takes seconds)."""
    from ray.train import UserCallback

    class TrainReportTracking(UserCallback):
        """Hands every Ray Train report to a `Tracker`, in the Train controller: rank 0's metrics (every rank
        reports the same all-reduced values), at step ``epoch``.

        The stage's loops attach the run's history to their last report only (`raysub.pipeline.sample`,
        `raysub.pipeline.train`), and a diverged run's last report carries ``diverged``: either ends the tracked
        run (FAILED when diverged). A worker failure that Ray Train will not retry (past
        ``cluster.max_failures``) ends it FAILED.
        """

        def __init__(self, tracker: Tracker, max_failures: int):
            self.tracker, self.max_failures, self.failures = tracker, max_failures, 0

        def relay_warnings(self, queue) -> None:
            """Send the tracker's warnings to the driver on ``queue`` (the stage's progress queue)."""
            self.tracker.warnings = queue

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            diverged = m.get("diverged")
            self.tracker.log(m, m["epoch"] if "epoch" in m else diverged["epoch"])
            if "history" in m or diverged:
                self.tracker.end(failed=bool(diverged))

        def after_exception(self, run_context, worker_exceptions):
            self.failures += 1
            if 0 <= self.max_failures < self.failures:
                self.tracker.end(failed=True)

    return TrainReportTracking


def train_callbacks(cfg, run, stage: str) -> List[Any]:
    """Callbacks for a Ray Train stage's ``RunConfig(callbacks=...)``: the `Tracker` of ``stage`` behind a
    ``UserCallback``, or none when tracking is off."""
    tracker = Tracker(cfg, run, stage)
    if not tracker.enabled:
        return []
    return [_train_report_tracking()(tracker, cfg.cluster.max_failures)]
