"""The stages of a raysub run, in the order a run goes through them (driver side and Ray workers).

1. `sample`  — full-parameter SGD on Ray Train (DDP), snapshotting the trajectory block by block;
2. `basis`   — the distributed Gram-matrix SVD of the trajectory (DLDR), one Ray actor per block;
3. `train`   — subspace training of z on Ray Train: the per-worker recipe around `raysub.engine.task`;
4. `sweep`   — intrinsic-dimension sweeps: many subspace trainings as Ray Tune trials (`sweep_plan`: the grid,
   the trials' configs and the d_int scoring, pure; `sweep`: running the phases on Tune);
with `plan` first — every check before anything starts (each package checks its own section) — `records` —
the run directory's state checks and its manifest (the commit record) — and `run` — the stage drivers behind
``raysub sample|basis|train|run`` and the console table.
"""
from raysub.pipeline.records import prepare_run_dir, read_summary  # noqa: F401
from raysub.pipeline.run import (  # noqa: F401
    format_progress,
    format_table,
    results_table,
    run_pipeline,
    stage_basis,
    stage_sample,
    stage_train,
    train_from_config,
)
