"""Time to accuracy: the production DLDR pipeline (adaptive window, P-BFGS) against full SGD (DLDR §5.3, Fig. 4).

Two runs in ``--out``, same config, seed, θ0 and data order, Ray Train loop times on both sides (Ray start-up
excluded), the load average printed with each:

    OUT/pipeline  sample → basis → train as in production: the streaming Gram, the adaptive window
                  (``sample.stop=adaptive``, at most ``sample.epochs`` = 15 epochs, a snapshot every 20 steps),
                  the stage ending with the window (``sgd.epochs`` = ``sample.epochs``: no baseline run), the
                  basis written by the sampling ranks at the window's end (``sample.write_basis``), then
                  P-BFGS from θ0 (the shipped ``fashion_mnist_lenet_pbfgs`` settings: batch 1024, c = 0.4,
                  β = 0.55, coordinates in units of the trajectory's std) for ``train.epochs`` = 6.
    OUT/sgd       the full-SGD reference: ``raysub sample`` of the same config for ``--sgd-epochs`` (30) epochs
                  with a one-snapshot window (sampling is not what it measures).

    target                       = SGD's final test accuracy − ``--margin`` (0.5 point)
    pipeline time                = sampling window (its epochs' loop time, the rank-written basis and the window's
                                   evaluations included) + basis stage (0 when the ranks wrote it) + P-BFGS
                                   training time until it first reaches the target
    pipeline_over_sgd            = pipeline time / full-SGD training time    (paper ~0.70; goal ≤ 0.40)
    pipeline_over_sgd_to_target  = pipeline time / SGD's own time to the target (goal ≤ 0.55)

Takes about 8-10 minutes on 2 CPU cores (Fashion-MNIST LeNet-5, 2 workers).

Local:
    python jobs/bench/time_to_accuracy.py [--out runs/bench_tta] [key=value ...] [--overwrite | --resume]
On a cluster (RAY_AUTH_MODE=token for token-auth clusters):
    ray job submit --working-dir . -- python jobs/bench/time_to_accuracy.py --out /shared/bench_tta

An --out that already holds a run is refused (its figures would be old ones): --overwrite starts it afresh,
--resume continues a killed bench with the same config (the library refuses a config that differs). key=value
overrides apply to both runs (the reference keeps its own window and epochs).

Last line: one JSON object with pipeline_over_sgd, pipeline_over_sgd_to_target, window_epochs, pbfgs_test_acc,
sgd_test_acc and the parts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


DEFAULTS = ["sample.epochs=15", "sgd.epochs=15", "sample.snapshot_every_steps=20", "sample.stream_gram=true",
            "sample.stop=adaptive", "sample.write_basis=true", "basis.dim=40", "train.epochs=6"]
REFERENCE = ["sample.epochs=1", "sample.snapshots_per_epoch=1", "sample.snapshot_every_steps=0",
             "sample.stream_gram=false", "sample.stop=fixed", "sample.write_basis=false", "basis.dim=1"]


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def configs(config: str, out: str, overrides, sgd_epochs: int):
    """(pipeline config, reference config): the same config, seed and data; the reference trains ``sgd_epochs``
    with a one-snapshot window.

    Raises:
        ConfigError: a bad override (one line).
    """
    from raysub.cli import resolve_config
    from raysub.config import load_config

    path = resolve_config(config)
    pipe = load_config(path, DEFAULTS + list(overrides) + [f"run_dir={out}/pipeline"])
    ref = load_config(path, DEFAULTS + list(overrides) + REFERENCE + [f"sgd.epochs={sgd_epochs}",
                                                                        f"run_dir={out}/sgd"])
    return pipe, ref


def figures(summary, ref_summary, manifest, margin: float):
    """The bench's figures from the pipeline run's summary and `Manifest` and the reference run's summary."""
    sgd = ref_summary["results"]["sgd"]
    label = [k for k in summary["results"] if k not in ("sgd", "sgd@sample")][0]
    pb = summary["results"][label]
    target = sgd["test_acc"] - margin
    reached = [h for h in pb["history"] if h["test_acc"] >= target]
    sgd_reached = [h for h in sgd["history"] if h["test_acc"] >= target]
    t = summary["timings"]
    by_sampler = manifest.stages["basis"].get("gram_source") == "sampler"
    basis_s = 0.0 if by_sampler else t["basis_s"]
    pb_time = reached[0]["elapsed_s"] if reached else None
    pipeline_s = t["sample_s"] + basis_s + pb_time if reached else None
    sgd_s_to_target = sgd_reached[0]["elapsed_s"] if sgd_reached else None
    stage = manifest.stages["sample"]
    return {
        "sgd_test_acc": sgd["test_acc"], "sgd_epochs": sgd["epochs"], "sgd_s": sgd["wall_s"], "target_acc": target,
        "sgd_epochs_to_target": sgd_reached[0]["epoch"] if sgd_reached else None, "sgd_s_to_target": sgd_s_to_target,
        "window_epochs": stage["window_epochs"], "num_snapshots": stage["num_snapshots"],
        "stop_signal": [{k: s.get(k) for k in ("epoch", "reach_residual", "residual_drop")}
                        for s in stage.get("stop_signal", [])],
        "sample_s": t["sample_s"], "basis_s": t["basis_s"], "basis_by_sampler": by_sampler,
        "sgd_acc_at_window": summary["results"]["sgd"]["test_acc"],
        "pbfgs_test_acc": pb["test_acc"], "pbfgs_best_test_acc": max(h["test_acc"] for h in pb["history"]),
        "pbfgs_epochs_to_target": reached[0]["epoch"] if reached else None, "pbfgs_s_to_target": pb_time,
        "pbfgs_s_total": pb["wall_s"], "pbfgs_history": [round(h["test_acc"], 4) for h in pb["history"]],
        "pbfgs_line_search": pb["history"][-1].get("optimizer_stats"),
        "pipeline_s": pipeline_s,
        "pipeline_over_sgd": pipeline_s / sgd["wall_s"] if reached else None,
        "pipeline_over_sgd_to_target": pipeline_s / sgd_s_to_target if reached and sgd_s_to_target else None,
        "goal_pipeline_over_sgd": 0.40, "goal_pipeline_over_sgd_to_target": 0.55,
    }


