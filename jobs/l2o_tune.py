"""The learned optimizer (SL2O): Ray Tune over its meta-hyperparameters (random search + ASHA).

Each trial is a meta-training run (RUN_DIR/trials/NAME) whose optimizee actors take the CPUs/GPUs; the trial
itself reserves none. The config's ``l2o_tune`` section is the space; outputs RUN_DIR/l2o_tune/{results.json,
best_config.yaml} and RUN_DIR/l2o/weights.pt (the best φ); --resume restores the experiment.

Local:

    python jobs/l2o_tune.py l2o_tune_digits                 # a few minutes on 2 cores
    python jobs/l2o_tune.py l2o_tune_digits --resume

On a running cluster (joins it via cluster.address=auto; run_dir absolute or a URI):

    export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token    # token auth: see cluster/local.md
    ray job submit --working-dir . -- python jobs/l2o_tune.py l2o_fashion_mnist_lenet \
        run_dir=s3://BUCKET/raysub/l2o_tune train.basis_run=s3://BUCKET/raysub/fashion_mnist_lenet
"""
from __future__ import annotations

import sys

from raysub.launch import run_cli


def main(argv=None) -> int:
    return run_cli("l2o", sys.argv[1:] if argv is None else argv, subcommand="tune")


if __name__ == "__main__":
    sys.exit(main())
