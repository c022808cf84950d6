"""The ViT transfer workflow of ``jobs/vit_uv.py``: a base ViT trained with full-parameter AdamW (`raysub sample`,
reused when complete), then UV fine-tuning from its weights on another task (`raysub train` with
``train.init_from`` = the base run). Usage and timings: the job's docstring.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from raysub import pipeline
from raysub.cli import resolve_config
from raysub.config import load_config
from raysub.errors import RaysubError
from raysub.launch import cluster_overrides
from raysub.pipeline.plan import plan
from raysub.runs.manifest import Manifest
from raysub.storage import RunDir

DESCRIPTION = ("The ViT transfer workflow: train a base ViT with full-parameter AdamW, then UV-fine-tune it on "
               "another task.")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The job's command line: [BASE_CONFIG [UV_CONFIG]] key=value ... (the UV run's), --base-set key=value."""
    p = argparse.ArgumentParser(prog="python jobs/vit_uv.py", description=DESCRIPTION)
    p.add_argument("args", nargs="*", metavar="[BASE_CONFIG [UV_CONFIG]] key=value",
                   help="the base and UV configs (default vit_fashion_mnist_base, vit_fashion_mnist_uv), then dotted "
                        "overrides of the UV run")
    p.add_argument("--base-set", action="append", default=[], metavar="key=value",
                   help="an override of the base run (repeatable)")
    args = p.parse_intermixed_args(list(argv))
    configs = [a for a in args.args if "=" not in a]
    if len(configs) > 2:
        p.error(f"at most two configs (base, UV), got {', '.join(configs)}")
    args.base_config, args.uv_config = (configs + ["vit_fashion_mnist_base", "vit_fashion_mnist_uv"][len(configs):])
    args.overrides = [a for a in args.args if "=" in a]
    return args


def main(argv=None) -> int:
    """The job: parse ``argv`` (default ``sys.argv[1:]``), train (or reuse) the base, UV-fine-tune it, print the
    summary line and the JSON line; returns the exit status (2: bad input)."""
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
    uv_manifest = Manifest.read(uv_run)
    print(f"base {100 * base_acc:.2f}% ({base_cfg.data.name} classes {base_cfg.data.classes}); UV "
          f"{uv_cfg.train.optimizer} {100 * result['test_acc']:.2f}% (classes {uv_cfg.data.classes}), "
          f"{uv_manifest.num_params:,} trainable of {uv_manifest.num_params_total:,} parameters", flush=True)
    print(json.dumps({"base_test_acc": base_acc, "uv_test_acc": result["test_acc"],
                      "uv_optimizer": uv_cfg.train.optimizer, "trainable": uv_manifest.num_params,
                      "params_total": uv_manifest.num_params_total, "base_run": base.uri, "uv_run": uv_run.uri}))
    return 0