def check_out(cfg, resume: bool, overwrite: bool) -> None:
    """Refuse an ``--out`` that already holds a run unless ``--overwrite`` or ``--resume`` says what to do with it;
    on ``--resume``, the library's check that the config is the run's own (nothing runs, nothing is written).

    Raises:
        ConfigError: one line naming the directory and the fix.
    """
    from raysub.errors import ConfigError
    from raysub.runs.open import open_run
    from raysub.runs.records import STAGE_CHECKED
    from raysub.storage import RunDir

    run = RunDir(cfg.run_dir)
    if run.is_nonempty() and not (resume or overwrite):
        raise ConfigError(f"--out {run.uri} already holds a run (rerunning would report its old figures): pass "
                          f"--overwrite to start it fresh, or pick a new --out (--resume continues a killed bench)")
    with open_run(cfg, resume=resume, overwrite=overwrite, also_safe=STAGE_CHECKED):  # the checks only: no Ray, no θ0
        pass


def main(argv=None) -> int:
    from raysub import pipeline
    from raysub.errors import RaysubError
    from raysub.runs import layout
    from raysub.runs.manifest import Manifest
    from raysub.storage import RunDir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (both runs)")
    p.add_argument("--config", default="fashion_mnist_lenet_pbfgs")
    p.add_argument("--out", default="runs/bench_tta")
    p.add_argument("--sgd-epochs", type=int, default=30, help="the full-SGD reference's epochs")
    p.add_argument("--margin", type=float, default=0.005, help="target = SGD final accuracy − margin")
    p.add_argument("--overwrite", action="store_true", help="replace the runs already in --out")
    p.add_argument("--resume", action="store_true", help="continue a killed bench in --out (same config only)")
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, ref_cfg = configs(args.config, args.out, args.overrides, args.sgd_epochs)
        for c in (cfg, ref_cfg):
            check_out(c, args.resume, args.overwrite)
    except RaysubError as err:
        print(f"time_to_accuracy: error: {'; '.join(err.problems)}", file=sys.stderr)
        return 2
    loads = {"start": loadavg()}
    print(f"[bench] load average at start: {loads['start']}", flush=True)
    summary = pipeline.run_pipeline(cfg, resume=args.resume, overwrite=args.overwrite)
    loads["after_pipeline"] = loadavg()
    print(f"[bench] load average after the pipeline: {loads['after_pipeline']}; now the full-SGD reference", flush=True)
    pipeline.stage_sample(ref_cfg, resume=args.resume, overwrite=args.overwrite)
    loads["end"] = loadavg()
    ref_summary = RunDir(ref_cfg.run_dir).read_json(layout.SUMMARY)
    manifest = Manifest.read(RunDir(cfg.run_dir))
    out = figures(summary, ref_summary, manifest, args.margin)
    out["load_average"] = loads
    print(f"SGD: {100 * out['sgd_test_acc']:.2f}% after {out['sgd_epochs']} epochs in {out['sgd_s']:.1f}s; target "
          f"{100 * out['target_acc']:.2f}% at epoch {out['sgd_epochs_to_target']} ({out['sgd_s_to_target']}s)")
    print(f"adaptive window: {out['window_epochs']} epochs, {out['num_snapshots']} snapshots, {out['sample_s']:.1f}s "
          f"(SGD at the window's end: {100 * out['sgd_acc_at_window']:.2f}%)")
    if out["pipeline_s"] is not None:
        print(f"pipeline: window {out['sample_s']:.1f}s + basis {0.0 if out['basis_by_sampler'] else out['basis_s']:.1f}s"
              f" + P-BFGS {out['pbfgs_s_to_target']:.1f}s ({out['pbfgs_epochs_to_target']} epochs) = "
              f"{out['pipeline_s']:.1f}s -> {out['pipeline_over_sgd']:.3f} of full SGD, "
              f"{out['pipeline_over_sgd_to_target']:.3f} of SGD's time to the target")
    else:
        print(f"P-BFGS did not reach the target in {len(out['pbfgs_history'])} epochs (best "
              f"{100 * out['pbfgs_best_test_acc']:.2f}%): pipeline_over_sgd is null")
    print(f"load average: {loads}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main())
