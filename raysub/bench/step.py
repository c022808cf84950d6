"""Benchmark: one P-SGD step (raysub's subspace step) vs. one plain SGD step, same model and batch, CPU.

What it measures
    For LeNet-5 on (1, 28, 28) Fashion-MNIST-shaped inputs (raysub model ``lenet5``) and CIFAR ResNet-20 on
    (3, 32, 32) (``resnet20``), 10 classes, a fixed random batch (``--batch``, default 128, fixed seed):
      SGD step    opt.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()
                  with torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-4) over all N parameters.
      P-SGD step  raysub's own training step, the one every loop calls (`raysub.engine.task.train_step`):
                  train_step(task, z, opt, x, y) with task = Task.from_parts(model, theta0,
                  MatrixProjection(basis_DN)) and opt = `raysub.optim.build_optimizer("psgd", z, TrainConfig(...))`;
                  the basis is a random orthonormal D×N float32 matrix (``--dim``, default 40). Nothing of the
                  step is reimplemented.
      P-SGD bf16  the same with MatrixProjection(dtype=torch.bfloat16) (train.basis_dtype=bfloat16); informative.
    All variants are warmed up, then timed in interleaved rounds (SGD, P-SGD, P-SGD bf16 blocks of steps, the
    order rotating every round) so that other load on the machine hits all of them alike; the per-step time
    of each is the median over rounds, and the ratio is median P-SGD / median SGD (goal ≤ 1.10). Every timed
    block starts from the same post-warm-up state (parameters / z, optimizer state, BatchNorm buffers): on one
    fixed random batch, plain SGD at lr 0.1 kills ~95% of LeNet's ReLUs within ~40 steps, after which its
    (data-dependent) max-pooling runs ~1.5x faster and SGD would look faster than it is in real training.
    It also prints the floats all-reduced per step by data parallelism: D+1 for the subspace step (g̃ and the loss), N (every
    gradient) for plain DDP; a per-phase breakdown of both steps (set_z / forward / backward / project /
    optimizer) measured with the same raysub objects; and a check that raysub's projected gradient equals
    Pᵀ∇L computed by plain autograd (so the timed step computes the right thing).

How long it takes
    About 1.5-2 minutes with the defaults on a 2-core CPU (most of it ResNet-20); --rounds scales it. With other
    processes busy on a small machine, --threads 1 gives far steadier figures than 2 spinning OpenMP threads.

How to run
    locally:     python jobs/bench/step.py [--batch 128] [--dim 40] [--threads N] [--models lenet,resnet20]
    on a cluster: ray job submit --working-dir . -- python jobs/bench/step.py
                 (single process, no Ray needed: under `ray job submit` it runs on the head node's CPU.)

Output: progress lines, a table, and as the last line of stdout one JSON object with the figures
(psgd_over_sgd_lenet, psgd_over_sgd_resnet20, allreduce_floats_subspace, allreduce_floats_ddp,
allreduce_floats_ddp_lenet, raw step times in ms, the breakdown).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F

from raysub.bench.harness import print_figures, rotated
from raysub.config import TrainConfig
from raysub.engine.flat import flatten_params
from raysub.engine.task import Task, train_step
from raysub.models import build_model
from raysub.optim import build_optimizer
from raysub.projections import MatrixProjection

GOAL = 1.10
SHAPES = {"lenet": ("lenet5", (1, 28, 28)), "resnet20": ("resnet20", (3, 32, 32))}
NUM_CLASSES = 10


def log(msg: str) -> None:
    print(f"[bench.step {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(xs):
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------- runners


class SGDStep:
    """Plain SGD on all N parameters."""

    label = "SGD"

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def snapshot(self):
        self._snap = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.opt.state_dict()))

    def restore(self):
        self.model.load_state_dict(self._snap[0])
        self.opt.load_state_dict(self._snap[1])

    def step(self):
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss

    def phases(self):
        """The same step, timed phase by phase (seconds)."""
        t0 = time.perf_counter()
        self.opt.zero_grad()
        t1 = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        self.opt.step()
        t4 = time.perf_counter()
        return {"set_z": 0.0, "zero_grad": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "project": 0.0,
                "opt_step": t4 - t3}


class PSGDStep:
    """raysub's training step (`raysub.engine.task.train_step`, what every loop calls; one worker)."""

    def __init__(self, model, x, y, basis_DN, dtype, cfg, label):
        self.x, self.y, self.label = x, y, label
        self.projection = MatrixProjection(basis_DN, dtype=dtype)
        self.task = Task.from_parts(model, flatten_params(model), self.projection)
        self.sub = self.task.sub
        self.z = self.task.new_z()
        self.opt = build_optimizer("psgd", self.z, cfg)

    def snapshot(self):
        self._snap = (self.z.detach().clone(), copy.deepcopy(self.opt.state_dict()),
                      {k: v.detach().clone() for k, v in self.sub.model.named_buffers()})

    def restore(self):
        with torch.no_grad():
            self.z.copy_(self._snap[0])
        self.opt.load_state_dict(self._snap[1])
        for k, v in self.sub.model.named_buffers():
            v.copy_(self._snap[2][k])

    def step(self):
        loss, _ = train_step(self.task, self.z, self.opt, self.x, self.y)
        return loss

    def phases(self):
        """The step split into the pieces `set_z` and `loss_and_grad` are made of (same raysub objects)."""
        sub = self.sub
        t0 = time.perf_counter()
        sub.set_z(self.z)
        t1 = time.perf_counter()
        sub.flat.zero_grad()
        t2 = time.perf_counter()
        loss = F.cross_entropy(sub.forward(self.x), self.y)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        g_D = sub.projection.project(sub.flat.grad_N)
        t5 = time.perf_counter()
        self.opt.step(self.z, g_D, loss.detach(), None)
        t6 = time.perf_counter()
        return {"set_z": t1 - t0, "zero_grad": t2 - t1, "forward": t3 - t2, "backward": t4 - t3, "project": t5 - t4,
                "opt_step": t6 - t5}


