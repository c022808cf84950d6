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
- Meta-training (`raysub.l2o.meta_train`) is a learner loop on the driver with optimizee actors, in no Train or Tune
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
from raysub.tracking.checks import INSTALL, MLFLOW_DIR, PROBE_TIMEOUT_S, tracking_probe_problems, tracking_problems
from raysub.tracking.mlflow_logger import (_DOWN, MLFLOW_HTTP_ENV, WARNING_KEY, _mlflow_logger_class, mlflow_down,
                                           show_warning, tune_callbacks)
from raysub.tracking.tracker import TB_DIR, Tracker, _train_report_tracking, _Trial, train_callbacks

__all__ = [
    "INSTALL", "MLFLOW_DIR", "MLFLOW_HTTP_ENV", "PROBE_TIMEOUT_S", "TB_DIR", "Tracker", "WARNING_KEY", "_DOWN",
    "_Trial", "_mlflow_logger_class", "_train_report_tracking", "mlflow_down", "show_warning", "tracking_probe_problems",
    "tracking_problems", "train_callbacks", "tune_callbacks",
]
