"""The learned optimizer (SL2O): meta-train φ on Ray — optimizee actors, the learner, meta-validation on val.

The config's ``train`` section is the optimizee task (a DLDR basis through train.basis_run, or a random family),
its ``l2o`` section the meta-training (see docs/learned-optimizer.md). Outputs RUN_DIR/l2o/{weights.pt,
history.json, curves.png} (the first two copies of the committed state in RUN_DIR/l2o/ckpt/GEN/, with
checkpoint.pt); --resume continues bit for bit, from any instant a kill left.

Local:

    python jobs/sample.py fashion_mnist_lenet data.val_fraction=0.1 && python jobs/basis.py runs/fashion_mnist_lenet
    python jobs/l2o_meta_train.py l2o_fashion_mnist_lenet
    python jobs/l2o_meta_train.py l2o_fashion_mnist_lenet --resume

On a running cluster (joins it via cluster.address=auto; run_dir and train.basis_run absolute or URIs):

    export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token    # token auth: see cluster/local.md
    ray job submit --working-dir . -- python jobs/l2o_meta_train.py l2o_fashion_mnist_lenet \
        run_dir=s3://BUCKET/raysub/l2o_fm train.basis_run=s3://BUCKET/raysub/fashion_mnist_lenet l2o.actors=8
"""
from __future__ import annotations

import sys

from raysub.launch import run_cli


def main(argv=None) -> int:
    return run_cli("l2o", sys.argv[1:] if argv is None else argv, subcommand="meta-train")


if __name__ == "__main__":
    sys.exit(main())
