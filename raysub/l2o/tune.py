"""Ray Tune over the learned optimizer's meta-hyperparameters (``raysub l2o tune``).

``l2o_tune.space`` maps ``l2o`` keys (`SPACE_KEYS`: hidden size, meta-lr, unroll T, step scale, number of
optimizees, input features, the rule, the estimator, the horizon range, the late weighting, the meta-loss, the
Adam lr) to lists of choices. The search is random: ``l2o_tune.samples`` distinct points of the
space's product drawn with ``l2o_tune.seed`` (without replacement — two equal points would be the same meta-training
twice, bit for bit; a space smaller than ``samples`` runs whole). Each trial is `meta_train` of the ``l2o`` section
with the point's values, in its own run directory ``RUN/trials/NAME`` (its own weights.pt, history, checkpoint).
Its Tune actor reserves no CPU (the sweep's `DRIVER_RESOURCES`); its ``l2o.actors`` optimizee actors reserve
``l2o.cpus_per_actor`` each, in the trial's placement group (`trial_resources`), so the trials that run at once
are as many as those fit (``max_concurrent_trials`` lowers it) and a trial starts only when all its actors fit.

Metric. Every meta-validation reports, among others, ``best_conv_step``: the convergence step (SL2O §4.1,
`raysub.metrics.convergence_step`) of the trial's best φ so far — the φ it would ship if stopped now — where a φ
that never converged counts as ``l2o.steps + 1``, worse than any that did (`asha_metric`). ASHA (time attribute
``meta_step``, rungs every ``grace_period`` × ``validate_every`` meta-steps × ``reduction_factor``^k, up to
``l2o.meta_steps``) stops the trials whose best φ converges slowest.

Best trial. `raysub.l2o.learner.select` over the trials' best φ's — the rule that picked each trial's best φ: the
fastest mean convergence step among the φ's within ``l2o.select_tolerance`` val accuracy of the most accurate —
so the experiment's weights are the best φ of every trial under one rule (`best_trial`). Convergence step alone is
not the final criterion: a φ that barely moves z converges at once (a flat loss passes the std test), so it
prunes, while accuracy bounds what may win. Trials run ASHA stopped
are candidates too (their best φ was validated like any other). Every trial has the same validation optimizees
(``l2o.seed``, ``l2o.steps`` and ``l2o.validation_optimizees`` are not in the space), so their numbers compare.

Outputs: ``RUN/l2o_tune/results.json`` (every trial: its point, best val acc and convergence step, meta-steps done,
whether ASHA stopped it, meta-training seconds), ``RUN/l2o_tune/best_config.yaml`` (the best trial's full config,
runnable by ``raysub l2o meta-train``; its run_dir is the trial's own, and its header's resume line names the
trial relative to the tuning's directory, `best_config_header`), ``RUN/l2o/weights.pt`` (its φ, verified against
the trial's manifest when copied and against ``results.json``'s ``weights_sha256`` when read, so
``train.optimizer_options.weights=RUN`` meta-tests it), the table on the console. The Tune experiment is
``RUN/tune/l2o``; ``--resume`` restores it (`Tuner.restore`): finished trials stay, an unfinished one restarts and
its meta-training goes on from its own committed checkpoint (`meta_train` with resume). Ctrl-C stops Tune
gracefully (`raysub.engine.tune_runner.fit_tuner`) and the CLI prints the ``--resume`` command.
"""
from __future__ import annotations

import copy
import math
import os
import posixpath
import random
import time
from typing import Any, Dict, List, Optional, Sequence
import re

from raysub.engine import cluster  # ensure_ray looked up when called: tests replace it
from raysub.errors import ConfigError, StorageError
from raysub.l2o.layout import state_files
from raysub.runs import layout
from raysub.runs.manifest import Manifest
from raysub.report.tables import tune_table
from raysub.config import Config
from raysub.l2o.setup import l2o_problems
from raysub.l2o.meta_train import checked_plan, meta_train
from raysub.pipeline.plan import check_train_projection
from raysub.storage import RunDir, join_uri
from raysub.engine.tune_runner import DRIVER_RESOURCES, fit_tuner
from raysub.l2o.learner import select
from raysub.runs.open import open_run
from raysub.tracking import tune_callbacks

