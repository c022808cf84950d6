"""Meta-training of φ on Ray (``raysub l2o meta-train``): optimizee actors, the learner, meta-validation.

- An **optimizee** is the ``train`` section's task (`build_task`: θ0, projection P, model, dataset) plus a
  data-order seed and a start z0 ~ N(0, σ²) drawn from that seed (σ = ``l2o.z0_std``). It runs N = ``l2o.steps``
  steps in unrolls of T = ``l2o.unroll`` (the last one shorter when T does not divide N); then it is replaced by
  a fresh one (the next serial number: a new seed and z0).
- An `OptimizeeWorker` owns some optimizees (each with its own `Task`); `OptimizeeActor` is it as a Ray actor.
  ``unroll(φ)`` runs one unroll of each with `unroll_meta_grad` and returns, per optimizee, (name, meta-grad,
  losses, done).
- The **learner** (`meta_train`, on the driver): ``ray.put(φ)`` once per meta-step, gathers the contributions,
  `combine` drops non-finite ones (saying which optimizee), averages, clips by global norm, and Adam steps φ.
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
point its basis was computed around — whatever ``seed`` says (`raysub.pipeline.run.new_subspace_run`), as
``raysub sweep`` does.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from raysub.errors import ConfigError, StorageError
from raysub.l2o.lstm import LearnedOptimizerConfig, adam_like_params, init_params, init_state, update
from raysub.l2o.meta import start, unroll_meta_grad
# the run's state files and the optimizees' seeds live below this module (the weights reader and meta-test need them
# too); the names stay importable from here
from raysub.l2o.layout import CHECKPOINT, GENERATIONS, HISTORY, STATE_FILES, WEIGHTS, state_files  # noqa: F401
from raysub.l2o.seeds import SEED_STRIDE, VALIDATION_SERIAL, optimizee_seed  # noqa: F401

# may change on --resume: a longer budget, another split of the optimizees over the actors
DIVERGED_FACTOR = 10.0  # an optimizee whose loss exceeds 10× its loss at z0 has diverged (dropped, replaced)
RESUME_SAFE = ("l2o.meta_steps", "l2o.actors", "l2o.cpus_per_actor")  # optimizee states are kept by slot


# ---------------------------------------------------------------------------------------------------------
# config

def l2o_problems(cfg) -> List[str]:
    """Problems of the ``l2o`` section (one line each); empty: fine."""
    from raysub.config import positive

    lc = cfg.l2o
    problems: List[str] = []
    for key in ("hidden_size", "step_scale", "meta_lr", "unroll", "steps", "optimizees", "actors",
                "cpus_per_actor", "meta_steps", "validate_every", "validation_optimizees", "grad_clip"):
        positive(problems, f"l2o.{key}", getattr(lc, key))
    positive(problems, "l2o.z0_std", lc.z0_std, allow_zero=True)
    positive(problems, "l2o.init_gain", lc.init_gain)
    if not 0 <= lc.select_tolerance <= 1:
        problems.append(f"l2o.select_tolerance={lc.select_tolerance}: must be in [0, 1] (an accuracy difference, "
                        f"e.g. 0.005 for half a point)")
    if lc.unroll > 0 and lc.steps > 0 and lc.unroll > lc.steps:
        problems.append(f"l2o.unroll={lc.unroll} exceeds l2o.steps={lc.steps}: an unroll (T) is part of one "
                        f"optimizee's N steps; lower l2o.unroll or raise l2o.steps")
    if lc.actors > 0 and lc.optimizees > 0 and lc.actors > lc.optimizees:
        problems.append(f"l2o.actors={lc.actors} exceeds l2o.optimizees={lc.optimizees}: an actor would own no "
                        f"optimizee; lower l2o.actors or raise l2o.optimizees")
    if lc.meta_loss not in ("sum", "log"):
        problems.append(f"l2o.meta_loss={lc.meta_loss!r}: choose sum (Σ L_t, SL2O) or log (Σ log L_t)")
    if lc.init not in ("adam_like", "random"):
        problems.append(f"l2o.init={lc.init!r}: choose adam_like or random")
    elif lc.init == "adam_like" and "m" not in lc.features:
        problems.append(f"l2o.init=adam_like needs the 'm' feature (l2o.features={list(lc.features)}): add it or "
                        f"set l2o.init=random")
    if cfg.data.val_fraction <= 0:
        problems.append("data.val_fraction=0: meta-validation selects φ on a held-out validation split, never on "
                        "test; set data.val_fraction (e.g. 0.1)")
    try:
        opt_config(cfg)
    except ConfigError as exc:
        problems += [f"l2o.{p}" for p in exc.problems]
    except TypeError as exc:
        problems.append(f"l2o: {exc}")
    return problems


def opt_config(cfg) -> LearnedOptimizerConfig:
    """φ's config from the ``l2o`` section."""
    lc = cfg.l2o
    return LearnedOptimizerConfig(hidden_size=lc.hidden_size, features=tuple(lc.features), step_scale=lc.step_scale)


