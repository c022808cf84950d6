"""Meta-training of φ on Ray (``raysub l2o meta-train``): the loop that drives the optimizee actors
(`raysub.l2o.optimizee`) and the learner (`raysub.l2o.learner`), meta-validation and the run's state.

- The **learner** (`meta_train`, on the driver): ``ray.put(φ)`` once per meta-step, gathers the optimizees'
  contributions, `combine` drops the bad ones, clips and averages, and `step_phi` Adam-steps φ.
- **Meta-validation** every k = ``l2o.validate_every`` meta-steps on ``l2o.validation_optimizees`` optimizees
  whose seeds are never trained on (fixed across validations, so φ's are compared on the same runs): N steps
  of the current φ on the train split, then accuracy on the held-out ``val`` split (``data.val_fraction`` > 0;
  the test split is never read). The best φ (highest mean val accuracy, ties → smaller mean convergence step)
  is RUN/l2o/weights.pt.

The meta-training state is a generation ``RUN/l2o/ckpt/GEN/``: ``checkpoint.pt`` (φ, Adam state, meta-step,
history, best φ, the optimizees in flight), ``weights.pt`` (best φ + config) and ``history.json`` (per meta-step
losses, validations, best). Each meta-validation writes a new generation beside the current one, then commits it
in ``manifest.json`` (θ0.pt, the config and the checksums, as `raysub.pipeline.run` does; ``stages.l2o.dir`` names
the generation), then deletes the older ones — as the basis stage does with ``basis/GEN/`` — so a kill at any
instant leaves the old state or the new one, and ``--resume`` works (`state_files`, `save_state`).
``RUN/l2o/weights.pt`` and ``RUN/l2o/history.json`` are copies of the committed generation's, for people and
tools (`settle_state`; weights readers resolve through the manifest, `raysub.l2o.weights`); runs written
before generations keep their state flat in ``RUN/l2o/`` and are read as they are. ``RUN/l2o/curves.png`` is the
meta-training loss and meta-validation curves (live ones in RUN/tensorboard/l2o and MLflow, `raysub.tracking`).
``--resume`` continues from the committed ``checkpoint.pt``: φ, Adam, the meta-step, the history and the
optimizees in flight (z, the learned optimizer's state, steps done, data cursor) go on, so a resumed run
reproduces the uninterrupted one bit for bit (checkpoints are taken at meta-validations: the meta-steps after the
last one are redone).

θ0: with a projection that reads ``train.basis_run`` (DLDR), every optimizee starts from the basis run's θ0 — the
point its basis was computed around — whatever ``seed`` says (`raysub.pipeline.plan.subspace_run_checks`), as
``raysub sweep`` does.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Any, Callable, Dict, List, Optional

import torch

from raysub.engine import cluster  # ensure_ray looked up when called: tests replace it
from raysub.errors import ConfigError, StorageError
from raysub.l2o.layout import CHECKPOINT, GENERATIONS, HISTORY, WEIGHTS, state_files
from raysub.l2o.learner import combine, mean_validation, pes_contributions, select, step_phi
from raysub.l2o.lstm import LearnedOptimizerConfig
from raysub.l2o.optimizee import _actor_class
from raysub.l2o.seeds import VALIDATION_SERIAL
from raysub.l2o.setup import initial_phi, l2o_problems, opt_config
from raysub.l2o.weights import save_learned_optimizer
from raysub.lock import fence
from raysub.pipeline.plan import describe_params, plan, subspace_run_checks
from raysub.report.plots import plot_l2o
from raysub.runs.manifest import Manifest
from raysub.runs.open import open_run
from raysub.runs.records import commit
from raysub.checksums import matches
from raysub.storage import join_uri
from raysub.tracking import Tracker

PLOT_EVERY_S = 60.0  # the learning curve RUN/plots/l2o.png is redrawn at most this often while meta-training runs

# may change on --resume: a longer budget, another split of the optimizees over the actors
RESUME_SAFE = ("l2o.meta_steps", "l2o.actors", "l2o.cpus_per_actor")  # optimizee states are kept by slot


def checked_plan(cfg, problems: List[str]) -> Dict[str, Any]:
    """`raysub.pipeline.plan.plan` of ``cfg`` (the task: data, model, projection), or ConfigError with its problems
    and ``problems`` (the l2o sections' own) together, so every bad input shows at once."""
    try:
        info = plan(cfg)
    except (ConfigError, StorageError) as exc:  # init_from's run is read too
        raise ConfigError(list(exc.problems) + problems) from None
    if problems:
        raise ConfigError(problems)
    return info


# ---------------------------------------------------------------------------------------------------------
# the meta-training state's generations in the run directory

def _is_state(rel: str) -> bool:
    return rel.startswith(f"{GENERATIONS}/") or rel in (CHECKPOINT, WEIGHTS, HISTORY)


def save_state(run, manifest: Manifest, checkpoint: Dict[str, Any], history: Dict[str, Any],
               config: LearnedOptimizerConfig, best_phi: Optional[Dict[str, torch.Tensor]],
               stage: Dict[str, Any]) -> str:
    """Write the meta-training state into a new generation ``l2o/ckpt/GEN/``, commit it (``stage`` as
    ``stages.l2o``), then delete every other generation and refresh the copies; returns GEN's path.

    Until the commit the manifest names the previous generation, whose files nothing touches: a kill at any
    instant leaves one complete, verified state for ``--resume``.

    Raises:
        RunLocked: another command took the run's lock over: nothing is committed.
    """
    gen = f"{GENERATIONS}/{uuid.uuid4().hex[:12]}"
    shards = {k: v for k, v in manifest.shards.items() if not _is_state(k)}
    shards[f"{gen}/checkpoint.pt"] = run.write_torch(f"{gen}/checkpoint.pt", checkpoint)
    if best_phi is not None:
        shards[f"{gen}/weights.pt"] = save_learned_optimizer(join_uri(run.uri, gen, "weights.pt"), config, best_phi)
    shards[f"{gen}/history.json"] = run.write_json(f"{gen}/history.json", history)
    manifest.shards = shards
    manifest.stages["l2o"] = {**stage, "dir": gen}
    fence(run)  # the lock still ours on storage: a command that took it over is not overwritten
    commit(run, manifest)
    settle_state(run, manifest)
    return gen


def settle_state(run, manifest: Manifest) -> None:
    """Tidy the meta-training state after ``manifest``'s commit (and on ``--resume``, for a save killed half-way):
    delete the generations it does not name (older ones, a killed save's) and a superseded flat checkpoint, and
    make ``l2o/weights.pt`` and ``l2o/history.json`` copies of the committed generation's. Copies, not records:
    readers of the weights resolve through the manifest (`raysub.l2o.weights`). Call under the run's lock."""
    gen = manifest.stages.get("l2o", {}).get("dir")
    if not gen:
        return  # nothing committed, or the flat layout: its files are the records themselves
    if run.exists(GENERATIONS):
        for name in run.listdir(GENERATIONS):
            if f"{GENERATIONS}/{name}" != gen:
                run.delete(GENERATIONS, name)
    if run.exists(CHECKPOINT):  # a run from before generations: its flat checkpoint is superseded
        run.delete(CHECKPOINT)
    files = state_files(manifest)
    for name, copy in (("weights.pt", WEIGHTS), ("history.json", HISTORY)):
        if name not in files:
            continue
        want = manifest.shards[files[name]]
        if run.exists(copy) and matches(run.read_bytes(copy), want):
            continue
        run.write_bytes(copy, run.read_bytes(files[name], want))


def meta_train(cfg, resume: bool = False, overwrite: bool = False, say=print,
               on_validation: Optional[Callable[[Dict[str, Any], Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """``raysub l2o meta-train``: meta-train φ on Ray under the run directory's lock; returns the history.

    ``on_validation(row, best)`` is called after each meta-validation has been checkpointed (``raysub l2o tune``
    reports to Tune from it); ``row`` and ``best`` are `history["validation"]` entries.

    Raises:
        ConfigError: a bad config (every problem at once) or run-directory state, before anything starts.
    """
    import ray  # here, not at the top: `checked_plan` and the state helpers run without Ray

    info = checked_plan(cfg, l2o_problems(cfg))
    lc = cfg.l2o
    # θ0.pt (every optimizee's: the basis run's for a projection that reads train.basis_run), config, manifest
    with open_run(cfg, resume=resume, overwrite=overwrite, say=say, also_safe=RESUME_SAFE, info=info,
                  uris=("basis_run", "init_from"), checks=subspace_run_checks(cfg, info),
                  start_ray=lambda: cluster.ensure_ray(cfg),
                  announce=lambda: f"{cfg.model.name} on {cfg.data.name}: {describe_params(cfg, info)}") as opened:
        run, resuming, manifest = opened.run, opened.resuming, opened.manifest
        manifest.config = cfg.to_dict()  # a resumed run records the budget it now runs to
        config = opt_config(cfg)
        phi = {k: v.clone().requires_grad_(True) for k, v in initial_phi(cfg).items()}
        adam = torch.optim.Adam(list(phi.values()), lr=lc.meta_lr)
        meta_step, history, best, best_phi = 0, {"meta": [], "validation": [], "best": None}, None, None
        phis: Dict[int, Dict[str, torch.Tensor]] = {}  # every validated φ, by meta-step (a later best can be any)
        states: Dict[int, Dict[str, Any]] = {}
        committed = state_files(manifest)
        if resuming:
            settle_state(run, manifest)
        if resuming and "checkpoint.pt" in committed:
            rel = committed["checkpoint.pt"]
            ck = run.read_torch(rel, manifest.shards[rel])
            with torch.no_grad():
                for k in phi:
                    phi[k].copy_(ck["phi"][k])
            adam.load_state_dict(ck["adam"])
            meta_step, history, best_phi, phis = ck["meta_step"], ck["history"], ck["best_phi"], ck["phis"]
            best = history["best"]
            states = ck.get("optimizees") or {}
            say(f"l2o: resuming at meta-step {meta_step}")
        run.makedirs("l2o")
        tracker = Tracker(cfg, run, "l2o")  # live curves: RUN/tensorboard/l2o, MLflow (raysub.tracking)

        plotted = [time.perf_counter()]  # when the curve was last drawn: the first one after PLOT_EVERY_S

        def checkpoint() -> None:
            """Save φ, Adam, history and the best weights as a new generation, committed (`save_state`)."""
            state = {"phi": {k: v.detach().clone() for k, v in phi.items()}, "adam": adam.state_dict(),
                     "meta_step": meta_step, "history": history, "best_phi": best_phi, "phis": phis,
                     "optimizees": {k: v for st in ray.get([a.states.remote() for a in actors])
                                    for k, v in st.items()}}
            manifest.summary["l2o"] = {"best": history["best"], "meta_steps": meta_step}
            save_state(run, manifest, state, history, config, best_phi,
                       {"meta_step": meta_step, "complete": meta_step >= lc.meta_steps})
            # a figure, not a record (not in the manifest): redrawn at the end and at most every PLOT_EVERY_S while
            # the run goes on (matplotlib takes ~0.5 s a figure: at every validation it was most of a small run)
            done = meta_step >= lc.meta_steps
            if history["validation"] and (done or time.perf_counter() - plotted[0] >= PLOT_EVERY_S):
                plot_l2o(run, history)
                plotted[0] = time.perf_counter()

        Actor = _actor_class(lc.cpus_per_actor)
        slots = [list(range(a, lc.optimizees, lc.actors)) for a in range(lc.actors)]
        actors = [Actor.remote(cfg.to_dict(), s, {k: states[k] for k in s if k in states}) for s in slots]
        t0 = time.perf_counter()

        def validate_and_checkpoint() -> None:
            nonlocal best, best_phi
            cur = {k: v.detach().clone() for k, v in phi.items()}
            cur_ref = ray.put(cur)
            serials = [VALIDATION_SERIAL + j for j in range(lc.validation_optimizees)]
            rows = ray.get([actors[j % len(actors)].validate.remote(cur_ref, s) for j, s in enumerate(serials)])
            row = mean_validation(rows, meta_step)
            row["wall_s"] = time.perf_counter() - t0
            history["validation"].append(row)
            phis[meta_step] = cur
            chosen = history["validation"][select(history["validation"], lc.select_tolerance, lc.select_by)]
            improved = chosen is not best
            if improved:
                best, best_phi = chosen, phis[chosen["meta_step"]]
                history["best"] = best
            cs = row["convergence_step"]
            loss = history["meta"][-1]["loss"] if history["meta"] else None
            say(f"l2o: meta-step {meta_step}/{lc.meta_steps}  train loss {'-' if loss is None else f'{loss:.4f}'}"
                f"  val acc {row['val_acc']:.4f}  conv step {'-' if cs is None else f'{cs:.1f}'}"
                f"  final loss {row['final_loss']:.4f}"
                f"  best: meta-step {best['meta_step']}  {row['wall_s']:.1f}s")
            checkpoint()
            tracker.log({k: v for k, v in row.items() if k != "wall_s"} | {"best_val_acc": best["val_acc"]},
                        meta_step)
            if on_validation is not None:
                on_validation(row, best)

        failed = True
        try:
            if not history["validation"]:  # the starting φ (e.g. the hand-built Adam-like one) is a candidate too
                validate_and_checkpoint()
            while meta_step < lc.meta_steps:
                phi_ref = ray.put({k: v.detach() for k, v in phi.items()})
                results = [r for rs in ray.get([a.unroll.remote(phi_ref, meta_step) for a in actors]) for r in rs]
                contributions = (pes_contributions(results, lc.pes_sigma) if lc.estimator == "pes" else
                                 [(r["name"], r["grads"], r["diverged"]) for r in results])
                avg, dropped, norm = combine(contributions, lc.grad_clip, say)
                if avg is not None:
                    step_phi(adam, phi, avg)
                else:
                    say(f"raysub: warning: meta-step {meta_step + 1}: every meta-gradient was dropped; φ unchanged")
                meta_step += 1
                finite = [r["meta_loss"] / len(r["losses"]) for r in results if math.isfinite(r["meta_loss"])]
                history["meta"].append({"meta_step": meta_step, "loss": sum(finite) / len(finite) if finite else None,
                                        "grad_norm": norm, "dropped": dropped,
                                        "replaced": [r["name"] for r in results if r["done"]],
                                        "wall_s": time.perf_counter() - t0})  # since this process started
                tracker.log({**history["meta"][-1], "num_dropped": len(dropped),
                             "num_replaced": len(history["meta"][-1]["replaced"])}, meta_step)
                if meta_step % lc.validate_every == 0 or meta_step == lc.meta_steps:
                    validate_and_checkpoint()
            if not history["validation"] or history["validation"][-1]["meta_step"] != meta_step:
                checkpoint()  # a resume of a finished run: nothing ran, the commit records it anyway
            failed = False
        finally:
            tracker.end(failed=failed)
            for a in actors:
                ray.kill(a)
        return history

