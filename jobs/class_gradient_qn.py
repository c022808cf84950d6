"""Class-gradient quasi-Newton vs. plain SGD on Fashion-MNIST / LeNet-5 (Tuddenham, Prügel-Bennett & Hare).

What it measures
    Two (or three) trainings of the same seeded LeNet-5 θ0 on Fashion-MNIST in ONE run directory, each a normal
    raysub training (Ray Train DDP over cluster.num_workers CPU workers, the loop of raysub.pipeline.train, the
    optimizer chosen from the registry) with the config's batch (128), constant lr η (0.05), no momentum, the
    identity projection (full parameters: z = θ − θ0) and the same data order:
      cgqn           the registered `cgqn` optimizer (raysub.optim.cgqn): eq. 15–17 of the paper, with the
                     config's train.optimizer_options (shipped: γ = 0.9, mode orthonormal, damping 1);
      sgd            the registered `sgd` optimizer at the same η (θ' = θ − η g);
      cgqn_undamped  (only with --arms cgqn,sgd,cgqn_undamped) cgqn with damping 0, the paper's own setting; it
                     usually blows up within a few steps (see raysub/optim/cgqn.py).
    The arms now run one after the other (not interleaved step by step as this job used to), so machine load hits
    them at different times: the step-time ratio (wall s / steps of each arm, qn ÷ sgd) is only meaningful on a
    quiet machine. Per arm: test accuracy per epoch, training loss per step, convergence step (SL2O §4.1).

Outputs (the run directory, run_dir — default runs/fashion_mnist_lenet_cgqn): manifest.json, config.yaml,
theta0.pt, summary.json (results.cgqn, results.sgd, … with their per-epoch history), curves/LABEL.json (training
loss per step), train/LABEL.pt (the trained z), plots/test_accuracy.png and plots/cgqn_vs_sgd.png (smoothed
training loss per step; test accuracy per epoch). It prints the progress lines of every arm, then a table (arm,
test acc, final train loss, convergence step, wall s, seconds per step ÷ sgd's), and as its last stdout line one
JSON object: qn_test_acc, sgd_test_acc, qn_final_train_loss, sgd_final_train_loss, qn_over_sgd_step_time (and
undamped_* with the third arm; non-finite values are null), paths.

How long it takes
    Not timed end to end in this version; from the measured step costs: a cgqn step is the loop's own forward/
    backward plus one forward and C+1 = 11 batched backward passes for the class sums — on LeNet-5, one thread,
    batch 64 (one worker's share), 81 ms against 12 ms for an SGD step (≈ 7×; the earlier interleaved job
    measured 5.6× when the class sums also gave the gradient). With 2 workers on a 2-core machine that is
    roughly 45–60 s per cgqn epoch (468 steps, plus the all-reduce of (C+1)·N floats) and 10–15 s per SGD epoch,
    plus evaluation and ~20–30 s of Ray and trainer start-up per arm: the shipped 5 epochs should take about
    6–8 minutes. train.epochs=1 for a quick check.

How to run
    locally (starts a throwaway Ray cluster on this machine):
        python jobs/class_gradient_qn.py
        python jobs/class_gradient_qn.py train.epochs=1 run_dir=/tmp/cgqn --overwrite
        python jobs/class_gradient_qn.py --arms cgqn,sgd,cgqn_undamped run_dir=/tmp/cgqn3
        python jobs/class_gradient_qn.py data.name=digits model.name=mlp train.epochs=1 run_dir=/tmp/cgqn_smoke
    on a running Ray cluster (the driver joins it; the data must exist on every worker node; run_dir absolute or
    a URI every node reaches):
        export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265
        export RAY_AUTH_MODE=token   # token-auth clusters (the client sends ~/.ray/auth_token or RAY_AUTH_TOKEN)
        ray job submit --working-dir . -- python jobs/class_gradient_qn.py run_dir=/tmp/cgqn --overwrite

    python jobs/class_gradient_qn.py [CONFIG] [key=value ...] [--arms LIST] [--resume | --overwrite]
    CONFIG defaults to raysub/configs/fashion_mnist_lenet_cgqn.yaml (a path or a shipped name); overrides are
    dotted keys as for every raysub command. --resume continues an interrupted run (finished arms are skipped),
    --overwrite replaces the run directory.

Bad input (γ outside (0, 1), an unknown option, a missing data directory, an existing run directory without
--resume/--overwrite, …) prints one line and exits 2 before anything is started or written.
"""
from __future__ import annotations

import sys

from raysub.bench.cgqn import main  # the arms, their trainings, the table and the plot

if __name__ == "__main__":
    sys.exit(main())
