"""The ViT transfer workflow: train a base ViT with full-parameter AdamW, then UV-fine-tune it on another task.

1. base: 'raysub sample' of BASE_CONFIG (default ``vit_fashion_mnist_base``: Fashion-MNIST classes 0–4) on Ray Train
   DDP; when its SGD run ends it commits the trained weights, model.pt (skipped when the base run is complete);
2. UV: 'raysub train' of UV_CONFIG (default ``vit_fashion_mnist_uv``: classes 5–9) with ``train.init_from`` = the
   base run: W0 = the base's weights, W = W0 + U V on every attention projection (r = 16), only U, V and the head
   train — with Momentum† (psgd), Adam† (``train.optimizer=adam``) or the learned optimizer (``train.optimizer=l2o
   train.optimizer_options={weights: RUN}``) through the identity projection, on the same DDP workers.
Overrides after the config names go to the UV run (``--base-set key=value``, repeatable, to the base run).
Re-running continues: a complete base with the same config is reused (another config is refused, as by --resume),
an interrupted one resumed; the UV run resumes too.

Time on 2 CPU cores: base 8 epochs ≈ 1.5 min (90.7% test accuracy on classes 0–4), UV 3 epochs ≈ 1 min.
Last line of output: one JSON object (base and UV test accuracy, trainable and total parameters, run directories).

    python jobs/vit_uv.py                                            # both shipped configs
    python jobs/vit_uv.py vit_fashion_mnist_base vit_fashion_mnist_uv train.optimizer=adam train.lr=0.003 \
        run_dir=runs/vit_uv_adam
    python jobs/vit_uv.py --base-set data.root=/data/fmnist data.root=/data/fmnist

On a cluster (RAY_AUTH_MODE=token for token-auth clusters; see cluster/local.md). The run directories must be a
path or URI every node reaches, and the UV run's init_from must name the base's:

    ray job submit --working-dir . -- python jobs/vit_uv.py --base-set run_dir=s3://bucket/vit_base \
        run_dir=s3://bucket/vit_uv train.init_from=s3://bucket/vit_base
"""
from __future__ import annotations

import sys

from raysub.bench.vit_transfer import main  # the base run, then the UV run from its weights

if __name__ == "__main__":
    sys.exit(main())
