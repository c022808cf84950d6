"""Stage 3 — train in the subspace: θ = θ0 + P z, only z ∈ R^D is trained, on Ray Train.

Every worker holds P (replicated), computes the gradient g_r of its share of the global batch (mean loss over
its B/W examples), projects it, g̃_r = Pᵀ g_r, and all-reduces D floats — not N: projection is linear, so the
mean of the projections is the projection of the mean gradient. Every worker then applies the same Δz, so θ
stays identical across workers without ever communicating N floats.

BatchNorm: running statistics are buffers outside the subspace. Each worker updates its own during the epoch
(from its local batches); at the end of every epoch, before evaluation and the checkpoint, they are
broadcast from rank 0, so all workers evaluate and checkpoint the same model.

The step allocates nothing N-sized: θ is written in place by addmv into a flat buffer whose views are the
model's parameters, gradients accumulate in place into a flat gradient buffer, and only D floats leave it.
"""
from __future__ import annotations

import time
from typing import Any, Dict

import torch

from raysub import loop
from raysub.config import Config
from raysub.storage import RunDir


class SubspaceModel:
    """A model evaluated at θ = θ0 + P z.

    The model's parameters are bound to views of one flat buffer θ (`FlatParams`, ``bind=True``): `set_z`
    rewrites θ in place and ``model(x)`` evaluates there — the same function as
    ``torch.func.functional_call(model, θ, buffers)`` without its per-call re-parametrization cost.

    Args:
        model: The architecture (its parameters are replaced by the flat views); its buffers are used and
            updated in place.
        theta0_N: Initial flat parameters.
        projection: The subspace (a `Projection`).
    """

    def __init__(self, model: torch.nn.Module, theta0_N: torch.Tensor, projection):
        from raysub.flat import FlatParams

        self.model = model
        self.theta0_N = theta0_N
        self.projection = projection
        self.flat = FlatParams(model, theta0_N, bind=True)

    @torch.no_grad()
    def set_z(self, z_D: torch.Tensor) -> None:
        self.projection.affine_(z_D.detach(), self.theta0_N, self.flat.theta_N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor):
        """Mean cross-entropy at the current z and its projected gradient Pᵀ∇L (D floats, local to this rank)."""
        self.flat.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.forward(x), y)
        loss.backward()
        return loss.detach(), self.projection.project(self.flat.grad_N)

    @torch.no_grad()
    def loss_at(self, z_D: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        """L(z) on this batch, averaged over ranks (line-search trials: every rank sees the same value)."""
        self.set_z(z_D)
        loss = torch.nn.functional.cross_entropy(self.forward(x), y).reshape(1)
        _, world = loop.rank_world()
        return float(loop.all_reduce_sum_(loss) / world)

    def grad_at(self, z_D: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pᵀ∇L(z) on this batch, averaged over ranks."""
        self.set_z(z_D)
        _, g_D = self.loss_and_grad(x, y)
        _, world = loop.rank_world()
        return loop.all_reduce_sum_(g_D) / world


def subspace_loop(config: Dict[str, Any]) -> None:
    """Per-worker loop (Ray Train). ``config``: {"cfg": Config dict, "progress": Queue or None}."""
    from raysub.flat import flatten_params
    from raysub.optim import build_optimizer
    from raysub.projection import PROJECTIONS

    cfg, progress, rank, world, device, run, data, model = loop.worker_setup(config)
    session = config.get("session", "train")
    theta0_N = flatten_params(model)
    dtype = torch.bfloat16 if cfg.train.basis_dtype == "bfloat16" else torch.float32
    projection = PROJECTIONS.get(cfg.train.projection)(theta0_N.numel(), cfg.train_dim, cfg.seed,
                                                       run_dir=cfg.train.basis_run or run.uri, device=device,
                                                       dtype=dtype, **cfg.train.projection_options)
    has_val = cfg.data.val_fraction > 0
    sub = SubspaceModel(model, theta0_N, projection)
    z_D = torch.zeros(cfg.train_dim, device=device, requires_grad=True)
    opt = build_optimizer(cfg.train.optimizer, [z_D], cfg.train)
    batch = cfg.train.batch_size or cfg.data.batch_size

    state = loop.load_checkpoint(session)
    if state is None:
        start_epoch, history, elapsed, step_losses = 0, [], 0.0, []
    else:
        step_losses = state["step_losses"]
        with torch.no_grad():
            z_D.copy_(state["z"].to(device))
        opt.load_state_dict(state["optimizer"])
        for name, buf in model.named_buffers():
            buf.copy_(state["buffers"][name].to(device))
        start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed"]

    comm_floats = 0
    line_search = getattr(opt, "needs_evaluate", False)
    t_start = time.perf_counter() - elapsed
    for epoch in range(start_epoch, cfg.train.epochs):
        for group in opt.param_groups:
            group["lr"] = loop.lr_at(epoch, cfg.train.lr, cfg.train.lr_milestones, cfg.train.lr_gamma)
        model.train()
        losses = []
        batches = loop.epoch_batches(data.size("train"), batch, cfg.seed, epoch, rank, world)
        for x, y in data.batches("train", batches, augment=cfg.data.augment, seed=cfg.seed * 100_003 + epoch,
                                 num_workers=cfg.data.num_workers):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sub.set_z(z_D)
            loss, g_D = sub.loss_and_grad(x, y)
            if line_search:
                # the loss rides along (D+1 floats): the Armijo test needs the global L(z)
                packed = loop.all_reduce_sum_(torch.cat([g_D, loss.reshape(1).to(g_D.dtype)])) / world
                g_D, loss = packed[:-1], packed[-1]
            elif world > 1:
                loop.all_reduce_sum_(g_D)
                g_D /= world
            comm_floats = g_D.numel() + (1 if line_search else 0) if world > 1 else 0
            z_D.grad = g_D.to(z_D.dtype)
            if line_search:
                with loop.frozen_buffers(model):
                    opt.step(float(loss), evaluate=lambda zt: sub.loss_at(zt, x, y),
                             grad_at=lambda zt: sub.grad_at(zt, x, y))
            else:
                opt.step()
            losses.append(loss)
        step_losses.extend(loop.global_step_losses(losses))
        epoch_losses = step_losses[len(step_losses) - len(losses):]
        loop.broadcast_buffers_(model)
        sub.set_z(z_D)
        model.eval()
        with torch.no_grad():
            test = loop.evaluate(sub.forward, data, "test", cfg.data.eval_batch_size, device, cfg.data.num_workers)
            val = (loop.evaluate(sub.forward, data, "val", cfg.data.eval_batch_size, device, cfg.data.num_workers)
                   if has_val else None)
        now = time.perf_counter() - t_start
        record = {"stage": cfg.train_label, "epoch": epoch + 1, "epochs": cfg.train.epochs,
                  "train_loss": sum(epoch_losses) / max(len(epoch_losses), 1), "test_loss": test["loss"],
                  "test_acc": test["acc"], "elapsed_s": now, "allreduce_floats_per_step": comm_floats}
        if val is not None:
            record.update(val_loss=val["loss"], val_acc=val["acc"])
        if line_search:
            record["line_search"] = dict(opt.stats)
        history.append(record)
        last = epoch + 1 == cfg.train.epochs and not config.get("sweep")  # Tune keeps every epoch's row
        metrics = {**record, "z_norm": float(z_D.detach().norm()),
                   **({"history": history, "step_losses": step_losses} if last else {})}
        if rank == 0 and progress is not None:
            progress.put(record)
        ckpt = {"z": z_D.detach().cpu(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "history": history,
                "step_losses": step_losses,
                "elapsed": now, "buffers": {k: v.detach().cpu() for k, v in model.named_buffers()}}
        loop.report(metrics, ckpt if rank == 0 else None, session)
        loop.maybe_inject_failure(run, epoch + 1, config.get("fail_after_epoch"))
    if rank == 0 and not config.get("sweep"):
        # the trained model is θ0 + P z with these buffers
        run.write_torch(f"train/{cfg.train_label}.pt", {
            "z": z_D.detach().cpu(), "dim": cfg.train_dim, "projection": cfg.train.projection,
            "buffers": {k: v.detach().cpu() for k, v in model.named_buffers()}})


def run_subspace(cfg: Config, run: RunDir, printer) -> Dict[str, Any]:
    """Driver side: run `subspace_loop` on Ray Train. Returns {"history", "wall_s"}."""
    from raysub.cluster import fit_with_progress, make_progress_queue, torch_trainer, unwrap_train_error

    progress = make_progress_queue()
    trainer = torch_trainer(subspace_loop, {"cfg": cfg.to_dict(), "progress": progress}, cfg,
                            f"train-{cfg.train_label}", run.storage_path)
    t0 = time.perf_counter()
    try:
        result = fit_with_progress(trainer, progress, printer)
    except Exception as exc:
        raise unwrap_train_error(exc)
    return {"history": result.metrics["history"], "step_losses": result.metrics["step_losses"],
            "wall_s": time.perf_counter() - t0}
