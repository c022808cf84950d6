"""Stage 2 — basis: the distributed Gram-matrix PCA of a sampled run (one Ray actor per parameter block).

Only basis.* and cluster.* overrides are accepted; --overwrite rebuilds an existing basis (e.g. another d).

Local:

    python jobs/basis.py /tmp/quickstart
    python jobs/basis.py /tmp/quickstart basis.dim=15 --overwrite

On a running cluster (joins it via cluster.address=auto, see raysub/launch.py; RUN_DIR absolute or a URI):

    export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token    # token auth: see cluster/local.md
    ray job submit --working-dir . -- python jobs/basis.py s3://BUCKET/raysub/cifar10_resnet20 basis.dim=40
"""
from __future__ import annotations

import sys

from raysub.launch import run_cli


def main(argv=None) -> int:
    return run_cli("basis", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
