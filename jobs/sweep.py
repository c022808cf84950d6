"""Intrinsic-dimension sweep on Ray Tune: projection family × subspace dimension d × seed, every trial from the
same θ0, selection on a held-out validation split, d_int90 per family against a full-training baseline.

Local (a throwaway Ray cluster on this machine; shipped configs: sweep_digits, sweep_fashion_mnist_fc,
sweep_fashion_mnist_lenet):

    python jobs/sweep.py sweep_digits
    python jobs/sweep.py sweep_fashion_mnist_lenet sweep.seeds=[0,1,2] sweep.refine=3
    python jobs/sweep.py runs/sweep_digits/config.yaml --resume          # after an interrupt

On a running cluster (joins it via cluster.address=auto, see raysub/launch.py; run_dir absolute or a URI). With
GPUs, one trial per GPU; sweep.workers_per_trial=N makes every trial an N-worker DDP run (Ray Train inside Tune):

    export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token    # token auth: see cluster/local.md
    ray job submit --working-dir . -- python jobs/sweep.py sweep_fashion_mnist_lenet \
        run_dir=s3://BUCKET/raysub/sweep_lenet cluster.use_gpu=true
"""
from __future__ import annotations

import sys

from raysub.launch import run_cli


def main(argv=None) -> int:
    return run_cli("sweep", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