SPACE_KEYS = ("hidden_size", "meta_lr", "unroll", "step_scale", "optimizees", "features", "rule", "estimator",
              "horizons", "late_weight", "meta_loss", "adam_lr")
_SHORT = {"rule": "r", "estimator": "e", "hidden_size": "h", "meta_lr": "lr", "unroll": "T", "step_scale": "s",
          "optimizees": "n", "features": "f", "horizons": "H", "late_weight": "w", "meta_loss": "L", "adam_lr": "a"}
EXPERIMENT = "l2o"  # the Tune experiment: RUN/tune/l2o
RESULTS, BEST_CONFIG, BEST_WEIGHTS = layout.L2O_TUNE_RESULTS, layout.L2O_TUNE_BEST_CONFIG, layout.L2O_WEIGHTS


# ---------------------------------------------------------------------------------------------------------
# checks: every problem at once, before Ray starts or anything is written

def _mentions(problem: str, key: str) -> bool:
    """Whether an `l2o_problems` line is about ``l2o.KEY`` (its lines name the keys they are about)."""

    return re.search(rf"\bl2o\.{key}\b", problem) is not None


def tune_problems(cfg) -> List[str]:
    """Problems of the ``l2o_tune`` section and of the ``l2o`` section its trials run (one line each).

    The ``l2o`` section is checked with every choice of every space key in turn (``l2o_problems`` of the trial
    config that has it); a problem about a key the space sets is reported as that choice's, not the section's.
    """

    tc = cfg.l2o_tune
    space = tc.space
    problems: List[str] = []
    allowed = ", ".join(SPACE_KEYS)
    if not space:
        problems.append(f"l2o_tune.space is empty: give lists of choices for one or more of {allowed}, e.g. "
                        f"l2o_tune.space={{hidden_size: [8, 20]}}")
    for key, choices in space.items():
        if key not in SPACE_KEYS:
            problems.append(f"l2o_tune.space: unknown key {key!r}: the space may set {allowed}")
        elif not isinstance(choices, list):
            problems.append(f"l2o_tune.space.{key}={choices!r}: give a list of choices, e.g. "
                            f"l2o_tune.space.{key}=[{choices!r}]")
        elif not choices:
            problems.append(f"l2o_tune.space.{key} is an empty choice: give one or more values, or remove the key to "
                            f"keep l2o.{key}={getattr(cfg.l2o, key)!r}")
        elif any(choices.index(c) != i for i, c in enumerate(choices)):
            problems.append(f"l2o_tune.space.{key}={choices}: repeats a value: a repeated choice runs the same "
                            f"meta-training twice; list each value once")
    for key, value in (("l2o_tune.samples", tc.samples), ("l2o_tune.max_concurrent_trials", tc.max_concurrent_trials),
                       ("l2o_tune.grace_period", tc.grace_period)):
        if value is not None and value < 1:
            problems.append(f"{key}={value}: must be ≥ 1")
    if tc.reduction_factor < 2:
        problems.append(f"l2o_tune.reduction_factor={tc.reduction_factor}: must be ≥ 2 (ASHA keeps 1 in that many)")

    # the l2o section, without the keys the space sets (each trial replaces them) ...
    swept = [k for k in SPACE_KEYS if isinstance(space.get(k), list) and space[k]]
    problems += [p for p in l2o_problems(cfg) if not any(_mentions(p, k) for k in swept)]
    # ... and each choice in the section (type checks by Config.from_dict, ranges by l2o_problems)
    base = cfg.to_dict()
    for key in swept:
        for value in space[key]:
            try:
                trial = Config.from_dict(trial_config(base, {key: value}, cfg.run_dir))
                found = [p for p in l2o_problems(trial) if _mentions(p, key)]
            except ConfigError as exc:
                found = list(exc.problems)
            problems += [f"l2o_tune.space.{key}: choice {value!r}: {p}" for p in found]
    return problems


