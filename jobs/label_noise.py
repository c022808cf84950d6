"""Label-noise robustness, the DLDR Table 4 protocol: SGD final / SGD best vs P-SGD at several d, per noise level.

For every noise level c a fixed random fraction c of the training labels is replaced by uniformly random labels
(fixed by the seed: every method sees the same corrupted labels). At each level: one full-SGD run whose
trajectory is sampled, the basis at max(d), then P-SGD from θ0 at each d. "SGD best" is the best test accuracy
seen during SGD (a reference only: it selects on the test set). Writes OUT/label_noise.json, OUT/label_noise.md
(the table) and OUT/label_noise.png (test accuracy vs c per method); each level's run directory is OUT/c0.8 etc.
Re-running continues finished levels and stages (they are skipped).

Time: Fashion-MNIST LeNet-5 on 2 CPU cores, one level ≈ 5 min of SGD + 1–2 min per P-SGD dimension.

Local:

    python jobs/label_noise.py                                         # fashion_mnist_lenet, c = 0, .7, .8, .9
    python jobs/label_noise.py --levels 0.8 --dims 10,20,30,40 --out runs/label_noise
    python jobs/label_noise.py quickstart --levels 0.0,0.8 --dims 5,10   # digits, a minute per level

On a cluster (RAY_AUTH_MODE=token for token-auth clusters; see cluster/local.md):

    ray job submit --working-dir . -- python jobs/label_noise.py fashion_mnist_lenet --out /shared/label_noise

Last line of output: one JSON object with the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys



def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="fashion_mnist_lenet", help="shipped config name or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    p.add_argument("--levels", default="0.0,0.7,0.8,0.9", help="noise fractions c, comma-separated")
    p.add_argument("--dims", default="10,20,30,40", help="P-SGD dimensions d, comma-separated")
    p.add_argument("--out", default="runs/label_noise", help="output directory (local path or URI)")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    from raysub import pipeline
    from raysub.pipeline.plan import plan
    from raysub.pipeline.basis import basis_dir
    from raysub.cli import resolve_config
    from raysub.config import load_config
    from raysub.errors import ConfigError, RaysubError
    from raysub.storage import RunDir, join_uri

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        levels = [float(c) for c in args.levels.split(",")]
        dims = sorted(int(d) for d in args.dims.split(","))
    except ValueError:
        print("label_noise: error: --levels and --dims take comma-separated numbers, e.g. --levels 0.7,0.8",
              file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if os.environ.get("RAY_ADDRESS") and not any(o.startswith("cluster.address=") for o in overrides):
        overrides.append("cluster.address=auto")
    out = RunDir(args.out)
    try:
        cfgs = {}
        for c in levels:
            cfg = load_config(resolve_config(args.config),
                              overrides + [f"data.label_noise={c}", f"run_dir={join_uri(out.uri, f'c{c}')}", f"basis.dim={dims[-1]}"])
            plan(cfg)  # every level is checked before any starts
            if not 0 < dims[0]:
                raise ConfigError(f"--dims {args.dims}: dimensions must be positive")
            cfgs[c] = cfg
        rows = []
        for c, cfg in cfgs.items():
            print(f"== label noise c={c} ==", flush=True)
            pipeline.stage_sample(cfg, resume=True)
            run = RunDir(cfg.run_dir)
            if basis_dir(run) is None:
                pipeline.stage_basis(cfg.run_dir, [f"basis.dim={dims[-1]}"])
            for d in dims:
                pipeline.stage_train(cfg.run_dir, [f"train.dim={d}", f"train.label=psgd_d{d}"], resume=True)
            res = pipeline.read_summary(run)["results"]
            rows.append({"c": c, **{f"psgd_d{d}": res[f"psgd_d{d}"]["test_acc"] for d in dims},
                         "sgd_final": res["sgd"]["test_acc"],
                         "sgd_best": max(h["test_acc"] for h in res["sgd"]["history"])})
    except RaysubError as exc:
        print(f"label_noise: error: {'; '.join(exc.problems)}", file=sys.stderr)
        return 2
    methods = [f"psgd_d{d}" for d in dims] + ["sgd_final", "sgd_best"]
    table = ["| c | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    table += ["| " + " | ".join([f"{r['c']:.1f}"] + [f"{100 * r[m]:.2f}" for m in methods]) + " |" for r in rows]
    out.write_text("label_noise.md", "\n".join(table) + "\n")
    out.write_json("label_noise.json", {"dims": dims, "levels": levels, "rows": rows})
    plot(out, rows, methods)
    print("\n".join(table))
    print(json.dumps({"rows": rows}))
    return 0


def plot(out, rows, methods) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
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


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