def random_orthonormal(dim: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, dim, generator=g, dtype=torch.float64))
    return q.t().contiguous().float()  # D×N, orthonormal rows


def grad_check(model, x, y, basis_DN, dtype, cfg, seed):
    """Checks raysub's step at a random z against plain autograd.

    Returns (theta_err, grad_err): ‖θ(raysub) − (θ0 + Pᵀz in float64)‖ / ‖Pᵀz‖, and
    ‖raysub's projected gradient − P ∇L(θ)‖ / ‖P ∇L(θ)‖, ∇L by plain autograd on a copy of the model holding
    raysub's own θ.
    """
    m_sub, m_ref = copy.deepcopy(model), copy.deepcopy(model)
    runner = PSGDStep(m_sub, x, y, basis_DN, dtype, cfg, "check")
    z = torch.randn(basis_DN.shape[0], generator=torch.Generator().manual_seed(seed + 7)) * 0.1
    with torch.no_grad():
        runner.z.copy_(z)
    runner.sub.set_z(runner.z)
    theta = runner.sub.flat.theta_N.detach().clone()
    _, g = runner.sub.loss_and_grad(x, y)
    P = runner.projection.basis_DN.double()  # the stored basis (bf16-rounded for a bf16 projection)
    delta = P.t() @ z.double()
    theta_err = float((theta.double() - flatten_params(model).double() - delta).norm() / delta.norm())
    torch.nn.utils.vector_to_parameters(theta, [p for p in m_ref.parameters() if p.requires_grad])
    m_ref.zero_grad(set_to_none=True)
    F.cross_entropy(m_ref(x), y).backward()
    full = torch.cat([p.grad.reshape(-1) for p in m_ref.parameters() if p.requires_grad]).double()
    ref = P @ full
    return theta_err, float((g.double() - ref).norm() / ref.norm())


# -------------------------------------------------------------------------------------------- benchmark


