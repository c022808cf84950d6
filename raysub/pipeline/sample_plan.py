"""What the sampling section asks for, known before anything starts: the snapshot schedule, the section's checks and
whether the streaming Gram fits its budget (`raysub.pipeline.sample` runs it).
"""
from __future__ import annotations

import math
from typing import List, Optional

from raysub.config import Config
from raysub.errors import ConfigError
from raysub.storage import block_bounds


def num_snapshots(cfg: Config, steps_per_epoch: int) -> int:
    """Snapshots the sampler writes: theta0 plus those taken inside the window."""
    if cfg.sample.snapshot_every_steps > 0:
        return 1 + (cfg.sample.epochs * steps_per_epoch) // cfg.sample.snapshot_every_steps
    return 1 + cfg.sample.epochs * cfg.sample.snapshots_per_epoch


def snapshot_steps(cfg: Config, steps_per_epoch: int) -> List[int]:
    """Global step counts (1-based, after the update) at which snapshots 1..t-1 are taken."""
    total = cfg.sample.epochs * steps_per_epoch
    if cfg.sample.snapshot_every_steps > 0:
        k = cfg.sample.snapshot_every_steps
        return list(range(k, total + 1, k))
    per = cfg.sample.snapshots_per_epoch
    steps = []
    for epoch in range(cfg.sample.epochs):
        for j in range(1, per + 1):
            steps.append(epoch * steps_per_epoch + math.ceil(j * steps_per_epoch / per))
    return steps


def check_sample_section(cfg: Config) -> List[str]:
    """The sampling window against ``basis.dim``: d must be below the number of snapshots (the centred trajectory
    has rank ≤ t−1). Checked here when the count does not depend on the dataset size, else in the plan."""
    problems = []
    if cfg.sample.snapshot_every_steps == 0 and cfg.basis.dim > 0 and cfg.sample.epochs > 0:
        t = num_snapshots(cfg, steps_per_epoch=1)
        if cfg.basis.dim >= t:
            problems.append(
                f"basis.dim={cfg.basis.dim} must be < the {t} snapshots sampled (the centred trajectory has rank "
                f"≤ {t - 1}): lower basis.dim or sample more (sample.epochs, sample.snapshots_per_epoch)"
            )
    s = cfg.sample
    if s.stop == "adaptive" and not s.stream_gram:
        problems.append("sample.stop=adaptive reads the streaming Gram: set sample.stream_gram=true")
    if s.write_basis and not s.stream_gram:
        problems.append("sample.write_basis=true needs the streaming Gram: set sample.stream_gram=true")
    if not 0 < s.stop_threshold < 1:
        problems.append(f"sample.stop_threshold={s.stop_threshold}: must be in (0, 1) (the reach residual's "
                        f"relative fall per epoch below which the window ends; 0.05 is the measured default)")
    if s.stop_patience < 1:
        problems.append(f"sample.stop_patience={s.stop_patience}: must be ≥ 1")
    if s.min_snapshots < 0:
        problems.append(f"sample.min_snapshots={s.min_snapshots}: must be ≥ 0 (0: basis.dim + 1)")
    elif 0 < s.min_snapshots <= cfg.basis.dim:
        problems.append(f"sample.min_snapshots={s.min_snapshots} must exceed basis.dim={cfg.basis.dim} (the window "
                        f"needs d + 1 snapshots): raise it, or 0 for basis.dim + 1")
    if not s.stream_gram_budget_mb > 0:
        problems.append(f"sample.stream_gram_budget_mb={s.stream_gram_budget_mb}: must be > 0")
    return problems


def min_window_snapshots(cfg: Config) -> int:
    return cfg.sample.min_snapshots or cfg.basis.dim + 1


def stream_plan(cfg: Config, num_params: int, num_snaps: int) -> Optional[str]:
    """Why the streaming Gram is off for this run (None: it is on). Refuses when ``sample.stop=adaptive`` or
    ``sample.write_basis`` needs it and it does not fit its budget.

    Raises:
        ConfigError: the adaptive window or the rank-written basis cannot have its streaming Gram.
    """
    if not cfg.sample.stream_gram:
        return "sample.stream_gram=false"
    bounds = block_bounds(num_params, cfg.ranks)
    widest = max(hi - lo for lo, hi in bounds)
    why = budget_refusal(num_snaps, widest, cfg.sample.stream_gram_budget_mb)
    if why is not None and (cfg.sample.stop == "adaptive" or cfg.sample.write_basis):
        needs = "sample.stop=adaptive" if cfg.sample.stop == "adaptive" else "sample.write_basis=true"
        raise ConfigError(f"{needs} needs the streaming Gram, but {why}: raise the budget, add workers "
                          f"(cluster.num_workers) or sample fewer snapshots")
    return why


def stream_bytes(capacity: int, block_numel: int) -> int:
    """Bytes of one rank's snapshot buffer."""
    return capacity * block_numel * 4


def budget_refusal(capacity: int, block_numel: int, budget_mb: float) -> Optional[str]:
    """Why the streaming Gram does not fit its budget (None when it fits)."""
    need = stream_bytes(capacity, block_numel)
    if need <= budget_mb * 2**20:
        return None
    return (f"the streaming Gram needs {need / 2**20:.0f} MB per rank ({capacity} snapshots × {block_numel:,} "
            f"coordinates × 4 B) > sample.stream_gram_budget_mb={budget_mb:g}")
