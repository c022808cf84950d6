"""Images per second into 2 Ray Train workers: Ray Data (from an S3-protocol server, and from local disk) against
the torch DataLoader from local disk, on the same generated JPEGs, 64² and 224² crops (`jobs/bench/data_ingest.py`).

One `TorchTrainer` fit of 2 workers (half a CPU each) measures every side, running the ImageNet dataset's training
path exactly as the loops do (`raysub.engine.loop.epoch_batches`, then ``batches(..., augment=True)``: decode,
random-resized crop, flip, normalise), with no model: what is measured is the data path. Per crop size, a warm-up
epoch of every side (loader processes, Ray Data's task workers), then rounds of one epoch per side in rotated
order, so that the machine's other load falls on every side alike. A side's figure is its measured epochs' images
over their wall time, both ranks together, from a barrier to the last rank's end; its cores are the machine's busy
time over that wall time (/proc/stat: every process counts, the S3 server's too).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Dict

from raysub.bench.harness import OneLineParser, loadavg, print_figures

SIDES = ("dataloader_local", "ray_data_local", "ray_data_s3")


def make_images(root: str, count: int, classes: int, width: int, height: int, seed: int = 0) -> int:
    """``root/{train,val}/cNN/*.JPEG``: ``count`` training JPEGs of about ImageNet's mean size (quality 90), smooth
    shapes plus noise so that they compress like photographs rather than like noise. Returns their bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for split, n in (("train", count), ("val", classes)):
        for i in range(n):
            c = i % classes
            folder = os.path.join(root, split, f"c{c:02d}")
            os.makedirs(folder, exist_ok=True)
            coarse = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (height, width, 3))
            path = os.path.join(folder, f"img_{i:05d}.JPEG")
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
            total += os.path.getsize(path) if split == "train" else 0
    return total


def s3_server_rate(uri: str, local: str, count: int = 256) -> float:
    """Objects per second the S3 server serves to 8 reading threads: the ceiling of the ray_data_s3 side."""
    import concurrent.futures

    from raysub.data import image_tree

    _, files = image_tree.list_split(uri, "train")
    paths = [p for p, _ in files][:count]
    fs, _ = image_tree.filesystem(uri)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: image_tree.read_object(fs, p), paths))
    return len(paths) / (time.perf_counter() - t0)


def _cpu_jiffies():
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _ingest_loop(config: Dict) -> None:
    """Train worker: for every crop size, a warm-up epoch of every side, then ``rounds`` rounds of one epoch per
    side in rotated order (`raysub.bench.harness.rounds`); rank 0 writes the figures."""
    import ray.train
    import torch
    import torch.distributed as dist

    from raysub.bench.harness import rounds
    from raysub.data import load_dataset
    from raysub.engine import loop

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sides = list(config["sides"])
    figures: Dict[str, Dict] = {side: {} for side in sides}
    for size in config["sizes"]:
        datasets = {}
        for side, root in config["sides"].items():
            options = {"ingest": "ray_data", "preprocess_cpus": config["preprocess_cpus"]} \
                if side.startswith("ray_data") else {"ingest": "dataloader"}
            datasets[side] = load_dataset("imagenet", root, image_size=size, **options)
            datasets[side].stream.block_rows = config.get("block_rows", datasets[side].stream.block_rows)

        def epoch_of(side: str, epoch: int):
            ds = datasets[side]
            batches = loop.epoch_batches(ds.size("train"), config["batch"], 0, epoch, rank, world)
            loaders = 0 if side.startswith("ray_data") else config["loader_workers"]
            dist.barrier()
            cpu0, t0 = _cpu_jiffies(), time.perf_counter()
            n = 0
            for x, y in ds.batches("train", batches, augment=True, seed=epoch, num_workers=loaders):
                assert x.shape[1:] == (3, size, size)
                n += len(y)
            done = torch.tensor([n, time.perf_counter() - t0], dtype=torch.float64)
            gathered = [torch.zeros_like(done) for _ in range(world)]
            dist.all_gather(gathered, done)
            cpu1 = _cpu_jiffies()
            wall = max(float(g[1]) for g in gathered)
            cores = (cpu1[0] - cpu0[0]) / max(1, cpu1[1] - cpu0[1]) * os.cpu_count()
            return int(sum(float(g[0]) for g in gathered)), wall, cores

        first = {side: epoch_of(side, 0)[1] for side in sides}  # warm-up: loader processes, Ray Data's workers
        totals = {side: [0, 0.0, 0.0] for side in sides}  # images, wall, cores × wall
        for r, order in rounds(sides, config["rounds"]):
            for side in order:
                images, wall, cores = epoch_of(side, 1 + r)
                totals[side][0] += images
                totals[side][1] += wall
                totals[side][2] += cores * wall
        for side, (images, wall, busy) in totals.items():
            figures[side][str(size)] = {"images_per_s": images / wall, "first_epoch_s": first[side],
                                        "cores_busy": busy / wall, "epochs_measured": config["rounds"]}
    if rank == 0:  # one node: the driver reads it back (Train V2 keeps no metrics without a checkpoint)
        with open(config["out"], "w") as f:
            json.dump(figures, f)


def figures(results: Dict[str, Dict[str, Dict]], server_rate, sizes) -> Dict:
    """The JSON figures of the sides' records ({side: {size: {"images_per_s", "cores_busy", ...}}}): each side's
    rate and cores per size, and the ratios (per size, and the worse size under the bare name)."""
    fig: Dict = {}
    if server_rate is not None:
        fig["s3_server_gets_per_s"] = round(server_rate, 1)
    for side, per_size in results.items():
        for size, f in per_size.items():
            fig[f"{side}_images_per_s_{size}"] = round(f["images_per_s"], 1)
            fig[f"{side}_cores_{size}"] = round(f["cores_busy"], 2)
    pairs = {"ray_data_over_dataloader": ("ray_data_local", "dataloader_local"),  # the data path alone
             "s3_over_local": ("ray_data_s3", "ray_data_local"),  # the storage alone
             "ray_data_s3_over_dataloader": ("ray_data_s3", "dataloader_local")}  # both: the product
    for name, (a, b) in pairs.items():
        if {a, b} <= set(results):
            for size in sizes:
                fig[f"{name}_{size}"] = round(results[a][str(size)]["images_per_s"]
                                              / results[b][str(size)]["images_per_s"], 3)
            fig[name] = min(fig[f"{name}_{size}"] for size in sizes)  # the worse crop size
    if server_rate is not None and "ray_data_s3" in results:
        fig["ray_data_s3_over_server_gets"] = round(
            max(results["ray_data_s3"][str(s)]["images_per_s"] for s in sizes) / server_rate, 3)
    return fig


def run_sides(sides: Dict[str, str], args) -> Dict:
    """One fit of 2 Train workers (half a CPU each: the DataLoader's processes and Ray Data's tasks take the rest)
    measuring every side: {side: {size: figures}}."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {"sides": sides, "sizes": args.sizes, "rounds": args.rounds, "batch": args.batch,
              "loader_workers": args.loader_workers, "preprocess_cpus": args.preprocess_cpus,
              "block_rows": args.block_rows,
              "out": os.path.join(args.work, "figures.json")}
    trainer = TorchTrainer(
        _ingest_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="ingest", storage_path=os.path.join(args.work, "ray_results")))
    trainer.fit()
    with open(config["out"]) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = OneLineParser("data_ingest", prog="python jobs/bench/data_ingest.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048, help="training JPEGs (default 2048)")
    ap.add_argument("--width", type=int, default=500, help="JPEG width (ImageNet's mean is about 500×400)")
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="crop sizes (default 64 224)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measured rounds per size, one epoch of every side each, in rotated order (default 3)")
    ap.add_argument("--batch", type=int, default=64, help="global batch (default 64: 32 per worker)")
    ap.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes per Train worker (default 1)")
    ap.add_argument("--preprocess-cpus", type=float, default=1.0, help="CPUs per Ray Data decode task (default 1)")
    ap.add_argument("--block-rows", type=int, default=128,
                    help="images per Ray Data decode task at least (consecutive batches joined; default 128)")
    ap.add_argument("--num-cpus", type=int, default=4, help="the local Ray cluster's logical CPUs (default 4)")
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1 (a warm-up epoch of every side comes first)")

    import ray

    args.work = tempfile.mkdtemp(prefix="raysub-ingest-")
    local = os.path.join(args.work, "images")
    try:
        t0 = time.perf_counter()
        nbytes = make_images(local, args.images, classes=8, width=args.width, height=args.height)
        print(f"{args.images} JPEGs of {args.width}×{args.height} ({nbytes / args.images / 1e3:.0f} kB each) in "
              f"{time.perf_counter() - t0:.1f} s; load {loadavg()}", flush=True)
        server = uri = server_rate = None
        if "ray_data_s3" in args.sides:
            from moto.server import ThreadedMotoServer  # moto[server]: pip install -e .[test]

            import logging

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "raysub-bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "raysub-bench")
            os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
            import boto3

            client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
            client.create_bucket(Bucket="ingest")
            for dirpath, _, files in os.walk(local):
                for name in files:
                    path = os.path.join(dirpath, name)
                    client.upload_file(path, "ingest", "images/" + os.path.relpath(path, local))
            uri = f"s3://ingest/images?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
            server_rate = s3_server_rate(uri, local)
            print(f"the S3 server alone: {server_rate:.0f} GETs/s of these JPEGs (8 threads, this process); load "
                  f"{loadavg()}", flush=True)
        # a local cluster's workers inherit this process's environment (the S3 server's test credentials)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            results = run_sides({side: (uri if side == "ray_data_s3" else local) for side in args.sides}, args)
            for side, per_size in results.items():
                for size, f in per_size.items():
                    print(f"{side:17s} {size:>3s}²: {f['images_per_s']:7.1f} images/s over {f['epochs_measured']} "
                          f"interleaved epochs, {f['cores_busy']:.2f} cores busy, warm-up epoch "
                          f"{f['first_epoch_s']:.1f} s", flush=True)
            print(f"(one fit, {time.perf_counter() - t0:.0f} s); load {loadavg()}", flush=True)
        finally:
            ray.shutdown()
            if server is not None:
                server.stop()
        fig: Dict = {"images": args.images, "image_wh": [args.width, args.height], "cpus": os.cpu_count(),
                     "ray_logical_cpus": args.num_cpus, "loadavg": loadavg()}
        fig.update(figures(results, server_rate, args.sizes))
        print_figures(fig)
        return 0
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
