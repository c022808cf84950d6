"""Every path inside a run directory, named once: the run's records, its stages' files and its plots.

Paths are relative to the run (`raysub.storage.RunDir` joins them). A module that reads or writes a run's file
names it from here, so moving a file is one edit. The meta-training state's paths (``l2o/``) are here too
(`raysub.l2o.layout` re-exports them for the modules that read a meta-training run).
"""
from __future__ import annotations

import uuid
from typing import Any, Dict

from raysub.storage import LOCK  # noqa: F401  (re-exported: the lock file is a name in the run too)
# the run's records: the manifest commits everything; config.yaml and summary.json are its copies
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
THETA0 = "theta0.pt"
MODEL = "model.pt"  # the sampler's trained weights when its SGD run ends (another run's train.init_from)
LOGS = "logs"
CHECKPOINTS = "checkpoints"  # train-LABEL/ (a training's), sample checkpoints
TEMPORARY_INFIX = ".tmp-"  # what a write killed before its rename leaves: NAME.tmp-XXXXXXXX

# sampling: one block per worker, and the sampler's streamed Gram
TRAJECTORY = "trajectory"
STREAM_GRAM = "trajectory/gram.pt"

# the basis: each build writes a new generation basis/GEN/ (spectrum.json and its block files)
BASIS = "basis"
SPECTRUM = "spectrum.json"

# plots
PLOTS = "plots"
PLOT_ACCURACY = "plots/test_accuracy.png"
PLOT_EXPLAINED_VARIANCE = "plots/explained_variance.png"
PLOT_STOP_SIGNAL = "plots/stop_signal.png"
PLOT_SWEEP = "plots/accuracy_vs_dim.png"
PLOT_L2O_CURVES = "l2o/curves.png"  # a meta-training's curves

# a sweep directory's results
SWEEP_RESULTS = "results.json"
SWEEP_TRIALS = "trials.csv"

# a meta-training run: the flat layout of runs written before generations (WEIGHTS and HISTORY stay as copies of
# the committed state), and the generations l2o/ckpt/GEN/{checkpoint.pt,weights.pt,history.json}
L2O_CHECKPOINT, L2O_WEIGHTS, L2O_HISTORY = "l2o/checkpoint.pt", "l2o/weights.pt", "l2o/history.json"
L2O_GENERATIONS = "l2o/ckpt"
L2O_STATE_FILES = ("checkpoint.pt", "weights.pt", "history.json")

# an l2o tuning: its results and the best trial's config (its best φ is copied to L2O_WEIGHTS), the trials under
# tune/
L2O_TUNE_RESULTS, L2O_TUNE_BEST_CONFIG = "l2o_tune/results.json", "l2o_tune/best_config.yaml"
TUNE = "tune"  # Ray Tune's experiment storage (a sweep's phases, an l2o tuning's trials)


def train_z(label: str) -> str:
    """The trained z of the training ``label``."""
    return f"train/{label}.pt"


def curve(label: str) -> str:
    """The per-step training losses of ``label`` (``sgd`` for the sampler's baseline)."""
    return f"curves/{label}.json"


def train_checkpoint(label: str) -> str:
    """The checkpoint directory of the training ``label``, inside `CHECKPOINTS`."""
    return f"train-{label}"


def new_basis_prefix() -> str:
    """A new basis generation directory, ``basis/GEN`` (committed by naming it in ``stages.basis.dir``)."""
    return f"{BASIS}/{uuid.uuid4().hex[:12]}"


def spectrum(prefix: str) -> str:
    """The spectrum record of the basis generation ``prefix`` (``basis/GEN``, or ``basis`` for an old run)."""
    return f"{prefix}/{SPECTRUM}"


def trajectory_block(block: int) -> str:
    """The trajectory directory of block (worker) ``block``."""
    return f"{TRAJECTORY}/block_{block:03d}"


def l2o_state_files(manifest: Any) -> Dict[str, str]:
    """The committed meta-training state's files that ``manifest`` (a `raysub.runs.manifest.Manifest`: not
    imported here, that module imports this one) holds, by name (``checkpoint.pt``,
    ``weights.pt``, ``history.json``) → path in the run: in the generation ``stages.l2o.dir``, or flat in ``l2o/``
    for a run written before generations. Empty when nothing is committed."""
    base = manifest.stages.get("l2o", {}).get("dir") or "l2o"
    return {name: f"{base}/{name}" for name in L2O_STATE_FILES if f"{base}/{name}" in manifest.shards}
