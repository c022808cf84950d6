"""Time to accuracy: the DLDR pipeline with P-BFGS against full SGD, from one run (DLDR §5.3, Fig. 4).

One SGD run (Fashion-MNIST LeNet-5 by default, the shipped ``fashion_mnist_lenet`` config) trains for
``sgd.epochs`` and is sampled during its first ``sample.epochs`` — so both sides share θ0, data order and
machine load. Then the basis (d = 40) and P-BFGS from θ0. The target is SGD's final test accuracy − 0.5 point.

    pipeline time = sampling window + basis + P-BFGS training time until it first reaches the target
    pipeline_over_sgd = pipeline time / full-SGD training time      (paper: ~0.70; goal ≤ 0.50)

Training times are Ray Train loop times (Ray start-up excluded on both sides). P-BFGS defaults follow the paper
(batch 1024, c = 0.4, β = 0.55); the window is shortened to 8 epochs sampled 6 times each (49 snapshots ≥ d + 1),
since sampling is the cost. Takes about 8 minutes on 2 CPU cores.

Local:
    python jobs/bench/time_to_accuracy.py [--out runs/bench_tta] [key=value ...] [--overwrite | --resume]
On a cluster (RAY_AUTH_MODE=token for token-auth clusters):
    ray job submit --working-dir . -- python jobs/bench/time_to_accuracy.py --out /shared/bench_tta

An --out that already holds a run is refused (its figures would be old ones): --overwrite starts it afresh,
--resume continues a killed bench with the same config (the library refuses a config that differs).

Last line: one JSON object with pipeline_over_sgd, pbfgs_test_acc, sgd_test_acc and the parts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


DEFAULTS = ["sample.epochs=8", "sample.snapshots_per_epoch=6", "basis.dim=40", "train.optimizer=pbfgs",
            "train.label=pbfgs", "train.batch_size=1024", "train.epochs=10"]


def check_out(cfg, resume: bool, overwrite: bool) -> None:
    """Refuse an ``--out`` that already holds a run unless ``--overwrite`` or ``--resume`` says what to do with it;
    on ``--resume``, the library's check that the config is the run's own (nothing runs, nothing is written).

    Raises:
        ConfigError: one line naming the directory and the fix.
    """
    from raysub.errors import ConfigError
    from raysub.pipeline.records import STAGE_CHECKED, prepare_run_dir
    from raysub.storage import RunDir

    run = RunDir(cfg.run_dir)
    if run.is_nonempty() and not (resume or overwrite):
        raise ConfigError(f"--out {run.uri} already holds a run (rerunning would report its old figures): pass "
                          f"--overwrite to start it fresh, or pick a new --out (--resume continues a killed bench)")
    prepare_run_dir(run, resume, overwrite, cfg, STAGE_CHECKED)


def main(argv=None) -> int:
    from raysub import pipeline
    from raysub.cli import resolve_config
    from raysub.config import load_config
    from raysub.errors import ConfigError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--config", default="fashion_mnist_lenet")
    p.add_argument("--out", default="runs/bench_tta")
    p.add_argument("--margin", type=float, default=0.005, help="target = SGD final accuracy − margin")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--resume", action="store_true", help="continue a killed bench in --out (same config only)")
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(resolve_config(args.config), DEFAULTS + [f"run_dir={args.out}"] + args.overrides)
        check_out(cfg, args.resume, args.overwrite)
    except ConfigError as err:
        print(f"time_to_accuracy: error: {'; '.join(err.problems)}", file=sys.stderr)
        return 2
    summary = pipeline.run_pipeline(cfg, resume=args.resume, overwrite=args.overwrite)
    sgd = summary["results"]["sgd"]
    pb = summary["results"][cfg.train_label]
    target = sgd["test_acc"] - args.margin
    reached = [h for h in pb["history"] if h["test_acc"] >= target]
    sgd_reached = [h for h in sgd["history"] if h["test_acc"] >= target]
    t = summary["timings"]
    pb_time = reached[0]["elapsed_s"] if reached else None
    pipeline_s = t["sample_s"] + t["basis_s"] + pb_time if reached else None
    out = {
        "sgd_test_acc": sgd["test_acc"], "sgd_epochs": sgd["epochs"], "sgd_s": sgd["wall_s"],
        "target_acc": target,
        "sgd_epochs_to_target": sgd_reached[0]["epoch"] if sgd_reached else None,
        "sgd_s_to_target": sgd_reached[0]["elapsed_s"] if sgd_reached else None,
        "sample_s": t["sample_s"], "sample_epochs": cfg.sample.epochs, "basis_s": t["basis_s"],
        "pbfgs_test_acc": pb["test_acc"], "pbfgs_best_test_acc": max(h["test_acc"] for h in pb["history"]),
        "pbfgs_epochs_to_target": reached[0]["epoch"] if reached else None, "pbfgs_s_to_target": pb_time,
        "pbfgs_s_total": pb["wall_s"], "pbfgs_convergence_step": pb.get("convergence_step"),
        "pbfgs_line_search": pb["history"][-1].get("optimizer_stats"),
        "pipeline_s": pipeline_s,
        "pipeline_over_sgd": pipeline_s / sgd["wall_s"] if reached else None,
        "goal_pipeline_over_sgd": 0.5,
    }
    print(f"SGD: {100 * sgd['test_acc']:.2f}% after {sgd['epochs']} epochs in {sgd['wall_s']:.1f}s; "
          f"target {100 * target:.2f}%")
    if reached:
        print(f"pipeline: sampling {t['sample_s']:.1f}s ({cfg.sample.epochs} epochs) + basis {t['basis_s']:.1f}s + "
              f"P-BFGS {pb_time:.1f}s ({reached[0]['epoch']} epochs) = {pipeline_s:.1f}s "
              f"-> {out['pipeline_over_sgd']:.3f} of full SGD")
    else:
        print(f"P-BFGS did not reach the target in {pb['epochs']} epochs (best "
              f"{100 * out['pbfgs_best_test_acc']:.2f}%): pipeline_over_sgd is null")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main())
