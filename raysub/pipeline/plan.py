"""Planning: every check of a run, before Ray starts or anything is written.

The config module checks its schema; every other section is checked by the package that owns it — the data
section by `raysub.data`, the model name by the model registry, the sampling window by `raysub.pipeline.sample`,
the optimizer and its options by `raysub.optim`, the projection family and its options by
`raysub.projections`. `validate` asks each of them and returns every problem; `check` raises them as one
`ConfigError`; `plan` adds what needs the dataset and the model built (sizes, the snapshot count).
"""
from __future__ import annotations

from typing import Any, Dict, List

from raysub.config import Config, schema_problems
from raysub.errors import ConfigError


def validate(cfg: Config, *, check_data: bool = True) -> List[str]:
    """All problems of a config that need neither the dataset loaded nor Ray (empty list: fine)."""
    import raysub.plugins  # noqa: F401  every plug-in registered before its name is checked (l2o too)
    from raysub.data import check_data_section
    from raysub.models import MODELS
    from raysub.models.lowrank import uv_problems
    from raysub.optim import check_optimizer
    from raysub.pipeline.sample import check_sample_section
    from raysub.projections import FACTORY_ARGS, PROJECTIONS

    problems = schema_problems(cfg)
    problems += check_data_section(cfg, check_data)
    if cfg.model.name not in MODELS:
        problems.append(f"model.name: unknown {MODELS.kind} {cfg.model.name!r}: choose one of "
                        f"{', '.join(MODELS.names())}")
    problems += uv_problems(cfg.model.uv)
    problems += check_sample_section(cfg)
    problems += check_optimizer(cfg.train.optimizer, cfg.train.optimizer_options)
    name = cfg.train.projection
    if name not in PROJECTIONS:
        problems.append(f"train.projection: unknown {PROJECTIONS.kind} {name!r}: choose one of "
                        f"{', '.join(PROJECTIONS.names())}")
    else:
        try:
            PROJECTIONS.check_options(name, cfg.train.projection_options, skip=3, internal=FACTORY_ARGS)
        except ConfigError as exc:
            problems += [f"train.projection_options: {p}" for p in exc.problems]
        # a family that reads this run's own basis: the basis is built with basis.dim components
        if (PROJECTIONS.meta(name).get("needs_basis_run") and cfg.train.basis_run is None
                and cfg.train.dim is not None and cfg.train.dim > cfg.basis.dim):
            problems.append(f"train.dim={cfg.train.dim} exceeds basis.dim={cfg.basis.dim}: raise basis.dim")
    return problems


def check(cfg: Config, *, check_data: bool = True) -> Config:
    """Raise ConfigError with every problem of ``cfg``; return it unchanged when fine."""
    from raysub.tracking import tracking_probe_problems

    problems = validate(cfg, check_data=check_data)
    problems += tracking_probe_problems(cfg)  # the network: here, not in validate, which needs nothing outside
    if problems:
        raise ConfigError(problems)
    return cfg


def plan(cfg: Config) -> Dict[str, Any]:
    """Validate ``cfg`` fully without starting Ray or writing anything.

    Returns:
        {"num_params" (trainable), "num_params_total" (frozen too), "num_snapshots", "steps_per_epoch", "layout",
        "num_classes", "model", and when used "init_from" (`load_init_from`'s record) and "uv" (`apply_uv`'s)}.
    Raises:
        ConfigError: every problem found, in one message.
    """
    import torch

    from raysub.data import open_dataset
    from raysub.engine.flat import layout_to_json, param_layout
    from raysub.models import model_for
    from raysub.pipeline.sample import num_snapshots

    check(cfg)
    data = open_dataset(cfg)
    torch.manual_seed(cfg.seed)
    built: Dict[str, Any] = {}
    model = model_for(cfg, data, report=built)  # train.init_from's weights, model.uv's reparametrisation
    layout = param_layout(model)
    n = sum(e.numel for e in layout)
    steps = data.size("train") // cfg.data.batch_size
    problems = []
    if steps == 0:
        problems.append(f"data.batch_size={cfg.data.batch_size} exceeds the {data.size('train')} training examples: "
                        "lower it")
    t = num_snapshots(cfg, max(steps, 1))
    if cfg.basis.dim >= t:
        problems.append(f"basis.dim={cfg.basis.dim} must be < the {t} snapshots sampled: lower basis.dim or sample "
                        f"more (sample.epochs, sample.snapshots_per_epoch, sample.snapshot_every_steps)")
    if cfg.basis.dim >= n:
        problems.append(f"basis.dim={cfg.basis.dim} must be < the model's {n} parameters: lower it")
    if cfg.cluster.num_workers > n:
        problems.append(f"cluster.num_workers={cfg.cluster.num_workers} exceeds the {n} parameters to shard")
    if problems:
        raise ConfigError(problems)
    return {"num_params": n, "num_snapshots": t, "steps_per_epoch": steps, "layout": layout_to_json(layout),
            "num_classes": data.num_classes, "model": model,
            "num_params_total": sum(p.numel() for p in model.parameters()), **built}


def describe_params(cfg: Config, info: Dict[str, Any]) -> str:
    """"33,450 trainable of 139,210 parameters (UV rank 16 on 16 layers; θ0 from RUN)" — or "62,006 parameters"."""
    n, total = info["num_params"], info.get("num_params_total", info["num_params"])
    text = f"{n:,} parameters" if n == total else f"{n:,} trainable of {total:,} parameters"
    notes = []
    if info.get("uv"):
        notes.append(f"UV rank {cfg.model.uv.rank} on {len(info['uv']['layers'])} layers")
    if info.get("init_from"):
        fresh = info["init_from"]["fresh"]
        notes.append(f"θ0 from {info['init_from']['uri']}" + (f", a fresh {fresh[0].rsplit('.', 1)[0]} (another "
                                                               f"class count)" if fresh else ""))
    return text + (f" ({'; '.join(notes)})" if notes else "")

