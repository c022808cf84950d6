"""Planning and scoring of intrinsic-dimension sweeps (Li et al., 2018): pure logic, no Ray.

Every trial trains z ∈ R^d in θ = θ0 + P z from the *same* θ0 (the sweep directory's ``theta0.pt``, or the
basis run's when ``dldr`` is swept) with one family's P drawn from the trial's seed, and reports validation and
test accuracy every epoch. The full-training baseline is the same loop with P = I (family ``identity``,
trained with the ``sgd`` section's lr and momentum), one run per seed — or a number given as
``sweep.baseline``. A trial's accuracy is the one at its best *validation* epoch (test is reported alongside,
never used to choose), and a (family, d) point is the mean over seeds. A trial whose loss or z becomes
non-finite stops and is recorded as diverged (``"diverged": EPOCH``): it scores 0, and its (family, d) point fails
whatever the other seeds reach.

d_int (d_int90 for threshold 0.9) of a family = the smallest swept d whose mean validation accuracy reaches
``threshold`` × baseline. The search has two phases: the coarse grid (plus the baseline), then
``sweep.refine`` extra dimensions spaced geometrically between each family's last failing and first passing d
(`refinement`); `raysub.pipeline.sweep` runs each phase as a Ray Tune experiment.

Here: `plan_sweep` (every check before Ray starts or anything is written) and `family_grid`, `trial_config`
(one trial's config), and the scoring of finished trials — `points`, `intrinsic_dim`, `refinement` — with
``trials.csv`` (`_csv`); the console table is `raysub.report.tables.sweep_table`.
"""
from __future__ import annotations

import csv
import io
from typing import Any, Dict, List, Optional, Sequence, Tuple
import copy

from raysub.config import Config
from raysub.data import open_dataset
from raysub.pipeline.plan import check
from raysub.errors import ConfigError
from raysub.report.tables import BASELINE  # the full-training family (P = I): its name, which the sweep table shows
import torch
from raysub.engine.flat import param_layout
from raysub.models import model_for
from raysub.projections import FACTORY_ARGS, PROJECTIONS, check_projection

Trial = Tuple[str, int, int]  # (family, d, seed)


# ---------------------------------------------------------------------------------------------------------
# planning: every check before Ray starts or anything is written

def family_grid(cfg: Config) -> Dict[str, List[int]]:
    """The coarse grid of d per family (``sweep.family_dims`` overrides ``sweep.dims``)."""
    return {f: [int(d) for d in cfg.sweep.family_dims.get(f, cfg.sweep.dims)] for f in cfg.sweep.families}


def plan_sweep(cfg: Config) -> Dict[str, Any]:
    """Validate a sweep without starting Ray or writing anything.

    Returns:
        {"num_params", "model", "grid"}.
    Raises:
        ConfigError: every problem found, in one message.
    """


    check(cfg)
    sw = cfg.sweep
    problems: List[str] = []
    known = [n for n in PROJECTIONS.names() if not PROJECTIONS.meta(n).get("full")]
    if not sw.families:
        problems.append(f"sweep.families is empty: name at least one of {', '.join(known)}")
    for f in sw.families:
        if f not in known:
            problems.append(f"sweep.families: unknown projection family {f!r}: choose from {', '.join(known)}")
    for key in ("family_dims", "family_options"):
        for f in getattr(sw, key):
            if f not in sw.families:
                problems.append(f"sweep.{key}.{f}: {f!r} is not in sweep.families ({', '.join(sw.families)})")
    for f, options in sw.family_options.items():
        if f in known and f in sw.families:
            try:
                PROJECTIONS.check_options(f, options, skip=3, internal=FACTORY_ARGS)
            except ConfigError as exc:
                problems.extend(f"sweep.family_options.{f}: {p}" for p in exc.problems)
    if not sw.seeds:
        problems.append("sweep.seeds is empty: give at least one seed, e.g. sweep.seeds=[0,1]")
    if len(set(sw.seeds)) != len(sw.seeds):
        problems.append(f"sweep.seeds={sw.seeds} repeats a seed: a repeated seed is the same trial twice")
    if not 0 < sw.threshold <= 1:
        problems.append(f"sweep.threshold={sw.threshold}: a fraction of the baseline must be in (0, 1]")
    if sw.baseline is not None and not 0 < sw.baseline <= 1:
        problems.append(f"sweep.baseline={sw.baseline}: a validation accuracy must be in (0, 1]")
    if cfg.data.val_fraction <= 0:
        problems.append("data.val_fraction=0: a sweep selects d on a held-out validation split, never on test; "
                        "set data.val_fraction (e.g. 0.1)")
    for key, value in (("sweep.refine", sw.refine),):
        if value < 0:
            problems.append(f"{key}={value}: must be ≥ 0")
    for key, value in (("sweep.workers_per_trial", sw.workers_per_trial), ("sweep.max_concurrent", sw.max_concurrent),
                       ("sweep.grace_period", sw.grace_period)):
        if value is not None and value < 1:
            problems.append(f"{key}={value}: must be ≥ 1")
    if problems:
        raise ConfigError(problems)

    data = open_dataset(cfg)
    torch.manual_seed(cfg.seed)
    model = model_for(cfg, data)
    n = sum(e.numel for e in param_layout(model))  # trainable only: a UV model's frozen W0 is not searched over
    batch = cfg.train.batch_size or cfg.data.batch_size
    if data.size("train") // batch == 0:
        problems.append(f"batch size {batch} exceeds the {data.size('train')} training examples left after the "
                        f"validation split: lower it")
    grid = family_grid(cfg)
    # families without their own sweep.family_dims share sweep.dims: check each list once, not once per family
    sources = {f"sweep.family_dims.{f}" if f in sw.family_dims else "sweep.dims": dims for f, dims in grid.items()}
    for key, dims in sources.items():
        if not dims:
            problems.append(f"{key} has no values: give the coarse grid of d, e.g. {key}=[10,100,1000]")
        for d in dims:
            if d <= 0:
                problems.append(f"{key}: d={d} must be > 0")
            elif d > n:
                problems.append(f"{key}: d={d} exceeds the model's {n:,} parameters: a subspace must be smaller")
    for f, dims in grid.items():  # the family's own checks (options, its basis run) at its largest d
        positive = [d for d in dims if 0 < d <= n]
        if f in known and positive:
            options = sw.family_options.get(f, {})
            try:
                PROJECTIONS.check_options(f, options, skip=3, internal=FACTORY_ARGS)
                reported = set()
            except ConfigError as exc:  # reported above as sweep.family_options
                reported = set(exc.problems)
            problems.extend(f"sweep family {f!r} at d={max(positive)}: {p}" for p in check_projection(
                f, n, max(positive), options, cfg.train.basis_run) if p not in reported)
    if problems:
        raise ConfigError(problems)
    return {"num_params": n, "model": model, "grid": grid}


