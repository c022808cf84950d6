"""Stage 1 — sample: the full SGD run (the baseline) on Ray Train DDP, snapshotting the first sample.epochs.

Each rank writes its own block of every snapshot into RUN_DIR/trajectory/. Default config: the quickstart.
Follow with jobs/basis.py and jobs/train.py on the same run directory.

Local:

    python jobs/sample.py run_dir=/tmp/quickstart --overwrite
    python jobs/sample.py raysub/configs/fashion_mnist_lenet.yaml run_dir=/tmp/fm --resume

On a running cluster (joins it via cluster.address=auto, see raysub/launch.py; run_dir absolute or a URI):

    export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token    # token auth: see cluster/local.md
    ray job submit --working-dir . -- python jobs/sample.py raysub/configs/cifar10_resnet20.yaml \
        run_dir=s3://BUCKET/raysub/cifar10_resnet20
"""
from __future__ import annotations

import sys

from raysub.launch import run_cli


def main(argv=None) -> int:
    return run_cli("sample", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
