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

import argparse
import json
import sys

from _launch import cluster_overrides, use_repo_raysub


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("args", nargs="*", metavar="[BASE_CONFIG [UV_CONFIG]] key=value",
                   help="the base and UV configs (default vit_fashion_mnist_base, vit_fashion_mnist_uv), then dotted "
                        "overrides of the UV run")
    p.add_argument("--base-set", action="append", default=[], metavar="key=value",
                   help="an override of the base run (repeatable)")
    args = p.parse_intermixed_args(argv)
    configs = [a for a in args.args if "=" not in a]
    if len(configs) > 2:
        p.error(f"at most two configs (base, UV), got {', '.join(configs)}")
    args.base_config, args.uv_config = (configs + ["vit_fashion_mnist_base", "vit_fashion_mnist_uv"][len(configs):])
    args.overrides = [a for a in args.args if "=" in a]
    return args


def main(argv=None) -> int:
    use_repo_raysub()
    from raysub import pipeline
    from raysub.cli import resolve_config
    from raysub.config import load_config
    from raysub.errors import RaysubError
    from raysub.pipeline.plan import plan
    from raysub.storage import RunDir

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        base_cfg = load_config(resolve_config(args.base_config), args.base_set + cluster_overrides(args.base_set))
        base = RunDir(base_cfg.run_dir)
        uv_over = args.overrides + cluster_overrides(args.overrides)
        if not any(o.startswith("train.init_from=") for o in uv_over):
            uv_over.append(f"train.init_from={base.uri}")
        uv_cfg = load_config(resolve_config(args.uv_config), uv_over)
        plan(base_cfg)  # the base's problems before anything runs (the UV plan needs the base's weights)
        # a complete base with this config is skipped; one started with another config is refused, not reused
        pipeline.stage_sample(base_cfg, resume=True)
        result = pipeline.train_from_config(uv_cfg, resume=True)
    except RaysubError as exc:
        print(f"vit_uv: error: {'; '.join(exc.problems)}", file=sys.stderr)
        return 2
    base_acc = pipeline.read_summary(base)["results"]["sgd"]["test_acc"]
    uv_run = RunDir(uv_cfg.run_dir)
    uv_manifest = uv_run.read_json("manifest.json")
    print(f"base {100 * base_acc:.2f}% ({base_cfg.data.name} classes {base_cfg.data.classes}); UV "
          f"{uv_cfg.train.optimizer} {100 * result['test_acc']:.2f}% (classes {uv_cfg.data.classes}), "
          f"{uv_manifest['num_params']:,} trainable of {uv_manifest['num_params_total']:,} parameters", flush=True)
    print(json.dumps({"base_test_acc": base_acc, "uv_test_acc": result["test_acc"],
                      "uv_optimizer": uv_cfg.train.optimizer, "trainable": uv_manifest["num_params"],
                      "params_total": uv_manifest["num_params_total"], "base_run": base.uri, "uv_run": uv_run.uri}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
