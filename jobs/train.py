"""Stage 3 — train: optimize the d subspace coefficients z from θ0 on Ray Train (all-reduce d floats a step).

Only train.* and cluster.* overrides are accepted; train.label names the result in summary.json, so several
subspace runs (other d, optimizer, lr) can share one trajectory and basis. --resume continues from the latest
checkpoint, --overwrite retrains a label.

Local:

    python jobs/train.py /tmp/quickstart
    python jobs/train.py /tmp/quickstart train.dim=5 train.label=psgd_d5

On a running cluster (joins it via cluster.address=auto, see raysub/launch.py; RUN_DIR absolute or a URI):

    export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token    # token auth: see cluster/local.md
    ray job submit --working-dir . -- python jobs/train.py s3://BUCKET/raysub/cifar10_resnet20 \
        train.dim=20 train.label=psgd_d20
"""
from __future__ import annotations

import sys

from raysub.launch import run_cli


def main(argv=None) -> int:
    return run_cli("train", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
