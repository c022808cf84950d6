"""The ``raysub`` command line.

    raysub run [CONFIG] [key=value ...] [--resume | --overwrite]     sample → basis → train, then a table
    raysub sample [CONFIG] [key=value ...] [--resume | --overwrite]  stage 1: SGD baseline + trajectory
    raysub basis RUN_DIR [basis.dim=D ...] [--overwrite]             stage 2: distributed Gram basis
    raysub train RUN_DIR [train.KEY=V ...] [--resume | --overwrite]  stage 3: train z in the subspace
    raysub train CONFIG [key=value ...] [--resume | --overwrite]     a new run that needs no trajectory
                                                                     (a random or identity projection)
    raysub sweep CONFIG [key=value ...] [--resume | --overwrite]     intrinsic-dimension sweep on Ray Tune

With no CONFIG, ``run`` and ``sample`` use the embedded quickstart (scikit-learn digits, offline). A bad input
prints one line naming it and the fix, exits 2, and writes nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
QUICKSTART = os.path.join(CONFIG_DIR, "quickstart.yaml")


def resolve_config(name: str) -> str:
    """A path, or the name of a shipped config (``fashion_mnist_lenet``)."""
    if os.path.exists(name):
        return name
    shipped = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else name + ".yaml")
    return shipped if os.path.exists(shipped) else name


def _split(args: List[str]):
    config = None
    if args and "=" not in args[0]:
        config, args = args[0], args[1:]
    return config, args


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="raysub", description="Train neural networks in tiny subspaces on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("run", "the whole DLDR pipeline"), ("sample", "SGD baseline and trajectory sampling")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("args", nargs="*", metavar="[CONFIG] key=value", help="YAML config, then dotted overrides")
        p.add_argument("--resume", action="store_true", help="continue an existing run directory")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p = sub.add_parser("sweep", help="intrinsic-dimension sweep: projection family x d x seed on Ray Tune")
    p.add_argument("args", nargs="+", metavar="CONFIG [key=value]", help="YAML config (or shipped name), overrides")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sweep directory")
    p = sub.add_parser("basis", help="build the trajectory basis of a sampled run")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--overwrite", action="store_true", help="replace an existing basis")
    p = sub.add_parser("train", help="train in the subspace of a run (RUN_DIR), or a new run from a CONFIG whose "
                                     "projection needs no trajectory")
    p.add_argument("run_dir", metavar="RUN_DIR|CONFIG")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--overwrite", action="store_true", help="replace this label's results")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ns = parser.parse_args(argv)

    from raysub.engine.cluster import unwrap_train_error
    from raysub.errors import ConfigError

    try:
        return _dispatch(ns)
    except KeyboardInterrupt:
        print("raysub: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except Exception as exc:
        err = unwrap_train_error(exc)
        if not isinstance(err, ConfigError):
            raise
        print(f"raysub: error: {'; '.join(err.problems)}", file=sys.stderr)
        return 2


def _dispatch(ns) -> int:
    from raysub import pipeline
    from raysub.config import load_config
    from raysub.errors import ConfigError

    if ns.command in ("run", "sample"):
        config, overrides = _split(ns.args)
        cfg = load_config(resolve_config(config) if config else QUICKSTART, overrides)
        if ns.command == "run":
            pipeline.run_pipeline(cfg, resume=ns.resume, overwrite=ns.overwrite)
        else:
            pipeline.stage_sample(cfg, resume=ns.resume, overwrite=ns.overwrite)
    elif ns.command == "sweep":
        from raysub.pipeline.sweep import run_sweep

        config, overrides = _split(ns.args)
        if config is None:
            raise ConfigError("raysub sweep needs a CONFIG first: a YAML file or a shipped name (sweep_digits, "
                              "sweep_fashion_mnist_fc, sweep_fashion_mnist_lenet)")
        run_sweep(load_config(resolve_config(config), overrides), resume=ns.resume, overwrite=ns.overwrite)
    elif ns.command == "basis":
        pipeline.stage_basis(ns.run_dir, ns.overrides, overwrite=ns.overwrite)
    elif ns.command == "train":
        config = resolve_config(ns.run_dir)
        if config.endswith((".yaml", ".yml")) and os.path.isfile(config):
            pipeline.train_from_config(load_config(config, ns.overrides), resume=ns.resume, overwrite=ns.overwrite)
        else:
            pipeline.stage_train(ns.run_dir, ns.overrides, overwrite=ns.overwrite, resume=ns.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
