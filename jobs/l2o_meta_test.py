"""Meta-testing of a learned optimizer (SL2O) against tuned Momentum†, Adam†, SGD†, and the transfer table.

What it does
    On the task of CONFIG's ``train`` section (e.g. Fashion-MNIST LeNet-5 in its DLDR basis: ``train.basis_run``,
    ``train.projection: dldr``, ``train.dim: 40``, ``train.batch_size: 128``), in ONE process (no Ray):
      1. each baseline's lr and schedule are picked from its grid (``--lr-grid``) × ``--schedules`` (constant,
         cosine, step over the run's length) by mean validation accuracy at the end of runs of max(horizons)·N
         steps on the meta-validation optimizees (the ones φ was selected on; never on test);
      2. φ (``--weights``) and every tuned baseline run max(horizons)·N steps on ``--seeds`` new optimizees (new
         data-order seeds and z0's, the same for every optimizer), each step a 1-worker ``raysub train`` step
         through the one optimizer protocol; val and test are evaluated at every h·N;
      3. metrics (raysub/l2o/metatest.py): SL2O §4.1's convergence step over the full run and the test accuracy
         after it (mean ± std over the optimizees); VeLO's speedup of φ over Momentum† and over Adam† at h·N
         (the steps the baseline needs to reach φ's smoothed training loss at h·N, over h·N; "≥" when it never
         does); the same speedups on each run's evaluated curve — the loss of z on 2,048 fixed training samples
         every 10 steps, free of minibatch noise, interpolated between evaluations (l2o_eval_speedup_over_*); the
         best baseline's test accuracy at the end minus φ's (acc_gap_best_<max h>n_pts).
      An adam_schedule φ multiplies Adam's step at the lr it was meta-trained with (``--adam-lr weights``); on
      another task give that task's: ``constant`` (plain Adam's best constant lr in Adam†'s pick: φ brings the
      schedule), ``run`` (the lr of Adam†'s (lr, schedule) pick) or a number.
    Transfer (SL2O Table 3) is the same job on another task (another model, another d) with weights meta-trained
    elsewhere; ``--table A.json B.json ...`` then prints (and with --out writes) the markdown transfer table.

Outputs (--out DIR, a local path or URI): meta_test.json (everything, per-step losses included), loss_curves.png
(mean smoothed training loss per step per optimizer, log y), config.yaml; on stdout progress lines, the table
(optimizer, lr picked, convergence step, test accuracy, speedups), and as the last line one JSON object (the
headline metrics: l2o_over_momentum_steps, l2o_speedup_over_momentum[_2n, _5n, _10n],
l2o_speedup_over_adam[...], l2o_eval_speedup_over_momentum[...], l2o_eval_speedup_over_adam[...],
acc_gap_best_10n_pts, acc_gap_pts, seeds, lrs, schedules, l2o_adam_lr).

How long it takes
    Steps ≈ (Σ grid sizes) · schedules · val-seeds · max(h) · N + (1 + baselines) · seeds · max(h) · N
    (--procs K runs them K at a time). Fashion-MNIST LeNet-5, d = 40, batch 128, N = 100, horizons 1,2,5,10, 3 seeds,
    3 baselines, 3 schedules, 2 validation optimizees: 72 pick runs and 12 meta-test runs of 1,000 steps, measured
    807–859 s with --procs 2 (this shared 2-core machine at load 3–6); the MLP at the same setting 87 s.

How to run
    locally (single process; --threads 1 is the steadier choice on a shared machine):
        python jobs/l2o_meta_test.py fashion_mnist_lenet train.basis_run=runs/fashion_mnist_lenet train.dim=40 \
            train.batch_size=128 data.val_fraction=0.1 --weights runs/fm_l2o --steps 200 --out runs/fm_meta_test
        python jobs/l2o_meta_test.py quickstart train.projection=dense train.dim=10 data.val_fraction=0.2 \
            --weights adam_like --steps 30 --horizons 1,2 --seeds 2 --out /tmp/mt   # hand-built φ, digits
        # transfer: φ meta-trained elsewhere (the MLP task, or d = 15), meta-tested on LeNet-5 at d = 40
        python jobs/l2o_meta_test.py fashion_mnist_lenet train.basis_run=runs/fashion_mnist_lenet train.dim=40 \
            train.batch_size=128 data.val_fraction=0.1 --weights runs/fm_mlp_l2o --steps 200 --out runs/mlp_to_lenet
        python jobs/l2o_meta_test.py --table runs/fm_meta_test/meta_test.json runs/mlp_to_lenet/meta_test.json \
            --out runs/transfer
    on a running Ray cluster (runs on the node the driver lands on; the data and weights must be there):
        export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265
        export RAY_AUTH_MODE=token   # token-auth clusters (the client sends ~/.ray/auth_token or RAY_AUTH_TOKEN)
        ray job submit --working-dir . -- python jobs/l2o_meta_test.py CONFIG ... --out /shared/meta_test

    python jobs/l2o_meta_test.py CONFIG [key=value ...] --weights PATH|adam_like [--steps N]
        [--horizons 1,2,5,10] [--seeds 3] [--val-seeds K] [--baselines psgd,adam,sgd] [--lr-grid psgd=0.1,0.3,1,3 ...]
        [--schedules constant,cosine,step] [--adam-lr weights|constant|run|LR] [--z0-std S] [--trained-on LABEL]
        [--threads 1] [--procs 1] [--progress-every 0] [--out DIR] [--overwrite]
    python jobs/l2o_meta_test.py --table META_TEST.json ... [--out DIR]
    --weights: weights.pt, a meta-training run directory, or ``adam_like`` (the hand-built φ of the config's l2o
    section: a smoke test, not a learned optimizer). --steps defaults to l2o.steps (the meta-training N).
    --lr-grid NAME=v,v,... replaces one baseline's grid (repeatable); --baselines picks which run (Momentum† is
    always needed). Bad input prints one line and exits 2 before anything runs.
"""
from __future__ import annotations

import sys

from raysub.bench.meta_test_job import main  # the lr pick, the meta-test runs, the table and the plot

if __name__ == "__main__":
    sys.exit(main())
