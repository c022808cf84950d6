"""Meta-testing of a learned optimizer (SL2O) and the transfer table: the logic of ``jobs/l2o_meta_test.py`` — its
command line, the lr grids, the hand-built φ, the outputs and the last-line JSON; the meta-test itself is
`raysub.l2o.metatest`. What it measures, its outputs and its cost: the job's docstring.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

from raysub.bench.harness import OneLineParser
from raysub.cli import resolve_config
from raysub.config import load_config
from raysub.errors import ConfigError, RaysubError
from raysub.report.tables import meta_test_table, transfer_table
from raysub.runs import layout
from raysub.storage import RunDir, join_uri, strict_json
from raysub.report.plots import plot_meta_test

PROG = "l2o_meta_test"
DESCRIPTION = ("Meta-testing of a learned optimizer (SL2O) against tuned Momentum†, Adam†, SGD†, and the transfer "
               "table.")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The job's command line (see its docstring); bad input: one line, exit 2."""
    p = OneLineParser(PROG, prog=f"python jobs/{PROG}.py", description=DESCRIPTION)
    p.add_argument("args", nargs="*", metavar="CONFIG [key=value]", help="the task's config, then dotted overrides")
    p.add_argument("--weights", help="φ: weights.pt, a meta-training run directory, or adam_like")
    p.add_argument("--steps", type=int, help="N, the meta-training horizon (default l2o.steps)")
    p.add_argument("--horizons", default="1,2,5,10", help="multiples of N where speedups are taken; runs are max·N")
    p.add_argument("--schedules", default="constant,cosine,step",
                   help="lr schedules each baseline's pick tries with each lr, over the run's length")
    p.add_argument("--seeds", type=int, default=3, help="meta-test optimizees")
    p.add_argument("--val-seeds", type=int, help="validation optimizees of the lr pick (default "
                                                 "l2o.validation_optimizees)")
    p.add_argument("--baselines", default="psgd,adam,sgd", help="registered baselines to run (psgd = Momentum†)")
    p.add_argument("--lr-grid", action="append", default=[], metavar="NAME=LR,LR,...",
                   help="one baseline's lr grid (repeatable)")
    p.add_argument("--adam-lr", default="weights", metavar="weights|constant|run|LR",
                   help="adam_schedule φ: the Adam lr its multiplier applies to: the one φ was meta-trained with "
                        "(default); constant: plain Adam's best constant lr on this task (φ brings the schedule); "
                        "run: the lr of Adam†'s pick; or LR")
    p.add_argument("--z0-std", type=float, help="σ of z0 ~ N(0, σ²) (default l2o.z0_std)")
    p.add_argument("--trained-on", help="label of φ's meta-training task in the transfer table (default: read from "
                                        "the meta-training run's config.yaml)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--procs", type=int, default=1, help="runs at once, in forked processes of one thread each")
    p.add_argument("--progress-every", type=int, default=0, help="a progress line every K steps of a run (0: none)")
    p.add_argument("--out", help="output directory (default runs/l2o_meta_test)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR/meta_test.json")
    p.add_argument("--table", nargs="+", metavar="META_TEST.json", help="print the transfer table of these runs")
    return p.parse_intermixed_args(list(argv))


def parse_grids(baselines: str, specs: Sequence[str]) -> Dict[str, List[float]]:
    """{baseline: lr grid}: the default grids of ``baselines``, each replaced by its ``--lr-grid NAME=...``.

    Raises:
        ConfigError: a malformed spec (one line).
    """
    from raysub.l2o.metatest import DEFAULT_GRIDS  # local: imports torch, which waits for a valid command line

    names = [b for b in baselines.split(",") if b]
    given = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        try:
            given[name] = [float(v) for v in values.split(",")]
        except ValueError:
            raise ConfigError(f"--lr-grid {spec}: write NAME=LR,LR,... e.g. psgd=0.1,0.3,1,3") from None
        if name not in names:
            names.append(name)
    missing = [n for n in names if n not in given and n not in DEFAULT_GRIDS]
    if missing:
        raise ConfigError(f"--baselines: no default lr grid for {', '.join(missing)}: give --lr-grid NAME=...")
    return {n: given.get(n, DEFAULT_GRIDS.get(n)) for n in names}


def write_adam_like(cfg, out) -> str:
    """The config's hand-built Adam-like φ (`adam_like_params` of its l2o section) as OUT/adam_like_weights.pt."""
    # local: torch-side modules, imported once the command line is valid
    from raysub.l2o.lstm import adam_like_params
    from raysub.l2o.setup import opt_config
    from raysub.l2o.weights import save_learned_optimizer

    config = opt_config(cfg)
    uri = join_uri(out.uri, "adam_like_weights.pt")
    save_learned_optimizer(uri, config, adam_like_params(config))
    return uri


