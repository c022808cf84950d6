"""Meta-training's optimizees and the Ray actor that runs them (`raysub.l2o.meta_train` is the learner's loop).

- An **optimizee** (`Optimizee`) is the ``train`` section's task (`build_task`: θ0, projection P, model, dataset)
  plus a data-order seed and a start z0 ~ N(0, σ²) drawn from that seed (σ = ``l2o.z0_std``). It runs
  N = ``l2o.steps`` steps in unrolls of T = ``l2o.unroll`` (the last one shorter when T does not divide N); then
  it is replaced by a fresh one (the next serial number: a new seed and z0).
- An `OptimizeeWorker` owns some optimizees (each with its own `Task`); `_actor_class` makes it a Ray actor.
  ``unroll(φ)`` runs one unroll of each with `unroll_meta_grad` and returns, per optimizee, (name, meta-grad,
  losses, done); ``validate(φ, serial)`` runs N steps of φ on a fresh optimizee and scores it on ``val``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from raysub.config import Config
from raysub.data import open_dataset
from raysub.engine.loop import epoch_batches, mix_seed, setup_threads
from raysub.engine import task as engine_task  # its functions looked up at call time (tests spy on them)
from raysub.engine.task import build_task
from raysub.l2o.lstm import LearnedOptimizerConfig, init_state, update
from raysub.l2o.meta import start, unroll_meta_grad
from raysub.l2o.seeds import optimizee_seed
from raysub.l2o.setup import opt_config
from raysub.metrics import convergence_step, final_loss

DIVERGED_FACTOR = 10.0  # an optimizee whose loss exceeds 10× its loss at z0 has diverged (dropped, replaced)


class Optimizee:
    """One optimizee's running state: z, the learned optimizer's state, (L, g) at z, steps done, data cursor."""

    def __init__(self, cfg, task, serial: int, config: LearnedOptimizerConfig, horizon: Optional[int] = None):
        self.cfg, self.task, self.serial = cfg, task, serial
        self.horizon = cfg.l2o.steps if horizon is None else horizon  # steps before it is replaced
        self.seed = optimizee_seed(cfg, serial)
        gen = torch.Generator().manual_seed(self.seed)
        self.z = torch.randn(task.dim, generator=gen) * cfg.l2o.z0_std
        self.state = init_state(config, task.dim, horizon=self.horizon)
        self.step = 0
        self.epoch, self.cursor, self.order = 0, 0, None
        self.loss = self.g = None
        self.loss_start: Optional[float] = None  # the loss at z0: `DIVERGED_FACTOR` × it means diverged
        self.xi: Optional[Dict[str, torch.Tensor]] = None  # pes: the ±ε summed over this optimizee's unrolls

    @property
    def name(self) -> str:
        return f"optimizee {self.serial} (seed {self.seed})"

    def next_batches(self, n: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The next ``n`` training batches of this optimizee's data order (epochs as `epoch_batches` cuts them)."""
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
        slots: Which of the ``l2o.optimizees`` slots it owns; slot s runs serials s, s + n, s + 2n, … (with
            ``l2o.estimator=pes`` the pair of slots 2k, 2k+1 runs serials k, k + n/2, …: one optimizee at φ ± ε)
        states: `states` of a checkpoint, by slot: those optimizees go on where they were (others start fresh).
    """

    def __init__(self, cfg_dict: Dict[str, Any], slots: Sequence[int],
                 states: Optional[Dict[int, Dict[str, Any]]] = None):
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
                      "loss": o.loss, "g": o.g, "horizon": o.horizon, "loss_start": o.loss_start, "xi": o.xi}
        return out

    def _restore(self, slot: int, st: Dict[str, Any]) -> None:
        o = Optimizee(self.cfg, self.tasks[slot], st["serial"], self.config, st.get("horizon"))
        o.z, o.state, o.step, o.loss, o.g = st["z"], st["state"], st["step"], st["loss"], st["g"]
        o.epoch, o.cursor, o.loss_start, o.xi = st["epoch"], st["cursor"], st.get("loss_start"), st.get("xi")
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
        # pes: slots 2k and 2k+1 are an antithetic pair, the same optimizee (seed, z0, horizon) at φ ± ε
        lane, lanes = (slot // 2, lc.optimizees // 2) if lc.estimator == "pes" else (slot, lc.optimizees)
        serial = gen * lanes + lane
        if lc.horizons:  # drawn lengths: no stagger needed, the optimizees in flight are out of step anyway
            return serial, sampled_horizon(self.cfg, serial)
        horizon = lc.steps
        if gen == 0:
            shift = (lane * (lc.steps // lanes)) // lc.unroll * lc.unroll
            horizon = max(lc.steps - shift, min(lc.unroll, lc.steps))
        return serial, horizon

    def unroll(self, phi: Dict[str, torch.Tensor], meta_step: int = 0) -> List[Dict[str, Any]]:
        """One unroll of every owned optimizee with φ; finished ones are replaced afterwards.

        Returns:
            Per optimizee {"name", "serial", "seed", "grads", "losses", "meta_loss", "done"}; with
            ``l2o.estimator=pes`` "grads" is None and "pes" = {"pair", "sign", "value", "xi"} (`_unroll_pes`).
        """
        lc = self.cfg.l2o
        if lc.estimator == "pes":
            return self._unroll_pes(phi, meta_step)
        out = []
        for s in self.slots:
            opt = self.live[s]
            n, batches = self._next_unroll(opt)
            u = unroll_meta_grad(phi, self.config, opt.task, opt.z, opt.state, batches, loss0=opt.loss, g0=opt.g,
                                 log_loss=lc.meta_loss == "log",
                                 term_weights=late_weights(lc.late_weight, opt.step, n, opt.horizon))
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

    def _next_unroll(self, opt: Optimizee) -> Tuple[int, List[Tuple[torch.Tensor, torch.Tensor]]]:
        """(n, the batches) of ``opt``'s next unroll (T steps, fewer at the end of its horizon); on its first, (L, g)
        at z0 and the loss that divergence is measured against."""
        n = min(self.cfg.l2o.unroll, opt.horizon - opt.step)
        batches = opt.next_batches(n)
        if opt.g is None:
            opt.loss, opt.g = start(opt.task, opt.z, batches[0])
        if opt.loss_start is None:
            opt.loss_start = float(opt.loss)
        return n, batches

    def _unroll_pes(self, phi: Dict[str, torch.Tensor], meta_step: int) -> List[Dict[str, Any]]:
        """PES (Vicol et al. 2021): slot 2k runs its optimizee at φ + ε, slot 2k+1 the same optimizee at φ − ε, ε
        drawn from (l2o.seed, meta-step, pair) so that both halves agree wherever they run; no backpropagation.
        Each particle adds its ±ε to ξ (reset when its optimizee is replaced) and returns its meta-loss over the
        unroll, Σ ω_t L_t (Σ ω_t log L_t with ``meta_loss: log``); the learner pairs them (`pes_contributions`).
        Pairs are replaced together at their common horizon; a diverged pair is dropped by the learner, not
        replaced early (its halves would fall out of step)."""
        lc = self.cfg.l2o
        out = []
        for s in self.slots:
            opt = self.live[s]
            pair, sign = s // 2, 1 - 2 * (s % 2)
            eps = pes_noise(phi, lc.seed, meta_step, pair, lc.pes_sigma)
            phi_p = {k: v.detach() + sign * eps[k] for k, v in phi.items()}
            n, batches = self._next_unroll(opt)
            weights = late_weights(lc.late_weight, opt.step, n, opt.horizon) or [1.0] * n
            losses, value = [], 0.0
            z, state, g = opt.z, opt.state, opt.g
            with torch.no_grad():
                for w, batch in zip(weights, batches):
                    delta, state = update(phi_p, self.config, g, state)
                    z = z + delta
                    loss, g = engine_task.loss_and_projected_grad(opt.task, z, batch)
                    losses.append(float(loss))
                    value += w * (math.log(losses[-1]) if lc.meta_loss == "log" and losses[-1] > 0 else losses[-1])
            opt.z, opt.state, opt.loss, opt.g = z, state, loss, g
            opt.step += n
            opt.xi = {k: (opt.xi[k] if opt.xi else 0) + sign * eps[k] for k in eps}
            done = opt.step >= opt.horizon
            out.append({"name": opt.name, "serial": opt.serial, "seed": opt.seed, "grads": None, "losses": losses,
                        "meta_loss": float(sum(losses)), "done": done, "diverged": None,
                        "pes": {"pair": pair, "sign": sign, "value": value, "xi": dict(opt.xi)}})
            if done:
                self.live[s] = self._fresh(s)
        return out

    def validate(self, phi: Dict[str, torch.Tensor], serial: int) -> Dict[str, Any]:
        """``l2o.validation_steps`` (default N) steps of φ (no meta-gradient) on a fresh optimizee, then its
        accuracy on the ``val`` split."""
        task = self.tasks[self.slots[0]]
        steps = self.cfg.l2o.validation_steps or self.cfg.l2o.steps
        opt = Optimizee(self.cfg, task, serial, self.config, horizon=steps)
        losses: List[float] = []
        z, state = opt.z, opt.state
        with torch.no_grad():
            for _ in range(steps):
                (batch,) = opt.next_batches(1)
                loss, g = engine_task.loss_and_projected_grad(task, z, batch)
                losses.append(float(loss))
                if not math.isfinite(losses[-1]):
                    break
                delta, state = update(phi, self.config, g, state)
                z = z + delta
        ok = all(math.isfinite(v) for v in losses)
        val = engine_task.evaluate_task(task, z, "val") if ok else {"loss": float("nan"), "acc": 0.0}
        return {"serial": serial, "seed": opt.seed, "losses": losses,
                "convergence_step": convergence_step(losses) if ok else None,
                "val_acc": val["acc"], "val_loss": val["loss"], "final_train_loss": losses[-1],
                "final_loss": final_loss(losses) if ok else math.inf}


def pes_noise(phi: Dict[str, torch.Tensor], seed: int, meta_step: int, pair: int, sigma: float
              ) -> Dict[str, torch.Tensor]:
    """ε ~ N(0, σ²) shaped like φ, from (seed, meta-step, pair) alone: the two halves of a pair draw the same."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + meta_step) * 10_007 + pair) % (2 ** 62))
    return {k: torch.randn(phi[k].shape, generator=gen, dtype=phi[k].dtype) * sigma for k in sorted(phi)}


