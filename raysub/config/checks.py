"""The schema's checks: the type checker that builds a config from plain data (`build`: unknown keys, wrong types,
a `Literal` field's value outside its choices, seeds and sizes out of range) and the value ranges of the schema's
own numbers (`schema_problems`). What a section *means* is checked by the package that owns it; the tracking
section by `raysub.tracking` (`raysub.pipeline.plan` asks each of them).

Every problem is one line naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Dict, List

from raysub.config.yamlio import INT64, MAX_NAME, MAX_TEXT, SHOWN, _show, _plain, _Spelled

# ---------------------------------------------------------------------------------------------------------
# building from plain data with type checks

def _coerce(value, tp, key: str, problems: List[str]):
    """Check `value` against the annotation `tp`; a `Literal` field's value must be one of its choices, ints are
    accepted for floats, floats must be finite (every float of the schema is a rate, a fraction or a size), ints
    must fit 64 bits, strings `MAX_TEXT` characters (also inside free-form mappings), and a string field given a
    number keeps its spelling. Returns the value, with plain numbers."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:  # a choice: its type's checks (a name's length) first, then the choices
        before = len(problems)
        value = _coerce(value, type(args[0]), key, problems)
        if len(problems) == before and value not in args:
            problems.append(f"{key}={_show(value)}: choose {_choices(args)}")
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, problems)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {_show(value)}")
            return value
        return [_coerce(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {_show(value)}")
        elif any(not isinstance(k, str) for k in value):  # option names (checkers sort them): `1:` or `true:`
            bad = next(k for k in value if not isinstance(k, str))
            problems.append(f"{key}: the key {_show(_plain(bad))} is not a name: quote it, or give names as keys")
        _free_form_problems(value, key, problems)
        return _plain(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {_show(value)}")
            return value
        if not math.isfinite(value):
            problems.append(f"{key}: expected a finite number, got {float(value)}")
        return float(value)
    if tp is int:
        seed = SEEDS.get(re.sub(r"\[\d+\]$", "", key))
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {_show(value)}")
        elif seed is not None and not 0 <= value < seed[0]:
            problems.append(f"{key}={_show(_plain(value))}: a seed must be an integer in [0, {seed[1]}) ({seed[2]})")
        else:
            _free_form_problems(value, key, problems)
        return _plain(value)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {_show(value)}")
        return value
    if tp is str:
        if isinstance(value, _Spelled):
            value = value.text
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {_show(value)}")
        elif len(value) > MAX_NAME and re.sub(r"\[\d+\]$", "", key) not in TEXT_KEYS:
            problems.append(f"{key}: a name of {len(value):,} characters ({_show(value)}): at most {MAX_NAME}")
        else:
            _free_form_problems(value, key, problems)
        return value
    if tp is typing.Any:
        _free_form_problems(value, key, problems)
        return value
    raise AssertionError(f"unsupported config annotation {tp}")


# Every seed's range, checked with its type (a seed out of range is refused, never wrapped or overflowed later).
# A run's seeds reach torch.manual_seed and torch.Generator.manual_seed, numpy's SeedSequence (projections) and
# random.Random (Tune): below 2**32 they are valid for each, distinct seeds stay distinct (the projections keep a
# seed's low 32 bits) and the epoch seeds derived from them (seed·100,003 + epoch) fit torch's 64-bit seeds.
# l2o.seed is multiplied twice (optimizee seed l2o.seed·1,000,003 + serial, then its epoch seeds ·100,003).
_RUN_SEED = (2 ** 32, "2**32", "what numpy, torch and the projections all accept as distinct seeds")
SEEDS = {
    "seed": _RUN_SEED, "data.label_noise_seed": _RUN_SEED, "data.val_seed": _RUN_SEED, "train.data_seed": _RUN_SEED,
    "sweep.seeds": _RUN_SEED, "l2o_tune.seed": _RUN_SEED,
    "l2o.seed": (10 ** 8, "10**8", "its optimizees' epoch seeds, l2o.seed·1,000,003·100,003, must fit 64 bits"),
}


# The string fields that hold paths, URIs or free text (`MAX_TEXT`); every other one names a registered plug-in, a
# choice or a label (`MAX_NAME`), so no message echoing it is longer than a line. train.label has its own check.
TEXT_KEYS = {"run_dir", "data.root", "cluster.address", "train.basis_run", "train.init_from", "train.label",
             "tracking.mlflow_tracking_uri", "tracking.mlflow_experiment"}


def _free_form_problems(value, key: str, problems: List[str]) -> None:
    """Append a problem for every integer in ``value`` (at any depth) that does not fit 64 bits and every string
    longer than `MAX_TEXT`: options reach torch, numpy and messages, where they would crash or flood."""
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        problems.append(f"{key}={_show(_plain(value))}: out of range: an integer here must fit 64 bits "
                        f"(-2**63 ≤ value < 2**63)")
    elif isinstance(value, str) and len(value) > MAX_TEXT:
        problems.append(f"{key}: a string of {len(value):,} characters ({_show(value)}): at most {MAX_TEXT:,}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _free_form_problems(k, f"{key} (a key)", problems)
            _free_form_problems(v, f"{key}.{k}" if isinstance(k, str) and len(k) <= SHOWN else key, problems)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _free_form_problems(v, f"{key}[{i}]", problems)


def build(cls, data, prefix: str, problems: List[str]):
    """An instance of the dataclass ``cls`` from the mapping ``data`` (keys under ``prefix``), every field checked
    against its annotation; each problem is appended to ``problems`` (the caller raises them all at once)."""
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_show(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            problems.append(f"unknown key {_show(f'{prefix}{key}')}: known keys here are {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build(tp, data[f.name], f"{prefix}{f.name}.", problems)
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, prefix + f.name, problems)
    return cls(**kwargs)


def _choices(args) -> str:
    """``a, b or c``: a `Literal`'s choices as a message lists them."""
    names = [str(a) for a in args]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def choice_problems(obj, prefix: str = "") -> List[str]:
    """The `Literal` fields of the dataclass ``obj`` (nested sections included) whose value is not one of their
    choices — a config built or changed in code, past `build` — one line each, as `build` words them."""
    problems: List[str] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            problems += choice_problems(value, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is typing.Literal and value not in typing.get_args(tp):
            problems.append(f"{prefix}{f.name}={_show(value)}: choose {_choices(typing.get_args(tp))}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# the schema's own value checks (each package checks its own section: see raysub.pipeline.plan)

# A name that becomes a path component of the run directory (train.label: train/LABEL.pt, curves/LABEL.json,
# checkpoints/train-LABEL): no '/', no '..', no hidden file, nothing a shell or object store reads specially.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def positive(problems: List[str], key: str, value, allow_zero: bool = False) -> None:
    """Append ``key=value: must be > 0`` (``≥ 0`` with ``allow_zero``) unless ``value`` is a finite number that
    is (NaN and ±inf never are); None passes."""
    if value is None:
        return
    bound = "≥ 0" if allow_zero else "> 0"
    if not math.isfinite(value):
        problems.append(f"{key}={value}: must be a finite number {bound}")
    elif value < 0 or (value == 0 and not allow_zero):
        problems.append(f"{key}={value}: must be {bound}")


def schema_problems(cfg) -> List[str]:
    """Value ranges of the schema's own numbers, and the choices of a config built in code (`choice_problems`),
    for the `raysub.config.Config` ``cfg`` (registry names, options, data, sampling and tracking are checked by
    their packages). Empty list: fine."""
    problems: List[str] = []
    for key, value in (
        ("cluster.cpus_per_worker", cfg.cluster.cpus_per_worker),
        ("sgd.epochs", cfg.sgd.epochs),
        ("sgd.lr", cfg.sgd.lr),
        ("sample.epochs", cfg.sample.epochs),
        ("sample.snapshots_per_epoch", cfg.sample.snapshots_per_epoch),
        ("basis.dim", cfg.basis.dim),
        ("train.dim", cfg.train.dim),
        ("train.epochs", cfg.train.epochs),
        ("train.lr", cfg.train.lr),
        ("train.batch_size", cfg.train.batch_size),
        ("cluster.num_cpus", cfg.cluster.num_cpus),
    ):
        positive(problems, key, value)
    for key, milestones in (("sgd.lr_milestones", cfg.sgd.lr_milestones),
                            ("train.lr_milestones", cfg.train.lr_milestones)):
        if any(m < 0 for m in milestones):
            problems.append(f"{key}={_show(milestones)}: epochs are ≥ 0")
    if cfg.train.label is not None and not SAFE_NAME.fullmatch(cfg.train.label):
        problems.append(f"train.label={_show(cfg.train.label)}: a label names files of the run (train/LABEL.pt, "
                        f"curves/LABEL.json): use letters, digits, '.', '_' and '-', not first '.', at most 100")
    for key, value in (
        ("cluster.num_workers", cfg.cluster.num_workers),  # 0: Ray Train's local mode
        ("cluster.max_failures", cfg.cluster.max_failures),
        ("sgd.momentum", cfg.sgd.momentum),
        ("sgd.weight_decay", cfg.sgd.weight_decay),
        ("sample.snapshot_every_steps", cfg.sample.snapshot_every_steps),
        ("train.momentum", cfg.train.momentum),
        ("train.weight_decay", cfg.train.weight_decay),
    ):
        positive(problems, key, value, allow_zero=True)
    for key, value in (("sgd.momentum", cfg.sgd.momentum), ("train.momentum", cfg.train.momentum)):
        if value >= 1:
            problems.append(f"{key}={value}: must be < 1")
    for key, value in (("sgd.lr_gamma", cfg.sgd.lr_gamma), ("train.lr_gamma", cfg.train.lr_gamma)):
        if not 0 < value <= 1:
            problems.append(f"{key}={value}: must be in (0, 1]")
    if cfg.train.projection_budget_gb is not None:
        positive(problems, "train.projection_budget_gb", cfg.train.projection_budget_gb)
    groups = cfg.train.projection_groups
    if groups is not None:
        if groups <= 0 or cfg.ranks % groups:
            problems.append(f"train.projection_groups={groups}: must divide cluster.num_workers="
                            f"{cfg.cluster.num_workers} (each group is a node's consecutive ranks)")
        elif cfg.train.projection_sharding not in ("node", "auto"):
            problems.append(f"train.projection_groups={groups} only applies to train.projection_sharding=node (now "
                            f"{cfg.train.projection_sharding}): drop it or set train.projection_sharding=node")
    if cfg.sample.epochs > cfg.sgd.epochs:
        problems.append(
            f"sample.epochs={cfg.sample.epochs} exceeds sgd.epochs={cfg.sgd.epochs}: "
            "the snapshot window is part of the SGD run; raise sgd.epochs or lower sample.epochs"
        )
    problems += choice_problems(cfg)
    return problems