INIT_NOISE = 0.1  # adam_like: the input and output weights of hidden units 1.. start at 0.1 × torch's random init


def initial_phi(cfg) -> Dict[str, torch.Tensor]:
    """φ's start. ``random``: torch's LSTMCell init from ``l2o.seed``. ``adam_like``: the hand-built tanh-clipped
    Adam (`adam_like_params`: Δz ≈ −step_scale·tanh(init_gain·m̂/√v̂), on hidden unit 0 alone) with the input
    weights (``lstm.weight_ih``) and output weights of units 1.. set to ``INIT_NOISE`` × the random init.

    Without that the other units would stay at 0 for good (their h is 0, so their output weights get no
    gradient, and nothing reaches their input weights through a zero output weight). Biases and recurrent
    weights stay 0, so those units' h is an odd function of the features — a step of ~1e-3 × m̂/√v̂, with no
    constant drift (noise on the biases would push every coordinate the same way every step: it wrecks the
    start, measured val accuracy 0.36 instead of 0.90 on Fashion-MNIST LeNet-5 d = 40)."""
    config = opt_config(cfg)
    rand = init_params(config, seed=cfg.l2o.seed)
    if cfg.l2o.init == "random":
        return rand
    phi = adam_like_params(config, gain=cfg.l2o.init_gain)
    h = config.hidden_size
    others = torch.ones(h, dtype=torch.bool)
    others[0] = False
    rows = others.repeat(4)  # gate rows i, f, g, o of units 1..
    phi["lstm.weight_ih"][rows] = INIT_NOISE * rand["lstm.weight_ih"][rows]
    phi["out.weight"][others] = INIT_NOISE * rand["out.weight"][others]
    return phi


# ---------------------------------------------------------------------------------------------------------
# optimizees and the actor