def plan_tune(cfg) -> Dict[str, Any]:
    """Validate ``raysub l2o tune`` without starting Ray or writing anything.

    Returns:
        {"num_params", "points"}: the model's size and the trials' points of the space.
    Raises:
        ConfigError: every problem found, in one message.
    """

    info = checked_plan(cfg, tune_problems(cfg))
    # an optimizee task whose projection reads a basis needs train.basis_run (as for meta-train)
    check_train_projection(cfg, info["num_params"], RunDir(cfg.run_dir), own_basis=False)
    return {"num_params": info["num_params"],
            "points": sample_points(cfg.l2o_tune.space, cfg.l2o_tune.samples, cfg.l2o_tune.seed)}


# ---------------------------------------------------------------------------------------------------------
# the search space and the trials

def sample_points(space: Dict[str, List[Any]], samples: int, seed: int) -> List[Dict[str, Any]]:
    """``samples`` distinct points of the product of ``space`` drawn at random with ``seed`` (all of them, in a
    random order, when there are fewer); each point's keys in `SPACE_KEYS` order."""
    keys = [k for k in SPACE_KEYS if k in space]
    sizes = [len(space[k]) for k in keys]
    picks = random.Random(seed).sample(range(math.prod(sizes)), min(samples, math.prod(sizes)))
    points = []
    for index in picks:  # index → one choice per key (mixed radix, the last key fastest)
        point = {}
        for key, size in zip(reversed(keys), reversed(sizes)):
            index, j = divmod(index, size)
            point[key] = copy.deepcopy(space[key][j])
        points.append({k: point[k] for k in keys})
    return points


def trial_config(base: Dict[str, Any], point: Dict[str, Any], run_dir: str) -> Dict[str, Any]:
    """One trial's config (a plain dict, as Ray ships it): ``base`` with the point's ``l2o`` values, meta-trained
    in ``run_dir``."""
    cfg = copy.deepcopy(base)
    cfg["l2o"].update(copy.deepcopy(point))
    cfg["run_dir"] = run_dir
    return cfg


def trial_name(point: Dict[str, Any], trial_id: str) -> str:
    """``h8-lr0.01-T5-fmg-<trial id>``: the point's values, short, then Tune's trial id (unique in the
    experiment), e.g. ``h8-lr0.01-T5-fmg-3f2a1_00000``."""
    def text(v):
        if isinstance(v, list):
            v = [str(x) for x in v]
            return "".join(v) if all(len(s) == 1 for s in v) else "+".join(v)
        return f"{v:g}" if isinstance(v, float) else str(v)

    return "-".join([f"{_SHORT[k]}{text(v)}" for k, v in point.items()] + [trial_id])


def _tune_trial_name(trial) -> str:
    return trial_name(trial.config["point"], trial.trial_id)


def trials_uri(run_uri: str, name: str) -> str:
    """The run directory of trial ``name`` (a URI's query kept at the end)."""

    return join_uri(run_uri, "trials", name)


def asha_key(cfg) -> str:
    """What ASHA minimizes: the best φ's convergence step, or with ``l2o.select_by=final_loss`` its final loss."""
    return "best_final_loss" if cfg.l2o.select_by == "final_loss" else "best_conv_step"


def asha_metric(convergence_step: Optional[float], steps: int) -> float:
    """The convergence step ASHA minimizes: a φ that never converged (None) counts as ``steps + 1``, worse than
    any that did within the ``steps`` steps of a meta-validation."""
    return float(steps + 1) if convergence_step is None else float(convergence_step)


def _trial(config: Dict[str, Any], base: Dict[str, Any]) -> None:
    """The Tune function trainable: one meta-training run, reporting each meta-validation to Tune.

    Always ``resume=True``: a trial Tune restarts (after a failure, or on ``--resume``) goes on from its run
    directory's checkpoint; a directory without one starts afresh."""
    # heavy: ray loads here, not when this module is imported
    from ray import tune


    name = tune.get_context().get_trial_name()
    cfg = Config.from_dict(trial_config(base, config["point"], trials_uri(base['run_dir'], name)))
    cfg.tracking.mlflow = False  # the experiment's MLflowLoggerCallback has this trial's run (raysub.tracking)
    steps = cfg.l2o.steps

    def on_validation(row: Dict[str, Any], best: Dict[str, Any]) -> None:
        tune.report({"meta_step": row["meta_step"], "val_acc": row["val_acc"],
                     "conv_step": asha_metric(row["convergence_step"], steps),
                     "best_val_acc": best["val_acc"], "best_conv_step": asha_metric(best["convergence_step"], steps),
                     "best_final_loss": best.get("final_loss", math.inf),
                     "best_meta_step": best["meta_step"]})

    meta_train(cfg, resume=True, on_validation=on_validation)


