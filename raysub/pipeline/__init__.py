"""The stages of a raysub run, in the order a run goes through them (driver side and Ray workers).

1. `sample`  — full-parameter SGD on Ray Train (DDP), snapshotting the trajectory block by block;
2. `basis`   — the distributed Gram-matrix SVD of the trajectory (DLDR), one Ray actor per block;
3. `train`   — subspace training of z on Ray Train: the per-worker recipe around `raysub.engine.task`;
4. `sweep`   — intrinsic-dimension sweeps: many subspace trainings as Ray Tune trials (`sweep_plan`: the grid,
   the trials' configs and the d_int scoring, pure; `sweep`: running the phases on Tune);
with `plan` first — every check before anything starts (each package checks its own section) — and `run` — the
stage drivers behind ``raysub sample|basis|train|run``. Every stage opens its run directory with
`raysub.runs.open.open_run` (the run-directory service: layout, typed manifest, commits).
"""
from raysub.runs.records import read_summary
from raysub.pipeline.run import (
    run_pipeline,
    stage_basis,
    stage_sample,
    stage_train,
    train_from_config,
)

__all__ = [  # the package's API, re-exported from the modules that define it
    "read_summary", "run_pipeline", "stage_basis", "stage_sample", "stage_train",
    "train_from_config",
]
