"""A stage run outside a Tune experiment: `Tracker` drives Ray's TensorBoard and MLflow logger callbacks itself
(meta-training's loop), and `train_callbacks` puts one behind a Ray Train ``UserCallback`` (the Train stages).
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import pyarrow.fs as pafs

from raysub import credentials
from raysub.tracking.mlflow_logger import WARNING_KEY, _mlflow_callback, _settings, _stderr, mlflow_down

TB_DIR = "tensorboard"  # RUN/tensorboard/STAGE


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
        # heavy: ray loads here, not when this module is imported
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
        # heavy: ray loads here, not when this module is imported
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
    # heavy: ray loads here, not when this module is imported
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