def trial_resources(cfg):
    """A trial's placement group: its own bundle reserves no CPU (`DRIVER_RESOURCES`, as the sweep's DDP trial),
    then one bundle of ``l2o.cpus_per_actor`` CPUs per optimizee actor. A Tune trial's child actors are scheduled
    in its placement group, so the actors take these bundles; Tune starts a trial only when all of them fit, so
    no trial ever holds half of the CPUs its actors need."""
    # heavy: ray loads here, not when this module is imported
    from ray import tune


    return tune.PlacementGroupFactory([dict(DRIVER_RESOURCES)] + [{"CPU": cfg.l2o.cpus_per_actor}] * cfg.l2o.actors)


def concurrency(cfg, num_trials: int, say=print) -> int:
    """Trials at once: as many as the cluster's CPUs fit (``l2o.actors`` × ``l2o.cpus_per_actor`` each), at most
    ``l2o_tune.max_concurrent_trials`` and the number of trials.

    Raises:
        ConfigError: one trial's actors need more CPUs than the whole cluster has.
    """
    # heavy: ray loads here, not when this module is imported
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    need = cfg.l2o.actors * cfg.l2o.cpus_per_actor
    if need > cpus:
        raise ConfigError(f"one trial needs l2o.actors={cfg.l2o.actors} × l2o.cpus_per_actor="
                          f"{cfg.l2o.cpus_per_actor:g} = {need:g} CPUs but the Ray cluster has {cpus:g}: lower them "
                          f"or add nodes")
    fit = int(cpus / need + 1e-9)
    want = cfg.l2o_tune.max_concurrent_trials
    if want is not None and want > fit:
        say(f"raysub: warning: l2o_tune.max_concurrent_trials={want} ignored: the cluster's {cpus:g} CPUs fit "
            f"{fit} trials of {need:g} CPUs at once")
    return max(1, min(fit, want or fit, num_trials))


# ---------------------------------------------------------------------------------------------------------
# results

def meta_train_seconds(history: Dict[str, Any]) -> float:
    """A trial's meta-training time from its history: a validation's ``wall_s`` counts from its process's start,
    so each resumed process is a segment; the sum of the segments' last values (the meta-steps redone after a
    resume count once per run)."""
    total, last = 0.0, 0.0
    for row in history["validation"]:
        if row["wall_s"] < last:
            total += last
        last = row["wall_s"]
    return total + last


def best_trial(rows: Sequence[Dict[str, Any]], tolerance: float, by: str = "speed") -> Optional[Dict[str, Any]]:
    """The trial whose best φ wins under `raysub.l2o.learner.select` over the trials' best φ's (the fastest
    convergence step, or with ``by="final_loss"`` the lowest final loss, among those within ``tolerance`` val
    accuracy of the most accurate; ties → higher val accuracy, then the earlier trial); None when no trial has a
    validated φ."""

    ok = [r for r in rows if "error" not in r and r.get("best") is not None]
    i = select([r["best"] for r in ok], tolerance, by)
    return None if i is None else ok[i]


