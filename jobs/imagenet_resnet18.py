"""ImageNet ResNet-18, the DLDR paper's protocol, on 8-GPU Ray Train DDP (raysub/configs/imagenet_resnet18.yaml).

SGD 90 epochs (lr 0.1, /10 at 30 and 60, batch 256, momentum 0.9, wd 1e-4), sampled 3 times per epoch over the
first 60 epochs (181 snapshots, 8.5 GB), a 120-dim basis, then P-SGD for 40 epochs. Needs 8 GPUs with 8 CPUs
each, and /data/imagenet/{train,val}/<wnid>/*.JPEG on every node (the head too: the driver counts the images).
Takes the config's overrides only (no CONFIG argument); --resume continues a killed run.

Local (one machine with 8 GPUs; or fewer: cluster.num_workers=4, batch 256 splits evenly over 1, 2, 4, 8):

    python jobs/imagenet_resnet18.py run_dir=/scratch/imagenet_resnet18
    python jobs/imagenet_resnet18.py cluster.num_workers=4 data.root=/mnt/imagenet --resume

On a running cluster (joins it via cluster.address=auto, see jobs/_launch.py; run_dir must be a URI or a
shared filesystem path every node sees):

    export RAY_API_SERVER_ADDRESS=http://HEAD:8265 RAY_AUTH_MODE=token         # token auth: see cluster/local.md
    ray job submit --working-dir . -- python jobs/imagenet_resnet18.py \
        run_dir=s3://BUCKET/raysub/imagenet_resnet18
    ray job submit --no-wait --working-dir . -- python jobs/imagenet_resnet18.py \
        run_dir=s3://BUCKET/raysub/imagenet_resnet18 --resume      # after a failure: resumes from checkpoints
"""
from __future__ import annotations

import os
import sys

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "raysub", "configs",
                      "imagenet_resnet18.yaml")


def main(argv=None) -> int:
    from _launch import run_cli

    return run_cli("run", sys.argv[1:] if argv is None else argv, config=CONFIG)


if __name__ == "__main__":
    sys.exit(main())
