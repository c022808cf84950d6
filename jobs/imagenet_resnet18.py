"""ImageNet ResNet-18, the DLDR paper's protocol, on 8-GPU Ray Train DDP.

Two recipes share the paper's sampling run — SGD 90 epochs (lr 0.1, /10 at 30 and 60, batch 256, momentum 0.9,
wd 1e-4), sampled 3 times per epoch over the first 60 epochs (181 snapshots, 8.5 GB), a 120-dim basis — and
differ in the subspace training from θ0:

    --recipe psgd   (default; raysub/configs/imagenet_resnet18.yaml)        P-SGD, lr 1 for 40 epochs, /10 at 30
    --recipe pbfgs  (raysub/configs/imagenet_resnet18_pbfgs.yaml)           P-BFGS, batch 256, 4 epochs, c 0.4, β 0.55

Needs 8 GPUs with 8 CPUs each (fails at once on a cluster that can never hold them, unless
cluster.wait_for_autoscaler=true), and /data/imagenet/{train,val}/<wnid>/*.JPEG on every node (the head too: the
driver counts the images). Takes the recipe's config plus overrides (no CONFIG argument); --resume continues a
killed run. GPU options: compute.bf16=true, compute.channels_last=true; data.image_size (default 224) shrinks the
crops. CPU end to end on a tiny ImageFolder: tests/test_imagenet.py.

Local (one machine with 8 GPUs; or fewer: cluster.num_workers=4, batch 256 splits evenly over 1, 2, 4, 8):

    python jobs/imagenet_resnet18.py run_dir=/scratch/imagenet_resnet18
    python jobs/imagenet_resnet18.py cluster.num_workers=4 data.root=/mnt/imagenet --resume
    python jobs/imagenet_resnet18.py --recipe pbfgs run_dir=/scratch/imagenet_pbfgs compute.bf16=true

On a running cluster (joins it via cluster.address=auto, see raysub/launch.py; run_dir must be a URI or a
shared filesystem path every node sees):

    export RAY_API_SERVER_ADDRESS=http://HEAD:8265 RAY_AUTH_MODE=token         # token auth: see cluster/local.md
    ray job submit --working-dir . -- python jobs/imagenet_resnet18.py \
        run_dir=s3://BUCKET/raysub/imagenet_resnet18
    ray job submit --no-wait --working-dir . -- python jobs/imagenet_resnet18.py \
        run_dir=s3://BUCKET/raysub/imagenet_resnet18 --resume      # after a failure: resumes from checkpoints
    ray job submit --working-dir . -- python jobs/imagenet_resnet18.py --recipe pbfgs \
        run_dir=s3://BUCKET/raysub/imagenet_resnet18_pbfgs cluster.wait_for_autoscaler=true
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

from raysub.launch import run_cli

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "raysub", "configs")
RECIPES = {"psgd": "imagenet_resnet18.yaml", "pbfgs": "imagenet_resnet18_pbfgs.yaml"}
CONFIG = os.path.join(CONFIG_DIR, RECIPES["psgd"])


def split_recipe(argv: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """(recipe name, the other arguments): ``--recipe NAME`` or ``--recipe=NAME`` anywhere, default psgd; None
    when the flag has no value."""
    rest, recipe, args = [], "psgd", list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--recipe":
            if not args or args[0].startswith("-"):
                return None, rest
            recipe = args.pop(0)
        elif arg.startswith("--recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return recipe, rest


def main(argv=None) -> int:
    recipe, rest = split_recipe(sys.argv[1:] if argv is None else argv)
    if recipe not in RECIPES:
        given = f"--recipe {recipe}" if recipe else "--recipe needs a value"
        print(f"imagenet_resnet18: error: {given}: choose one of {', '.join(RECIPES)} (P-SGD or P-BFGS in the "
              f"120-dim subspace)", file=sys.stderr, flush=True)
        return 2
    return run_cli("run", rest, config=os.path.join(CONFIG_DIR, RECIPES[recipe]))


if __name__ == "__main__":
    sys.exit(main())
