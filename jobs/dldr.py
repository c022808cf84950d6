"""The whole DLDR pipeline: sample an SGD trajectory → PCA basis → P-SGD in the subspace, then a results table.

Default config: the embedded quickstart (scikit-learn digits, 2 CPU workers, about 1 minute on 2 cores).
Any shipped config by name or path, then dotted overrides; --resume continues a run, --overwrite replaces it.

Local (starts a throwaway Ray cluster on this machine):

    python jobs/dldr.py
    python jobs/dldr.py run_dir=/tmp/quickstart --overwrite
    python jobs/dldr.py raysub/configs/fashion_mnist_lenet.yaml cluster.num_workers=2

On a running cluster (the driver joins it: the job supervisor sets RAY_ADDRESS for the driver, so the job adds
cluster.address=auto, see raysub/launch.py; use an absolute run_dir on one node, an s3:// or gs:// URI across nodes):

    export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265   # the head's job server (dashboard port)
    export RAY_AUTH_MODE=token     # token-auth clusters (on by default once a token exists), see cluster/local.md;
                                   # the client sends ~/.ray/auth_token, or RAY_AUTH_TOKEN if set
    ray job submit --working-dir . -- python jobs/dldr.py run_dir=/tmp/raysub/quickstart --overwrite
    ray job submit --working-dir . -- python jobs/dldr.py raysub/configs/cifar10_resnet20.yaml \
        run_dir=s3://BUCKET/raysub/cifar10_resnet20

Prints one line per epoch of every stage, then the table (SGD baseline, SGD at the end of the sampling window,
P-SGD) and the run directory (summary.json, plots/).
"""
from __future__ import annotations

import sys

from raysub.launch import run_cli


def main(argv=None) -> int:
    return run_cli("run", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