def bench_model(key: str, args) -> dict:
    name, shape = SHAPES[key]
    torch.manual_seed(args.seed)
    model = build_model(name, NUM_CLASSES, shape)
    model.train()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, *shape, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen)
    basis_DN = random_orthonormal(args.dim, n, args.seed + 2)
    cfg = TrainConfig(lr=args.psgd_lr, momentum=0.9, weight_decay=0.0)
    log(f"{key}: model {name}, input {shape}, N={n:,} trainable parameters, batch {args.batch}, D={args.dim}")

    th32, err32 = grad_check(model, x, y, basis_DN, torch.float32, cfg, args.seed)
    th16, err16 = grad_check(model, x, y, basis_DN, torch.bfloat16, cfg, args.seed)
    log(f"{key}: check vs plain autograd at a random z: projected-gradient rel. err {err32:.1e} (float32 basis), "
        f"{err16:.1e} (bfloat16 basis); θ rel. err {th32:.1e} / {th16:.1e}")

    runners = [SGDStep(copy.deepcopy(model), x, y),
               PSGDStep(copy.deepcopy(model), x, y, basis_DN, torch.float32, cfg, "P-SGD"),
               PSGDStep(copy.deepcopy(model), x, y, basis_DN, torch.bfloat16, cfg, "P-SGD bf16")]
    # warm-up, and an estimate of the step time to size the timed blocks
    # Every timed block starts from the same state (taken after the warm-up): on one fixed random batch plain
    # SGD (lr 0.1, momentum 0.9) soon kills most of LeNet's ReLUs (after ~40 steps), and max-pooling mostly
    # zeros is ~1.5x faster, which would flatter SGD. Restoring keeps both in the regime of real training.
    est = {}
    for r in runners:
        for _ in range(args.warmup):
            r.step()
        r.snapshot()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            r.step()
            ts.append(time.perf_counter() - t0)
        est[r.label] = min(ts)  # the least disturbed estimate sizes the blocks
        r.restore()
    k = min(args.max_block_steps, max(1, round(args.block_seconds / max(est.values()))))
    log(f"{key}: warmed up ({args.warmup} steps each); ~{1e3 * est['SGD']:.1f} ms/SGD step; timing {args.rounds} "
        f"interleaved rounds of {k} steps per variant, each block from the post-warm-up state")

    times = {r.label: [] for r in runners}
    for rnd in range(args.rounds):
        order = rotated(runners, rnd)
        for r in order:
            r.restore()
            t0 = time.perf_counter()
            for _ in range(k):
                r.step()
            times[r.label].append((time.perf_counter() - t0) / k)
        if (rnd + 1) % max(1, args.rounds // 5) == 0:
            log(f"{key}: round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{lbl} {1e3 * v[-1]:.2f} ms" for lbl, v in times.items()))
    finite = all(bool(torch.isfinite(r.step()).all()) for r in runners)

    # per-phase breakdown (interleaved too)
    phase = {r.label: [] for r in runners}
    for r in runners:
        r.restore()
    for i in range(args.phase_steps):
        for r in runners:
            phase[r.label].append(r.phases())
    breakdown = {lbl: {p: 1e3 * median([d[p] for d in rows]) for p in rows[0]} for lbl, rows in phase.items()}
    # the projection alone (its two N·D mat-vecs)
    proj_ms = {}
    for r in runners[1:]:
        pr, th = r.projection, r.sub.flat.theta_N
        lift, proj = [], []
        for _ in range(max(20, args.phase_steps)):
            t0 = time.perf_counter()
            pr.lift_add_(r.z.detach(), th)
            t1 = time.perf_counter()
            pr.project(r.sub.flat.grad_N)
            t2 = time.perf_counter()
            lift.append(t1 - t0)
            proj.append(t2 - t1)
        r.sub.set_z(r.z)
        proj_ms[r.label] = {"lift_add_": 1e3 * median(lift), "project": 1e3 * median(proj)}

    ms = {lbl: 1e3 * median(v) for lbl, v in times.items()}
    return {"key": key, "model": name, "input_shape": list(shape), "num_params": n, "steps_per_block": k,
            "ms": ms, "ratio": ms["P-SGD"] / ms["SGD"], "ratio_bf16": ms["P-SGD bf16"] / ms["SGD"],
            "ms_all": {lbl: [1e3 * t for t in v] for lbl, v in times.items()},
            "breakdown_ms": breakdown, "projection_ms": proj_ms, "grad_check_rel_err": err32,
            "grad_check_rel_err_bf16": err16, "theta_rel_err": th32, "theta_rel_err_bf16": th16,
            "losses_finite": finite}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    ap.add_argument("--dim", type=int, default=40, help="subspace dimension D (default 40)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--models", default="lenet,resnet20", help="comma-separated subset of: " + ",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds (default 21)")
    ap.add_argument("--block-seconds", type=float, default=0.4, help="target seconds per timed block of steps")
    ap.add_argument("--max-block-steps", type=int, default=20,
                    help="at most this many steps per timed block (each block starts from the same state)")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps per variant (default 5)")
    ap.add_argument("--phase-steps", type=int, default=20, help="steps for the per-phase breakdown (default 20)")
    ap.add_argument("--psgd-lr", type=float, default=1.0, help="P-SGD learning rate (raysub's default train.lr 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    for k in keys:
        if k not in SHAPES:
            ap.error(f"unknown model {k!r}: pick from {', '.join(SHAPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    if threads > 1 and load0 > 0.5 * os.cpu_count():
        log(f"warning: load average {load0:.2f} on {os.cpu_count()} CPUs: {threads} OpenMP threads sharing busy cores "
            "can make steps many times slower and erratic; --threads 1 gives steadier ratios")
    log(f"torch {torch.__version__}, {threads} intra-op threads, batch {args.batch}, D={args.dim}, CPU; "
        f"load average {load0:.2f} on {os.cpu_count()} CPUs")

    res = {k: bench_model(k, args) for k in keys}

    print()
    print(f"P-SGD step vs plain SGD step (CPU, {threads} threads, batch {args.batch}, D={args.dim}; "
          f"median of {args.rounds} interleaved rounds)")
    print("-" * 104)
    print(f"{'model':10s} {'N':>9s} {'SGD ms':>9s} {'P-SGD ms':>9s} {'ratio':>7s} {'bf16 ms':>9s} {'ratio':>7s}"
          f"   {'all-reduce floats/step: DDP':>28s} {'subspace':>9s}")
    for k, r in res.items():
        print(f"{k:10s} {r['num_params']:9,d} {r['ms']['SGD']:9.2f} {r['ms']['P-SGD']:9.2f} {r['ratio']:7.3f} "
              f"{r['ms']['P-SGD bf16']:9.2f} {r['ratio_bf16']:7.3f}   {r['num_params']:28,d} {args.dim + 1:9d}")
    print(f"goal: P-SGD / SGD <= {GOAL} " + "  ".join(
        f"[{k}: {'met' if r['ratio'] <= GOAL else 'NOT met'}]" for k, r in res.items()))
    print("-" * 104)
    phases = ["set_z", "zero_grad", "forward", "backward", "project", "opt_step"]
    print("per-phase breakdown, ms (median; measured with the same objects, timer between phases):")
    print(f"{'model':10s} {'variant':11s} " + " ".join(f"{p:>9s}" for p in phases) + f" {'sum':>9s}")
    for k, r in res.items():
        for lbl, b in r["breakdown_ms"].items():
            print(f"{k:10s} {lbl:11s} " + " ".join(f"{b[p]:9.3f}" for p in phases) + f" {sum(b.values()):9.3f}")
        print(f"{k:10s} {'projection':11s} " + "  ".join(
            f"{lbl}: lift_add_ {v['lift_add_']:.3f}, project {v['project']:.3f}"
            for lbl, v in r["projection_ms"].items()))
    print("-" * 104)
    print(f"machine load average (1 min): {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end, {os.cpu_count()} CPUs")
    print("check at a random z, raysub vs plain autograd (rel. err): " + "  ".join(
        f"{k}: projected gradient {r['grad_check_rel_err']:.1e} (bf16 basis {r['grad_check_rel_err_bf16']:.1e}), "
        f"θ {r['theta_rel_err']:.1e}" for k, r in res.items()))

    fig = {"batch": args.batch, "dim": args.dim, "threads": threads, "torch": torch.__version__,
           "goal_psgd_over_sgd": GOAL, "allreduce_floats_subspace": args.dim + 1}
    for k, r in res.items():
        fig[f"psgd_over_sgd_{k}"] = r["ratio"]
        fig[f"psgd_bf16_over_sgd_{k}"] = r["ratio_bf16"]
        fig[f"sgd_ms_{k}"] = r["ms"]["SGD"]
        fig[f"psgd_ms_{k}"] = r["ms"]["P-SGD"]
        fig[f"psgd_bf16_ms_{k}"] = r["ms"]["P-SGD bf16"]
        fig[f"allreduce_floats_ddp_{k}"] = r["num_params"]
        fig[f"num_params_{k}"] = r["num_params"]
        fig[f"psgd_ok_{k}"] = r["ratio"] <= GOAL
        fig[f"breakdown_ms_{k}"] = r["breakdown_ms"]
        fig[f"projection_ms_{k}"] = r["projection_ms"]
        fig[f"grad_check_rel_err_{k}"] = r["grad_check_rel_err"]
        fig[f"grad_check_rel_err_bf16_{k}"] = r["grad_check_rel_err_bf16"]
        fig[f"theta_rel_err_{k}"] = r["theta_rel_err"]
        fig[f"losses_finite_{k}"] = r["losses_finite"]
    if "resnet20" in res:
        fig["allreduce_floats_ddp"] = res["resnet20"]["num_params"]
    elif res:
        fig["allreduce_floats_ddp"] = next(iter(res.values()))["num_params"]
    fig["loadavg_start"], fig["loadavg_end"] = load0, os.getloadavg()[0]
    fig["wall_s"] = time.perf_counter() - t_start
    print_figures(fig)


if __name__ == "__main__":
    main()
