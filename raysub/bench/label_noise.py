"""Label-noise robustness, the DLDR Table 4 protocol: the logic of ``jobs/label_noise.py``.

Per noise level c: one full-SGD run on labels of which a fixed fraction c is replaced by uniformly random ones
(the same for every method), the basis at max(d), then P-SGD from θ0 at each d; the table compares P-SGD with
"SGD final" and "SGD best" (the best test accuracy seen during SGD: it selects on the test set, a reference only).
Finished levels and stages are skipped, so a rerun continues.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Any, Dict, List, Sequence

from raysub import pipeline
from raysub.cli import resolve_config
from raysub.config import Config, load_config
from raysub.errors import ConfigError, RaysubError
from raysub.runs.basis import basis_dir
from raysub.pipeline.plan import plan
from raysub.storage import RunDir, join_uri

PROG = "label_noise"
DESCRIPTION = ("Label-noise robustness, the DLDR Table 4 protocol: SGD final / SGD best vs P-SGD at several d, "
               "per noise level.")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The job's command line: [CONFIG] [key=value ...] --levels --dims --out."""
    p = argparse.ArgumentParser(prog=f"python jobs/{PROG}.py", description=DESCRIPTION)
    p.add_argument("config", nargs="?", default="fashion_mnist_lenet", help="shipped config name or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    p.add_argument("--levels", default="0.0,0.7,0.8,0.9", help="noise fractions c, comma-separated")
    p.add_argument("--dims", default="10,20,30,40", help="P-SGD dimensions d, comma-separated")
    p.add_argument("--out", default="runs/label_noise", help="output directory (local path or URI)")
    return p.parse_intermixed_args(list(argv))


def level_configs(config: str, overrides: Sequence[str], levels: Sequence[float], dims: Sequence[int],
                  out: RunDir) -> Dict[float, Config]:
    """One planned Config per level (run directory OUT/c<level>, basis at max(d)): every level is checked before
    any starts.

    Raises:
        ConfigError: a non-positive dimension, or a level's config problems.
    """
    if dims[0] <= 0:
        raise ConfigError(f"--dims {','.join(map(str, dims))}: dimensions must be positive")
    cfgs = {}
    for c in levels:
        cfg = load_config(resolve_config(config), [*overrides, f"data.label_noise={c}",
                                                   f"run_dir={join_uri(out.uri, f'c{c}')}", f"basis.dim={dims[-1]}"])
        plan(cfg)
        cfgs[c] = cfg
    return cfgs


def run_level(c: float, cfg: Config, dims: Sequence[int]) -> Dict[str, Any]:
    """Sample, basis and P-SGD at every d for one level (finished stages skipped); its table row."""
    print(f"== label noise c={c} ==", flush=True)
    pipeline.stage_sample(cfg, resume=True)
    run = RunDir(cfg.run_dir)
    if basis_dir(run) is None:
        pipeline.stage_basis(cfg.run_dir, [f"basis.dim={dims[-1]}"])
    for d in dims:
        pipeline.stage_train(cfg.run_dir, [f"train.dim={d}", f"train.label=psgd_d{d}"], resume=True)
    res = pipeline.read_summary(run)["results"]
    return {"c": c, **{f"psgd_d{d}": res[f"psgd_d{d}"]["test_acc"] for d in dims},
            "sgd_final": res["sgd"]["test_acc"], "sgd_best": max(h["test_acc"] for h in res["sgd"]["history"])}


def table(rows: Sequence[Dict[str, Any]], methods: Sequence[str]) -> List[str]:
    """The markdown table: one row per level, test accuracy (%) per method."""
    out = ["| c | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    out += ["| " + " | ".join([f"{r['c']:.1f}"] + [f"{100 * r[m]:.2f}" for m in methods]) + " |" for r in rows]
    return out


def plot(out: RunDir, rows: Sequence[Dict[str, Any]], methods: Sequence[str]) -> None:
    """OUT/label_noise.png: test accuracy vs c, one line per method."""
    import matplotlib  # local: only the report draws, and matplotlib costs a second to import

    matplotlib.use("Agg")
    # heavy: matplotlib loads here, not when this module is imported
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    cs = [r["c"] for r in rows]
    for m in methods:
        style = "--" if m.startswith("sgd") else "-"
        ax.plot(cs, [100 * r[m] for r in rows], style, marker="o", label=m.replace("_", " "))
    ax.set_xlabel("label noise fraction c")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("robustness to label noise (SGD best selects on test: reference only)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    out.write_bytes("label_noise.png", buf.getvalue())


def main(argv=None) -> int:
    """The job: parse ``argv`` (default ``sys.argv[1:]``), run every level, write the table, JSON and plot, print
    the table and the JSON line; returns the exit status (2: bad input)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        levels = [float(c) for c in args.levels.split(",")]
        dims = sorted(int(d) for d in args.dims.split(","))
    except ValueError:
        print(f"{PROG}: error: --levels and --dims take comma-separated numbers, e.g. --levels 0.7,0.8",
              file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if os.environ.get("RAY_ADDRESS") and not any(o.startswith("cluster.address=") for o in overrides):
        overrides.append("cluster.address=auto")
    out = RunDir(args.out)
    try:
        cfgs = level_configs(args.config, overrides, levels, dims, out)
        rows = [run_level(c, cfg, dims) for c, cfg in cfgs.items()]
    except RaysubError as exc:
        print(f"{PROG}: error: {'; '.join(exc.problems)}", file=sys.stderr)
        return 2
    methods = [f"psgd_d{d}" for d in dims] + ["sgd_final", "sgd_best"]
    lines = table(rows, methods)
    out.write_text("label_noise.md", "\n".join(lines) + "\n")
    out.write_json("label_noise.json", {"dims": dims, "levels": levels, "rows": rows})
    plot(out, rows, methods)
    print("\n".join(lines))
    print(json.dumps({"rows": rows}))
    return 0
