"""Planning: every check of a run, before Ray starts or anything is written.

The config module checks its schema; every other section is checked by the package that owns it — the data
section by `raysub.data`, the model name by the model registry, the sampling window by `raysub.pipeline.sample`,
the optimizer and its options by `raysub.optim`, the projection family and its options by
`raysub.projections`. `validate` asks each of them and returns every problem; `check` raises them as one
`ConfigError`; `plan` adds what needs the dataset and the model built (sizes, the snapshot count).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from raysub.config import Config, schema_problems
from raysub.errors import ConfigError
from raysub.pipeline.sample_plan import num_snapshots
from raysub.runs.layout import MANIFEST, THETA0
from raysub.runs.records import same_state
from raysub.storage import RunDir
from raysub.tracking import tracking_probe_problems


def validate(cfg: Config, *, check_data: bool = True) -> List[str]:
    """All problems of a config that need neither the dataset loaded nor Ray (empty list: fine)."""
    import raysub.plugins  # noqa: F401  every plug-in registered before its name is checked (l2o too)
    from raysub.data import check_data_section
    from raysub.models import MODELS
    from raysub.models.lowrank import uv_problems
    from raysub.optim import check_optimizer
    from raysub.pipeline.sample_plan import check_sample_section
    from raysub.projections import FACTORY_ARGS, PROJECTIONS
    from raysub.tracking import tracking_problems

    problems = schema_problems(cfg)
    problems += tracking_problems(cfg)  # MLflow installed, and a store it can reach
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
    # heavy: torch (and raysub.data, .models, .engine.flat, which import it) loads here, not when this module is imported
    import torch

    from raysub.data import open_dataset
    from raysub.engine.flat import layout_to_json, param_layout
    from raysub.models import model_for

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
    if cfg.ranks > n:
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


# ---------------------------------------------------------------------------------------------------------
# a training's projection and the θ0 of another run's basis

def check_train_projection(cfg: Config, num_params: int, run: RunDir, own_basis: bool = True) -> None:
    """The projection family's own checks for this training (d against N, its options, its basis run —
    ``train.basis_run``, else this run's own when ``own_basis``), before Ray starts.

    Raises:
        ConfigError: every problem, in one message.
    """
    # heavy: torch (imported by raysub.engine.task and raysub.projections) loads here, not when this module is imported
    from raysub.engine.task import subspace_dim
    from raysub.projections import check_projection

    name = cfg.train.projection
    dim = subspace_dim(cfg, num_params)
    problems = check_projection(name, num_params, dim, cfg.train.projection_options,
                                cfg.train.basis_run or (run.uri if own_basis else None))
    from raysub.plugins import OPTIMIZERS  # l2o included

    max_dim = OPTIMIZERS.meta(cfg.train.optimizer).get("max_dim") if cfg.train.optimizer in OPTIMIZERS else None
    if not problems:
        problems += [p for p in [sharding_plan(cfg, num_params, dim)["problem"]] if p]
    if max_dim is not None and dim > max_dim:  # e.g. P-BFGS on every parameter of a UV model
        problems.append(f"train.optimizer={cfg.train.optimizer} keeps d×d matrices: d={dim:,} needs "
                        f"{4 * dim * dim / 2 ** 30:.1f} GiB for each (its limit is d ≤ {max_dim:,}): use it in a "
                        f"DLDR subspace (train.projection=dldr, tens of coordinates) or pick a first-order optimizer "
                        f"(psgd, adam)")
    if problems:
        raise ConfigError(problems)


def sharding_plan(cfg: Config, num_params: int, dim: int, nodes: int = 1) -> Dict[str, Any]:
    """Where P lives in this training (`raysub.engine.sharded`): {"mode" (resolved), "requested", "p_bytes" (P
    whole; 0 for a family holding no N×D matrix), "per_worker" (bytes of P each worker holds), "budget" (bytes),
    "budget_from" (how the budget was chosen), "problem" (a one-line refusal, or None)}.

    ``nodes``: Ray's node count (1 before Ray starts; ``train.projection_groups`` stands for it). An explicit mode
    whose per-worker P exceeds the budget is a problem: the run would swap or be killed by the OOM killer mid-run.
    """
    import torch  # heavy: the planner's callers have loaded it already

    from raysub.engine import sharded
    from raysub.projections import stored_bytes

    world = cfg.ranks
    groups = cfg.train.projection_groups or nodes
    node_size = max(world // max(groups, 1), 1)
    itemsize = 2 if cfg.train.basis_dtype == "bfloat16" else torch.empty(0).element_size()
    p_bytes = stored_bytes(cfg.train.projection, num_params, dim, cfg.train.projection_options, itemsize)
    # the workers sharing one machine: all of them on a local cluster, a node's share on a cluster of several
    budget, budget_from = sharded.budget_bytes(cfg, node_size if groups > 1 and not cfg.train.projection_groups
                                               else world)
    requested = cfg.train.projection_sharding
    mode = sharded.resolve_mode(requested, p_bytes, budget, world, node_size, groups)
    per_worker = sharded.per_worker_bytes(mode, p_bytes, world, node_size)
    problem = None
    if requested != "auto" and p_bytes and per_worker > budget:
        fits = [m for m in (["node"] if groups > 1 else []) + ["sharded"]
                if sharded.per_worker_bytes(m, p_bytes, world, node_size) <= budget]
        fix = (f"set train.projection_sharding={fits[0]} ({sharded.per_worker_bytes(fits[0], p_bytes, world, node_size) / 1e9:.1f} "
               f"GB per worker) or auto" if fits
               else "use more workers, a smaller train.dim, or train.basis_dtype=bfloat16")
        problem = (f"train.projection_sharding={requested}: P ({cfg.train.projection}, N={num_params:,} × d={dim} × "
                   f"{itemsize} B) takes {per_worker / 1e9:.1f} GB per worker, above the {budget / 1e9:.1f} GB budget "
                   f"({budget_from if cfg.train.projection_budget_gb is not None else budget_from + '; set train.projection_budget_gb to change it'}): "
                   f"{fix}")
    return {"mode": mode, "requested": requested, "p_bytes": p_bytes, "per_worker": per_worker, "budget": budget,
            "budget_from": budget_from, "problem": problem}


def basis_run_theta0(cfg: Config, model: Any = None) -> Optional[Dict[str, Any]]:
    """The θ0 a training in another run's basis starts from: ``train.basis_run``'s ``theta0.pt``, verified
    against that run's manifest, when ``train.projection`` reads a basis run (None otherwise). The basis spans
    the directions the trajectory took from that θ0, so a training around any other point is another model:
    `raysub train CONFIG`, ``raysub l2o meta-train`` and ``l2o tune`` use it as their θ0, as ``raysub sweep``
    does, whatever their ``seed``.

    With ``model`` (the planned model): the state must be one of that model (same keys and shapes) and, where
    ``train.init_from`` set the model's weights, equal to them; it is then loaded into ``model``, so the run
    writes it as its own ``theta0.pt``.

    Raises:
        StorageError: the basis run's theta0.pt is missing, has no checksum in its manifest, or is corrupted.
        ConfigError: it is another model's θ0, or train.init_from names other weights.
    """
    # heavy: torch (imported by raysub.projections) loads here, not when this module is imported
    from raysub.projections import PROJECTIONS

    name, uri = cfg.train.projection, cfg.train.basis_run
    if not uri or name not in PROJECTIONS or not PROJECTIONS.meta(name).get("needs_basis_run"):
        return None
    source = RunDir(uri)
    state = source.read_theta0()
    if model is None:
        return state
    mine = model.state_dict()
    if set(mine) != set(state) or any(tuple(mine[k].shape) != tuple(state[k].shape) for k in mine):
        raise ConfigError(f"train.basis_run={uri} holds the θ0 of another model ({source.path(THETA0)}): use "
                          f"the model and data of that run, or sample a new run for this model")
    if cfg.train.init_from and not same_state(mine, state):
        raise ConfigError(f"train.init_from={cfg.train.init_from} sets θ0 to other weights than the θ0 the basis of "
                          f"train.basis_run={uri} was sampled from: drop train.init_from (the training then starts "
                          f"from that run's θ0), or build the basis from a run sampled with this train.init_from")
    model.load_state_dict(state)
    return state


def check_foreign_basis_theta0(cfg: Config, run: RunDir) -> None:
    """A training in another run's basis (``train.basis_run``) starts from this run's θ0, so the two θ0 must be
    the same: the basis spans the directions that run's trajectory took from its own θ0.

    Raises:
        ConfigError: they differ (another seed, model or ``train.init_from``).
    """
    if not cfg.train.basis_run or RunDir(cfg.train.basis_run).uri == run.uri:
        return
    theirs = basis_run_theta0(cfg)
    if theirs is not None and not same_state(run.read_theta0(), theirs):
        raise ConfigError(f"train.basis_run={cfg.train.basis_run} was sampled from another θ0 than {run.uri} (another "
                          f"seed, model or train.init_from): a training in its basis must start from its θ0; start a "
                          f"new run that takes it (raysub train CONFIG train.basis_run=...), or drop train.basis_run")


def subspace_run_checks(cfg: Config, info: Dict[str, Any]) -> Callable[[RunDir, bool], None]:
    """The checks of a run whose training reads no trajectory of its own (``raysub train CONFIG``, ``raysub l2o
    meta-train``), for `raysub.runs.open.open_run`'s ``checks``: the projection's (`check_train_projection`,
    ``train.basis_run`` for a family reading a basis) and, for such a family, that θ0 is the basis run's
    (`basis_run_theta0` loads it into ``info["model"]`` and records it as ``info["theta0_from"]``).

    Raises (when called):
        ConfigError: a projection problem, or a resumed run started around another θ0.
    """
    def checks(run: RunDir, resuming: bool) -> None:
        check_train_projection(cfg, info["num_params"], run, own_basis=False)
        theta0 = basis_run_theta0(cfg, info["model"])  # the basis run's θ0, not one seeded here
        if theta0 is not None:
            info["theta0_from"] = {"run": cfg.train.basis_run,
                                   "sha256": RunDir(cfg.train.basis_run).manifest_checksum(THETA0)}
            if resuming and run.exists(MANIFEST) and not same_state(run.read_theta0(), theta0):
                raise ConfigError(f"{run.path(THETA0)} is not the θ0 of train.basis_run={cfg.train.basis_run} "
                                  f"(the run was started around another point): start it again with --overwrite")

    return checks