def _trial_row(result, cfg, run) -> Dict[str, Any]:
    """One trial's row, from its Tune result (error or not) and its own run directory (history, weights)."""

    name = os.path.basename(result.path.rstrip("/"))
    trial_run = RunDir(trials_uri(run.uri, name))
    row: Dict[str, Any] = {"trial": name, "run_dir": trial_run.uri,
                           "point": result.config["point"] if result.config else None}
    history = None
    manifest = Manifest.peek(trial_run)  # empty for a trial killed before its first commit
    rel = state_files(manifest).get("history.json")
    if rel is not None:  # the committed history (a trial killed mid-save has its previous one)
        history = trial_run.read_json(rel, manifest.shards[rel])
        if row["point"] is None:  # a trial whose result has no config: its run's own
            config = manifest.config["l2o"]
            row["point"] = {k: config[k] for k in SPACE_KEYS if k in cfg.l2o_tune.space}
    if result.error is not None:
        row["error"] = str(result.error).strip().splitlines()[-1]
    elif history is None or not history["validation"]:
        row["error"] = "no meta-validation recorded"
    if history is not None and history["validation"]:
        done = history["validation"][-1]["meta_step"]
        row.update(best=history["best"], meta_steps=done, validations=len(history["validation"]),
                   stopped_early=("error" not in row and done < cfg.l2o.meta_steps),
                   meta_train_s=meta_train_seconds(history))
    return row


def best_weights(trial_run) -> bytes:
    """The committed best φ of a trial's meta-training (``weights.pt`` of the generation its manifest names),
    verified against the manifest.

    Raises:
        StorageError: the trial has no committed weights, or they are corrupted.
    """
    manifest = Manifest.peek(trial_run)
    rel = state_files(manifest).get("weights.pt")
    if rel is None:
        raise StorageError(f"{trial_run.uri} has no committed learned-optimizer weights: continue the tuning with "
                           f"--resume")
    return trial_run.read_bytes(rel, manifest.shards[rel]).to_pybytes()


def best_config_header(trial: str, best: Dict[str, Any]) -> str:
    """``best_config.yaml``'s header. Its resume line names the config and the trial relative to the tuning's
    directory, so it holds wherever that directory is moved or copied; the ``run_dir`` in the file is where the
    trial was when the file was written, which the line's ``run_dir=`` replaces."""
    return (f"# best trial {trial} of this `raysub l2o tune`: val acc {best['val_acc']:.4f}, conv step "
            f"{best['convergence_step']}, at meta-step {best['meta_step']}\n"
            f"# its meta-training is the run directory trials/{trial} beside l2o_tune/; continue it (e.g. with more "
            f"l2o.meta_steps) from the tuning's directory:\n"
            f"#   raysub l2o meta-train {BEST_CONFIG} run_dir=trials/{trial} --resume\n")


# ---------------------------------------------------------------------------------------------------------
# driver

def tune_l2o(cfg, resume: bool = False, overwrite: bool = False, say=print) -> Dict[str, Any]:
    """``raysub l2o tune``: check everything, then run the Tune experiment under the run directory's lock; write
    and print the results.

    Returns:
        The summary written to ``RUN/l2o_tune/results.json``.
    Raises:
        ConfigError: a bad config or space (every problem at once, nothing written), run-directory state, or trials
            that did not finish (naming the ``--resume`` command).
    """

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: pick one")
    info = plan_tune(cfg)
    # trials run in other processes and directories: train.basis_run and init_from as absolute paths or URIs; each
    # trial's meta_train checks the cluster the same way (grow=False): fail once, here; the trials write their θ0
    with open_run(cfg, resume=resume, overwrite=overwrite, say=say, uris=("basis_run", "init_from"),
                  start_ray=lambda: cluster.ensure_ray(cfg, grow=False)) as opened:
        return _tune(cfg, info, opened.run, opened.resuming, say)