def headline(record) -> Dict:
    """The last stdout line: the metrics, the lrs picked, N and the seeds."""
    return {**record["metrics"], "steps": record["steps"], "horizons": record["horizons"],
            "lrs": {n: s["lr"] for n, s in record["lr_selection"].items()},
            "schedules": {n: s.get("schedule") for n, s in record["lr_selection"].items()},
            "lr_at_grid_edge": [n for n, s in record["lr_selection"].items() if s["at_edge"]],
            "seed_list": record["seeds"], "weights": record["weights"], "l2o_adam_lr": record.get("l2o_adam_lr"),
            "trained_on": record.get("trained_on")}


def main(argv=None) -> int:
    """The job: parse ``argv`` (default ``sys.argv[1:]``), meta-test φ against the tuned baselines (or print the
    transfer table of ``--table`` records); returns the exit status (2: bad input, 130: interrupted)."""
    ns = parse_args(sys.argv[1:] if argv is None else argv)

    # local: torch and matplotlib cost seconds; a bad command line answers before them
    import torch

    # heavy: torch loads here, not when this module is imported
    from raysub.l2o import metatest

    torch.set_num_threads(max(1, ns.threads))
    try:
        if ns.table:
            records = [json.loads(RunDir(os.path.dirname(p) or ".").read_text(os.path.basename(p)))
                       for p in ns.table]
            table = transfer_table(records)
            print(table)
            if ns.out:
                RunDir(ns.out).write_text("transfer.md", table + "\n")
            return 0
        positionals = list(ns.args)
        if not positionals or "=" in positionals[0]:
            raise ConfigError("give CONFIG first: the task's config (e.g. fashion_mnist_lenet with "
                              "train.basis_run=RUN), then key=value overrides")
        if not ns.weights:
            raise ConfigError("--weights: required: φ's weights.pt (RUN/l2o/weights.pt of `raysub l2o meta-train`), "
                              "the run directory, or adam_like")
        out = RunDir(ns.out or "runs/l2o_meta_test")
        cfg = load_config(resolve_config(positionals[0]), [*positionals[1:], f"run_dir={out.uri}"])
        horizons = [int(h) for h in ns.horizons.split(",") if h]
        schedules = [x for x in ns.schedules.split(",") if x]
        grids = parse_grids(ns.baselines, ns.lr_grid)
        steps = ns.steps if ns.steps is not None else cfg.l2o.steps
        if out.exists("meta_test.json") and not ns.overwrite:
            raise ConfigError(f"{out.arg('meta_test.json')} exists: pass --overwrite to replace it, or another --out")
        weights = ns.weights
        metatest.check_meta_test(cfg, None if weights == "adam_like" else weights, steps, horizons, ns.seeds,
                                 ns.val_seeds if ns.val_seeds is not None else cfg.l2o.validation_optimizees,
                                 grids, schedules, metatest.adam_lr_arg(ns.adam_lr))
        out.makedirs()
        if weights == "adam_like":
            weights = write_adam_like(cfg, out)
            print(f"{PROG}: warning: --weights adam_like: the hand-built Adam-like φ, not a meta-trained one",
                  file=sys.stderr, flush=True)
        record = metatest.meta_test(cfg, weights, steps, horizons, ns.seeds, ns.val_seeds, grids, ns.z0_std,
                                    say=lambda s: print(s, flush=True), progress_every=ns.progress_every,
                                    schedules=schedules, processes=ns.procs,
                                    phi_adam_lr=metatest.adam_lr_arg(ns.adam_lr))
    except (RaysubError, ValueError) as exc:  # ours, or a bad number in --horizons
        problems = exc.problems if isinstance(exc, RaysubError) else [f"{exc} (--horizons takes e.g. 1,2,5)"]
        print(f"{PROG}: error: {'; '.join(problems)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (nothing is resumed: rerun with --overwrite)", file=sys.stderr, flush=True)
        return 130
    record["trained_on"] = ns.trained_on or ("adam_like (hand-built)" if ns.weights == "adam_like"
                                             else metatest.trained_on(weights))
    out.write_text(layout.CONFIG, cfg.to_yaml("# the meta-test task; rerun: python jobs/l2o_meta_test.py "
                                               f"{out.arg(layout.CONFIG)} --weights ... --out {out.uri} --overwrite\n"))
    out.write_json("meta_test.json", record)
    plot_meta_test(out, record)
    print(meta_test_table(record), flush=True)
    print(f"{PROG}: {out.arg('meta_test.json')}, {out.arg('loss_curves.png')}", flush=True)
    print(json.dumps(strict_json(headline(record))), flush=True)
    return 0