def sampled_horizon(cfg, serial: int) -> int:
    """The horizon of optimizee ``serial`` when ``l2o.horizons`` = [lo, hi]: log-uniform in [lo, hi], from the
    optimizee's seed alone (a resumed or re-run meta-training draws the same), rounded down to whole unrolls."""
    lo, hi = cfg.l2o.horizons
    u = torch.rand(1, generator=torch.Generator().manual_seed(optimizee_seed(cfg, serial) + 7919),
                   dtype=torch.float64).item()
    h = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    unroll = cfg.l2o.unroll
    return max(unroll, int(h) // unroll * unroll)


def late_weights(late_weight: float, done: int, n: int, horizon: int) -> Optional[List[float]]:
    """ω of the n terms after step ``done`` of a ``horizon``-step optimizee: (1 + a·p)/(1 + a/2), p the fraction
    of the horizon done after each step (so ω averages about 1 over a whole horizon); None when a = 0 (all 1)."""
    if not late_weight:
        return None
    return [(1.0 + late_weight * (done + i + 1) / horizon) / (1.0 + late_weight / 2) for i in range(n)]


def _actor_class(num_cpus: float):
    import ray  # here, not at the top: the in-process users (benchmarks, tests) need no Ray

    return ray.remote(num_cpus=num_cpus)(OptimizeeWorker)