def _tune(cfg, info: Dict[str, Any], run, resuming: bool, say) -> Dict[str, Any]:
    # heavy: ray loads here, not when this module is imported
    from ray import tune


    points = info["points"]
    max_concurrent = concurrency(cfg, len(points), say)  # raises before anything is written
    t0 = time.perf_counter()
    if not resuming:
        run.clear()
    run.makedirs()
    run.write_text(layout.CONFIG, cfg.to_yaml(f"# resolved config of this tuning; rerun: raysub l2o tune "
                                              f"{run.arg(layout.CONFIG)} --overwrite\n"))
    storage, fs = run.ray_storage("tune")  # the filesystem object, so a URI's endpoint reaches Tune
    path = posixpath.join(storage, EXPERIMENT)
    trainable = tune.with_resources(tune.with_parameters(_trial, base=cfg.to_dict()), trial_resources(cfg))
    lc, tc = cfg.l2o, cfg.l2o_tune
    if resuming and tune.Tuner.can_restore(path, storage_filesystem=fs):
        say(f"[l2o tune] restoring {run.child('tune', EXPERIMENT).uri}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        scheduler = None
        if tc.asha:
            # heavy: ray loads here, not when this module is imported
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="meta_step", max_t=lc.meta_steps,
                                      grace_period=min(tc.grace_period * lc.validate_every, lc.meta_steps),
                                      reduction_factor=tc.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search(points)},  # the random draw, made by sample_points
            tune_config=tune.TuneConfig(metric=asha_key(cfg), mode="min", scheduler=scheduler,
                                        max_concurrent_trials=max_concurrent, reuse_actors=False,
                                        trial_name_creator=_tune_trial_name, trial_dirname_creator=_tune_trial_name),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage, storage_filesystem=fs, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=cfg.cluster.max_failures),
                                      callbacks=tune_callbacks(cfg, run, "l2o_tune")),  # MLflow (raysub.tracking)
        )
    say(f"[l2o tune] {len(points)} trials of {lc.meta_steps} meta-steps ({lc.actors} actor(s) × "
        f"{lc.cpus_per_actor:g} CPU each), {max_concurrent} at a time; space: "
        f"{', '.join(f'{k} {v}' for k, v in tc.space.items())}; ASHA {'on' if tc.asha else 'off'}")
    grid = fit_tuner(tuner)
    # in the order Tune created the trials (a restored ResultGrid has another): ties go to the same trial
    rows = sorted((_trial_row(result, cfg, run) for result in grid), key=lambda r: r["trial"].rsplit("-", 1)[-1])
    failed = [r for r in rows if "error" in r]
    if failed:
        raise ConfigError(f"{len(failed)} of {len(rows)} trials did not finish (first: {failed[0]['trial']}: "
                          f"{failed[0]['error']}); fix the cause and continue with: raysub l2o tune "
                          f"{run.arg(layout.CONFIG)} --resume")
    best = best_trial(rows, cfg.l2o.select_tolerance, cfg.l2o.select_by)
    assert best is not None  # every trial has a validated φ (no failed ones)

    weights = best_weights(RunDir(best["run_dir"]))
    checksum = run.write_bytes(BEST_WEIGHTS, weights)
    best_cfg = Config.from_dict(trial_config(cfg.to_dict(), best["point"], best["run_dir"]))
    b = best["best"]
    run.write_text(BEST_CONFIG, best_cfg.to_yaml(best_config_header(best["trial"], b)))
    summary = {"space": tc.space, "space_keys": [k for k in SPACE_KEYS if k in tc.space], "samples": len(points),
               "seed": tc.seed, "asha": tc.asha, "meta_steps": lc.meta_steps,
               "steps": lc.validation_steps or lc.steps,  # of a validation run
               "validation_optimizees": lc.validation_optimizees, "max_concurrent": max_concurrent,
               "select_tolerance": lc.select_tolerance,
               "selection": f"{'lowest final loss' if cfg.l2o.select_by == 'final_loss' else 'fastest convergence step'}"
                            f" within {cfg.l2o.select_tolerance} val acc of the best (raysub.l2o.learner.select)",
               "asha_metric": ("best_final_loss: the best φ's smoothed training loss at the end of its validation "
                               "runs" if cfg.l2o.select_by == "final_loss" else
                               "best_conv_step: the best φ's convergence step, never converged = l2o.steps + 1"),
               "trials": rows, "best": {"trial": best["trial"], "point": best["point"], "run_dir": best["run_dir"],
                                        **b, "weights_sha256": checksum},
               "wall_s": time.perf_counter() - t0}
    run.write_json(RESULTS, summary)
    say(tune_table(summary))
    say(f"best: {best['trial']} (val acc {100 * b['val_acc']:.2f}%); weights {run.arg(BEST_WEIGHTS)} "
        f"(train.optimizer_options.weights={run.uri}), config {run.arg(BEST_CONFIG)}, results {run.arg(RESULTS)}")
    say(f"[l2o tune] wall time {summary['wall_s']:.1f}s")
    return summary