class Optimizee:
    """One optimizee's running state: z, the learned optimizer's state, (L, g) at z, steps done, data cursor."""

    def __init__(self, cfg, task, serial: int, config: LearnedOptimizerConfig, horizon: Optional[int] = None):
        self.cfg, self.task, self.serial = cfg, task, serial
        self.horizon = cfg.l2o.steps if horizon is None else horizon  # steps before it is replaced
        self.seed = optimizee_seed(cfg, serial)
        gen = torch.Generator().manual_seed(self.seed)
        self.z = torch.randn(task.dim, generator=gen) * cfg.l2o.z0_std
        self.state = init_state(config, task.dim)
        self.step = 0
        self.epoch, self.cursor, self.order = 0, 0, None
        self.loss = self.g = None
        self.loss_start: Optional[float] = None  # the loss at z0: `DIVERGED_FACTOR` × it means diverged

    @property
    def name(self) -> str:
        return f"optimizee {self.serial} (seed {self.seed})"

    def next_batches(self, n: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The next ``n`` training batches of this optimizee's data order (epochs as `epoch_batches` cuts them)."""
        from raysub.engine.loop import epoch_batches, mix_seed

        cfg, data = self.cfg, self.task.data
        batch = cfg.train.batch_size or cfg.data.batch_size
        out = []
        while len(out) < n:
            if self.order is None or self.cursor >= len(self.order):
                if self.order is not None:
                    self.epoch += 1
                self.order, self.cursor = epoch_batches(data.size("train"), batch, self.seed, self.epoch, 0, 1), 0
            take = self.order[self.cursor : self.cursor + n - len(out)]
            self.cursor += len(take)
            out += list(data.batches("train", take, augment=cfg.data.augment, seed=mix_seed(self.seed, self.epoch)))
        return out


class OptimizeeWorker:
    """Owns the optimizees of ``slots`` (each with its own `Task`); `OptimizeeActor` is this class on Ray.

    Args:
        cfg_dict: The run's config (`Config.to_dict`).
        slots: Which of the ``l2o.optimizees`` slots it owns; slot s runs serials s, s + n, s + 2n, …
        states: `states` of a checkpoint, by slot: those optimizees go on where they were (others start fresh).
    """

    def __init__(self, cfg_dict: Dict[str, Any], slots: Sequence[int],
                 states: Optional[Dict[int, Dict[str, Any]]] = None):
        from raysub.config import Config
        from raysub.data import open_dataset
        from raysub.engine.loop import setup_threads
        from raysub.engine.task import build_task

        setup_threads()
        self.cfg = Config.from_dict(cfg_dict)
        self.config = opt_config(self.cfg)
        data = open_dataset(self.cfg)
        self.slots = list(slots)
        self.tasks = {s: build_task(self.cfg, data=data) for s in self.slots}
        self.generation = {s: 0 for s in self.slots}
        self.live = {s: self._fresh(s) for s in self.slots}
        for s, st in (states or {}).items():
            if s in self.live:
                self._restore(s, st)

    def states(self) -> Dict[int, Dict[str, Any]]:
        """The optimizees in flight, by slot: everything `_restore` needs to go on bit for bit."""
        out = {}
        for s, o in self.live.items():
            out[s] = {"serial": o.serial, "generation": self.generation[s], "z": o.z, "state": o.state,
                      "step": o.step, "epoch": o.epoch, "cursor": o.cursor, "started": o.order is not None,
                      "loss": o.loss, "g": o.g, "horizon": o.horizon, "loss_start": o.loss_start}
        return out

    def _restore(self, slot: int, st: Dict[str, Any]) -> None:
        from raysub.engine.loop import epoch_batches

        o = Optimizee(self.cfg, self.tasks[slot], st["serial"], self.config, st.get("horizon"))
        o.z, o.state, o.step, o.loss, o.g = st["z"], st["state"], st["step"], st["loss"], st["g"]
        o.epoch, o.cursor, o.loss_start = st["epoch"], st["cursor"], st.get("loss_start")
        if st["started"]:
            batch = self.cfg.train.batch_size or self.cfg.data.batch_size
            o.order = epoch_batches(o.task.data.size("train"), batch, o.seed, o.epoch, 0, 1)
        self.generation[slot] = st["generation"]
        self.live[slot] = o

    def _fresh(self, slot: int) -> Optimizee:
        serial, horizon = self._next(slot)
        return Optimizee(self.cfg, self.tasks[slot], serial, self.config, horizon)

    def _next(self, slot: int) -> Tuple[int, int]:
        """(serial, horizon) of the slot's next optimizee. Staggered starts: the first optimizee of slot s stops
        after N − s·⌊N/n⌋ steps (whole unrolls), so the optimizees in flight are at different points of their
        N steps and each meta-step mixes early and late training (in sync, φ would see only early losses for a
        while, then only late ones: a saw-tooth meta-loss)."""
        lc = self.cfg.l2o
        gen = self.generation[slot]
        self.generation[slot] += 1
        horizon = lc.steps
        if gen == 0:
            shift = (slot * (lc.steps // lc.optimizees)) // lc.unroll * lc.unroll
            horizon = max(lc.steps - shift, min(lc.unroll, lc.steps))
        return gen * lc.optimizees + slot, horizon

    def unroll(self, phi: Dict[str, torch.Tensor]) -> List[Dict[str, Any]]:
        """One unroll of every owned optimizee with φ; finished ones are replaced afterwards.

        Returns:
            Per optimizee {"name", "serial", "seed", "grads", "losses", "meta_loss", "done"}.
        """
        lc = self.cfg.l2o
        out = []
        for s in self.slots:
            opt = self.live[s]
            n = min(lc.unroll, opt.horizon - opt.step)
            batches = opt.next_batches(n)
            if opt.g is None:
                opt.loss, opt.g = start(opt.task, opt.z, batches[0])
            if opt.loss_start is None:
                opt.loss_start = float(opt.loss)
            u = unroll_meta_grad(phi, self.config, opt.task, opt.z, opt.state, batches, loss0=opt.loss, g0=opt.g,
                                 log_loss=lc.meta_loss == "log")
            opt.z, opt.state, opt.loss, opt.g = u.z, u.state, u.loss, u.g
            opt.step += n
            # a diverged optimizee (its meta-gradient is dropped by `combine`) is replaced at once
            last = float(u.loss)
            diverged = None
            if not math.isfinite(last) or last > DIVERGED_FACTOR * opt.loss_start:
                diverged = (f"its loss went from {opt.loss_start:.4g} to {last:.4g} (> {DIVERGED_FACTOR:g}×): "
                            f"diverged; replaced by a fresh optimizee")
            done = opt.step >= opt.horizon or diverged is not None
            out.append({"name": opt.name, "serial": opt.serial, "seed": opt.seed, "grads": u.grads,
                        "losses": u.losses, "meta_loss": u.meta_loss, "done": done, "diverged": diverged})
            if done:
                self.live[s] = self._fresh(s)
        return out

    def validate(self, phi: Dict[str, torch.Tensor], serial: int) -> Dict[str, Any]:
        """N steps of φ (no meta-gradient) on a fresh optimizee, then its accuracy on the ``val`` split."""
        from raysub.engine.task import evaluate_task, loss_and_projected_grad
        from raysub.metrics import convergence_step

        task = self.tasks[self.slots[0]]
        opt = Optimizee(self.cfg, task, serial, self.config)
        losses: List[float] = []
        z, state = opt.z, opt.state
        with torch.no_grad():
            for _ in range(self.cfg.l2o.steps):
                (batch,) = opt.next_batches(1)
                loss, g = loss_and_projected_grad(task, z, batch)
                losses.append(float(loss))
                if not math.isfinite(losses[-1]):
                    break
                delta, state = update(phi, self.config, g, state)
                z = z + delta
        ok = all(math.isfinite(v) for v in losses)
        val = evaluate_task(task, z, "val") if ok else {"loss": float("nan"), "acc": 0.0}
        return {"serial": serial, "seed": opt.seed, "losses": losses,
                "convergence_step": convergence_step(losses) if ok else None,
                "val_acc": val["acc"], "val_loss": val["loss"], "final_train_loss": losses[-1]}


def _actor_class(num_cpus: float):
    import ray

    return ray.remote(num_cpus=num_cpus)(OptimizeeWorker)


# ---------------------------------------------------------------------------------------------------------
# the learner

def combine(contributions: Sequence[Tuple[str, Dict[str, torch.Tensor], Optional[str]]], clip: float, say=print
            ) -> Tuple[Optional[Dict[str, torch.Tensor]], List[str], float]:
    """Average the optimizees' meta-gradients, each clipped to global norm ``clip`` first; drop the bad ones.

    Clipping each contribution (not only the average) keeps one optimizee whose loss is taking off — its
    meta-gradient can be 10⁶× the others' — from steering φ alone.

    Args:
        contributions: (optimizee name, meta-grad dict, why it is dropped or None) triples, dicts with the same
            keys; a contribution with non-finite values is dropped too.
        clip: The largest global L2 norm of one optimizee's meta-gradient.

    Returns:
        (the average, or None when every contribution was dropped; the names dropped; the mean of the kept
        contributions' norms before clipping (nan when none)).
    """
    kept, dropped, norms = [], [], []
    for name, grads, why in contributions:
        if why is None and not all(bool(torch.isfinite(v).all()) for v in grads.values()):
            why = "non-finite values"
        if why is not None:
            dropped.append(name)
            say(f"raysub: warning: dropped the meta-gradient of {name}: {why}")
            continue
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in grads.values()))
        norms.append(norm)
        kept.append({k: v.double() * (clip / norm if norm > clip else 1.0) for k, v in grads.items()})
    if not kept:
        return None, dropped, float("nan")
    avg = {k: torch.stack([g[k] for g in kept]).mean(0).to(contributions[0][1][k].dtype) for k in kept[0]}
    return avg, dropped, sum(norms) / len(norms)


def select(rows: Sequence[Optional[Dict[str, Any]]], tolerance: float) -> Optional[int]:
    """Index of the best meta-validation in ``rows`` (None entries skipped; None if there is none).

    The rule (``l2o.select_tolerance`` = tol): among the rows whose val accuracy is within tol of the best val
    accuracy, the smallest mean convergence step (None = never converged = ∞); ties → higher val accuracy, then
    the earlier row. So φ is chosen for speed (SL2O's metric) without giving up accuracy: the meta-test goal
    asks for both. With tol = 0 it is "highest val accuracy, ties → smaller convergence step".
    """
    live = [(i, r) for i, r in enumerate(rows) if r is not None]
    if not live:
        return None
    top = max(r["val_acc"] for _, r in live)
    inf = float("inf")
    ok = [(r["convergence_step"] if r["convergence_step"] is not None else inf, -r["val_acc"], i)
          for i, r in live if r["val_acc"] >= top - tolerance]
    return min(ok)[2]


def _mean_validation(rows: List[Dict[str, Any]], meta_step: int) -> Dict[str, Any]:
    steps = [r["convergence_step"] for r in rows]
    return {"meta_step": meta_step, "val_acc": sum(r["val_acc"] for r in rows) / len(rows),
            "val_loss": sum(r["val_loss"] for r in rows) / len(rows),
            "final_train_loss": sum(r["final_train_loss"] for r in rows) / len(rows),
            "convergence_step": (sum(steps) / len(steps)) if all(s is not None for s in steps) else None,
            "seeds": [r["seed"] for r in rows]}


def checked_plan(cfg, problems: List[str]) -> Dict[str, Any]:
    """`raysub.pipeline.plan.plan` of ``cfg`` (the task: data, model, projection), or ConfigError with its problems
    and ``problems`` (the l2o sections' own) together, so every bad input shows at once."""
    from raysub.pipeline.plan import plan

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


def save_state(run, manifest: Dict[str, Any], checkpoint: Dict[str, Any], history: Dict[str, Any],
               config: LearnedOptimizerConfig, best_phi: Optional[Dict[str, torch.Tensor]],
               stage: Dict[str, Any]) -> str:
    """Write the meta-training state into a new generation ``l2o/ckpt/GEN/``, commit it (``stage`` as
    ``stages.l2o``), then delete every other generation and refresh the copies; returns GEN's path.

    Until the commit the manifest names the previous generation, whose files nothing touches: a kill at any
    instant leaves one complete, verified state for ``--resume``.

    Raises:
        RunLocked: another command took the run's lock over: nothing is committed.
    """
    from raysub.l2o.weights import save_learned_optimizer
    from raysub.lock import fence
    from raysub.pipeline.records import commit
    from raysub.storage import join_uri

    gen = f"{GENERATIONS}/{uuid.uuid4().hex[:12]}"
    shards = {k: v for k, v in manifest["shards"].items() if not _is_state(k)}
    shards[f"{gen}/checkpoint.pt"] = run.write_torch(f"{gen}/checkpoint.pt", checkpoint)
    if best_phi is not None:
        shards[f"{gen}/weights.pt"] = save_learned_optimizer(join_uri(run.uri, gen, "weights.pt"), config, best_phi)
    shards[f"{gen}/history.json"] = run.write_json(f"{gen}/history.json", history)
    manifest["shards"] = shards
    manifest["stages"]["l2o"] = {**stage, "dir": gen}
    fence(run)  # the lock still ours on storage: a command that took it over is not overwritten
    commit(run, manifest)
    settle_state(run, manifest)
    return gen


def settle_state(run, manifest: Dict[str, Any]) -> None:
    """Tidy the meta-training state after ``manifest``'s commit (and on ``--resume``, for a save killed half-way):
    delete the generations it does not name (older ones, a killed save's) and a superseded flat checkpoint, and
    make ``l2o/weights.pt`` and ``l2o/history.json`` copies of the committed generation's. Copies, not records:
    readers of the weights resolve through the manifest (`raysub.l2o.weights`). Call under the run's lock."""
    from raysub.storage import sha256

    gen = manifest.get("stages", {}).get("l2o", {}).get("dir")
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
        want = manifest["shards"][files[name]]
        if run.exists(copy) and sha256(run.read_bytes(copy)) == want:
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
    import ray

    from raysub.pipeline.run import new_subspace_run
    from raysub.tracking import Tracker

    info = checked_plan(cfg, l2o_problems(cfg))
    lc = cfg.l2o
    # θ0.pt (every optimizee's: the basis run's for a projection that reads train.basis_run), config, manifest
    with new_subspace_run(cfg, info, resume, overwrite, RESUME_SAFE, say) as (run, resuming, manifest):
        manifest["config"] = cfg.to_dict()  # a resumed run records the budget it now runs to
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
            ck = run.read_torch(rel, manifest["shards"][rel])
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

        def checkpoint() -> None:
            """Save φ, Adam, history and the best weights as a new generation, committed (`save_state`)."""
            state = {"phi": {k: v.detach().clone() for k, v in phi.items()}, "adam": adam.state_dict(),
                     "meta_step": meta_step, "history": history, "best_phi": best_phi, "phis": phis,
                     "optimizees": {k: v for st in ray.get([a.states.remote() for a in actors])
                                    for k, v in st.items()}}
            manifest["summary"]["l2o"] = {"best": history["best"], "meta_steps": meta_step}
            save_state(run, manifest, state, history, config, best_phi,
                       {"meta_step": meta_step, "complete": meta_step >= lc.meta_steps})
            if history["validation"]:
                from raysub.plots import plot_l2o

                plot_l2o(run, history)  # a figure, not a record: not in the manifest

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
            row = _mean_validation(rows, meta_step)
            row["wall_s"] = time.perf_counter() - t0
            history["validation"].append(row)
            phis[meta_step] = cur
            chosen = history["validation"][select(history["validation"], lc.select_tolerance)]
            improved = chosen is not best
            if improved:
                best, best_phi = chosen, phis[chosen["meta_step"]]
                history["best"] = best
            cs = row["convergence_step"]
            loss = history["meta"][-1]["loss"] if history["meta"] else None
            say(f"l2o: meta-step {meta_step}/{lc.meta_steps}  train loss {'-' if loss is None else f'{loss:.4f}'}"
                f"  val acc {row['val_acc']:.4f}  conv step {'-' if cs is None else f'{cs:.1f}'}"
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
                results = [r for rs in ray.get([a.unroll.remote(phi_ref) for a in actors]) for r in rs]
                avg, dropped, norm = combine([(r["name"], r["grads"], r["diverged"]) for r in results], lc.grad_clip,
                                              say)
                if avg is not None:
                    adam.zero_grad(set_to_none=False)
                    for k, v in phi.items():
                        v.grad = avg[k].to(v.dtype)
                    adam.step()
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