# ---------------------------------------------------------------------------------------------------------
# trials

def trial_config(base: Dict[str, Any], family: str, dim: int, seed: int) -> Dict[str, Any]:
    """One trial's config (a plain dict, as Ray ships it): family, d and seed set; the baseline (identity)
    trains as the ``sgd`` section does: momentum SGD at its lr, or Adam at its lr for ``sgd.optimizer=adamw``."""

    cfg = copy.deepcopy(base)
    cfg["seed"] = seed
    cfg["cluster"]["num_workers"] = cfg["sweep"]["workers_per_trial"]
    train = cfg["train"]
    train.update(projection=family, dim=dim, label=f"{family}-d{dim}-s{seed}")
    train["projection_options"] = dict(cfg["sweep"]["family_options"].get(family, {}))
    if family == BASELINE:
        adam = cfg["sgd"].get("optimizer") == "adamw"  # an AdamW lr would starve momentum SGD
        train.update(optimizer="adam" if adam else "psgd", optimizer_options={}, lr=cfg["sgd"]["lr"],
                     momentum=cfg["sgd"]["momentum"], weight_decay=0.0)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# analysis

def points(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean over seeds per (family, d) of the completed trials (a diverged trial scores 0); ``diverged`` counts
    the seeds that diverged."""
    groups: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["family"], r["dim"]), []).append(r)
    out = []
    for (family, dim), rs in sorted(groups.items()):
        val = [r["val_acc"] for r in rs]
        out.append({"family": family, "dim": dim, "seeds": len(rs), "val_acc": sum(val) / len(val),
                    "val_acc_min": min(val), "val_acc_max": max(val),
                    "test_acc": sum(r["test_acc"] for r in rs) / len(rs),
                    "train_s": sum(r["train_s"] for r in rs), "diverged": sum(1 for r in rs if "diverged" in r)})
    return out


def intrinsic_dim(pts: Sequence[Dict[str, Any]], family: str, target: float) -> Optional[Dict[str, Any]]:
    """The point with the smallest d of ``family`` whose mean validation accuracy reaches ``target`` and where no
    seed diverged."""
    passing = [p for p in pts if p["family"] == family and p["val_acc"] >= target and not p["diverged"]]
    return min(passing, key=lambda p: p["dim"]) if passing else None


def refinement(pts: Sequence[Dict[str, Any]], family: str, target: float, k: int) -> List[int]:
    """Up to ``k`` new d, geometrically spaced strictly between the last failing d below the first passing one
    and that passing d (integers not already swept)."""
    hit = intrinsic_dim(pts, family, target)
    if hit is None or k <= 0:
        return []
    below = [p["dim"] for p in pts if p["family"] == family and p["dim"] < hit["dim"]]
    if not below:
        return []
    lo, hi = max(below), hit["dim"]
    swept = {p["dim"] for p in pts if p["family"] == family}
    new = sorted({int(round(lo * (hi / lo) ** (i / (k + 1)))) for i in range(1, k + 1)} - swept - {lo, hi})
    return [d for d in new if lo < d < hi]


def _csv(rows: Sequence[Dict[str, Any]]) -> str:
    keys = ["phase", "family", "dim", "seed", "val_acc", "test_acc", "best_epoch", "epochs_run", "final_val_acc",
            "train_s", "diverged", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    return buf.getvalue()
