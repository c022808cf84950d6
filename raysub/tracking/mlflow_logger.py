"""MLflow through Ray's ``MLflowLoggerCallback``: where the store is, a logger that survives an MLflow outage (warns
once, then does nothing; the command's later stages skip that server), and the callbacks of a Tune experiment.
"""
from __future__ import annotations

import functools
import os
import posixpath
import sys
from typing import Any, Callable, Dict, List, Optional

import pyarrow.fs as pafs

from raysub.storage import redact
from raysub.tracking.checks import MLFLOW_DIR

# MLflow's HTTP client reads these at every call (mlflow.environment_variables); one immediate second try rides out
# a dropped connection, and a server that is down or hangs costs a stage ~10 s at most, once, instead of minutes per
# call (its defaults: 120 s timeouts, 7 retries with exponential backoff, and a 503's Retry-After obeyed)
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "3", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                   "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false"}
WARNING_KEY = "raysub_warning"  # a progress-queue item that is a warning line, not an epoch's progress
_DOWN = set()  # MLflow tracking URIs that failed in this command: its later stages do not try them again

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
    integrations takes seconds, and this package is imported by every command's checks)."""
    # heavy: ray loads here, not when this module is imported
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

