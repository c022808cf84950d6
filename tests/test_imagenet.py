"""ImageNet ResNet-18 end to end (jobs/imagenet_resnet18.py on a tiny generated ImageFolder, the shared Ray session),
the recipes it ships, and the persistent ImageNet DataLoader.

The generated ImageFolder has 3 classes whose images differ in their dominant colour channel (plus seeded noise and
a random brightness), so a ResNet-18 learns it within a few steps and the accuracies say something: chance is 1/3.
"""
from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest
import torch

from test_pipeline import trajectory

from raysub import data
from raysub.engine.flat import flatten_params
from raysub.models import build_model
from raysub.storage import RunDir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("n01440764", "n01443537", "n01484850")


def make_colour_imagefolder(root, train_per_class=16, val_per_class=8, size=40, seed=0):
    """root/{train,val}/<wnid>/*.JPEG: class k's images are bright in channel k, every pixel noisy (seeded)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for k, wnid in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, wnid))
            for i in range(count):
                arr = rng.randint(0, 90, (size, size, 3))
                arr[..., k] += rng.randint(100, 166)
                Image.fromarray(arr.astype(np.uint8)).save(os.path.join(root, split, wnid, f"{wnid}_{i}.JPEG"))


def load_job(monkeypatch):
    monkeypatch.syspath_prepend(REPO)  # jobs/ by its module name, wherever pytest was started
    return importlib.import_module("jobs.imagenet_resnet18")


@pytest.fixture(scope="module")
def colour_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_colour")
    make_colour_imagefolder(root)
    return root


# ----------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def colour_s3(colour_root):
    """``colour_root`` uploaded to the loopback S3 server (tests/helpers.py): its data.root URI."""
    pytest.importorskip("moto.server", reason="moto[server] (pip install -e .[test]) runs the S3 server")
    from helpers import loopback_s3

    with loopback_s3() as s3:
        s3.upload(colour_root, "colour")
        yield s3.uri("colour")


@pytest.mark.system  # ImageNet end to end, from the loopback S3 server
def test_imagenet_job_pbfgs_end_to_end(ray_session, colour_root, colour_s3, tmp_path, monkeypatch, capsys):
    """`python jobs/imagenet_resnet18.py --recipe pbfgs data.root=s3://...` (the paper's recipe: 3 snapshots per
    epoch, d-dim basis, then P-BFGS), shrunk: 32² crops, 2 gloo workers with channels_last, 2 SGD epochs of 3 steps
    (7 snapshots), d = 4, 1 P-BFGS epoch (its line searches cost ~10 trial forwards per step here: the paper's
    unscaled z with B0 = I overshoots). The images stream from the S3 server through Ray Data (decoded by Ray
    Data's tasks) into sampling, evaluation and the subspace stage. Both workers fail after SGD step 4 (mid epoch
    2) and Ray Train restores them from epoch 1's checkpoint (cluster.max_failures=1); the trajectory must then
    equal, bit for bit, the same sampling run on the local tree through the DataLoader, uninterrupted.

    Catches (Ray Data and the resume): a restored worker that does not replay the interrupted epoch's batches
    (their examples or their crops), the S3 path's samples differing from the local path's (listing order,
    decoding, the per-image seed), a rank reading the other rank's share.

    Catches: a job that loses its recipe (psgd instead of pbfgs), data.image_size not reaching the dataset (224²
    crops), the snapshot count of 3-per-epoch sampling, channels_last snapshots written in memory (NHWC) order
    instead of the parameters' logical order (snapshot 0 ≠ θ0), a subspace run that does not start at θ0 on the
    sampler's first batch, a stage missing from the run directory, an evaluation that drops or repeats validation
    images across the ranks (accuracy not k/24), SGD that does not learn the colours. Eval-mode accuracy itself is
    not asserted: after 6 steps BatchNorm's running statistics (momentum 0.1) are still mostly their init values,
    so it swings with the settings whatever the training did (measured 33–67% for SGD, 12–42% for P-BFGS)."""
    from raysub.cli import main as cli_main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_dir = tmp_path / "imagenet"
    common = ["data.image_size=32", "data.batch_size=16", "data.eval_batch_size=24", "cluster.use_gpu=false",
              "cluster.num_workers=2", "cluster.cpus_per_worker=1", "compute.channels_last=true", "sgd.lr=0.01",
              "sgd.epochs=2", "sgd.lr_milestones=[]", "sample.epochs=2", "basis.dim=4"]
    reference = tmp_path / "local_dataloader"
    assert cli_main(["sample", os.path.join(REPO, "raysub", "configs", "imagenet_resnet18_pbfgs.yaml"), *common,
                     f"data.root={colour_root}", "data.num_workers=1", "cluster.max_failures=0",
                     f"run_dir={reference}"]) == 0
    monkeypatch.setenv("RAYSUB_FAIL_AT_STEP", "4")
    args = ["--recipe", "pbfgs", f"data.root={colour_s3}", "data.image_size=32", "data.batch_size=16",
            "data.eval_batch_size=24", "data.preprocess_cpus=1", "cluster.use_gpu=false", "cluster.num_workers=2",
            "cluster.cpus_per_worker=1", "cluster.max_failures=1", "compute.channels_last=true", "sgd.lr=0.01",
            "sgd.epochs=2", "sgd.lr_milestones=[]", "sample.epochs=2", "basis.dim=4", "train.epochs=1",
            "train.batch_size=16", f"run_dir={run_dir}"]
    t0 = time.perf_counter()
    assert load_job(monkeypatch).main(args) == 0
    wall = time.perf_counter() - t0
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"\nimagenet job end to end: {wall:.1f} s; loadavg {open('/proc/loadavg').read().strip()}")
    assert "[sgd] epoch 2/2" in out and "[pbfgs] epoch 1/1" in out
    run = RunDir(str(run_dir))
    config = run.read_json("manifest.json")["config"]
    assert config["train"]["optimizer"] == "pbfgs" and config["train"]["optimizer_options"]["beta"] == 0.55
    assert config["data"]["image_size"] == 32 and config["sample"]["snapshots_per_epoch"] == 3
    assert config["data"]["root"].startswith("s3://raysub-test/colour")
    summary = run.read_json("summary.json")
    assert summary["num_params"] == 11_178_051  # ResNet-18 with a 3-class head
    assert summary["num_snapshots"] == 1 + 2 * 3 and summary["dim"] == 4
    assert {"sample_s", "basis_s", "train_s"} <= set(summary["timings"])
    r = summary["results"]
    assert {"sgd", "pbfgs"} <= set(r) and "psgd" not in r
    assert r["pbfgs"]["steps"] == 48 // 16 and r["pbfgs"]["history"][-1]["optimizer_stats"]["steps"] == 3
    for method in ("sgd", "pbfgs"):
        for epoch in r[method]["history"]:
            assert 0 <= epoch["test_acc"] <= 1 and abs(epoch["test_acc"] * 24 - round(epoch["test_acc"] * 24)) < 1e-9
            assert np.isfinite(epoch["test_loss"])
    sgd_losses = run.read_json("curves/sgd.json")["train_loss"]
    pbfgs_losses = run.read_json("curves/pbfgs.json")["train_loss"]
    assert len(sgd_losses) == 6 and len(pbfgs_losses) == 3 and np.isfinite(pbfgs_losses).all()
    assert np.mean(sgd_losses[3:]) < 0.75 * sgd_losses[0]  # the colours are learnt (θ0: ≈ ln 3; measured 0.37)
    # z = 0 is θ0 and the subspace run's data order is the sampler's: the same first batch at the same point
    assert abs(pbfgs_losses[0] - sgd_losses[0]) < 1e-4
    model = build_model("resnet18", 3, (3, 32, 32))
    model.load_state_dict(run.read_theta0())
    W = trajectory(str(run_dir))
    np.testing.assert_array_equal(W[0], flatten_params(model).numpy())
    assert run.exists("train/pbfgs.pt") and (run_dir / "plots" / "test_accuracy.png").exists()
    assert run.read_text("failure_injected") == "step 4\n"  # it did fail, mid-epoch, and was restored
    np.testing.assert_array_equal(W, trajectory(str(reference)))


def test_imagenet_job_recipes(monkeypatch):
    """--recipe picks the shipped config (default psgd, as before); a bad recipe is one line and exit 2 before
    the CLI runs. Catches: the flag passed through to the CLI (which would reject it), or the wrong config."""
    import raysub.cli

    calls = []
    monkeypatch.setattr(raysub.cli, "main", lambda args: calls.append(args) or 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    job = load_job(monkeypatch)
    assert job.main(["train.epochs=2"]) == 0
    assert job.main(["seed=1", "--recipe=pbfgs", "--resume"]) == 0
    assert job.main(["--recipe", "psgd", "seed=2"]) == 0
    configs = [os.path.basename(c[1]) for c in calls]
    assert configs == ["imagenet_resnet18.yaml", "imagenet_resnet18_pbfgs.yaml", "imagenet_resnet18.yaml"]
    assert calls[1][2:] == ["seed=1", "--resume"] and calls[2][2:] == ["seed=2"]
    for bad in (["--recipe", "lbfgs"], ["--recipe"]):
        assert job.main(bad) == 2
    assert len(calls) == 3


def test_pbfgs_recipe_has_the_papers_constants():
    """DLDR §5.3 / Table 3 for ImageNet: d = 120 from 60 epochs sampled 3×/epoch, P-BFGS batch 256 for 4 epochs,
    c = 0.4, β = 0.55, no lr schedule; the sampling run identical to the P-SGD recipe's (one trajectory serves
    both). Catches a recipe drifting from the paper or from its sibling."""
    from raysub.config import load_config

    p = load_config(os.path.join(REPO, "raysub", "configs", "imagenet_resnet18_pbfgs.yaml")).to_dict()
    s = load_config(os.path.join(REPO, "raysub", "configs", "imagenet_resnet18.yaml")).to_dict()
    assert (p["basis"]["dim"], p["sample"]["epochs"], p["sample"]["snapshots_per_epoch"]) == (120, 60, 3)
    assert p["train"]["optimizer"] == "pbfgs" and p["train"]["batch_size"] == 256 and p["train"]["epochs"] == 4
    assert p["train"]["optimizer_options"]["c"] == 0.4 and p["train"]["optimizer_options"]["beta"] == 0.55
    assert p["train"]["lr_milestones"] == []
    for section in ("data", "model", "sgd", "sample", "basis", "cluster", "seed"):
        assert p[section] == s[section], section


# ----------------------------------------------------------------------------------------------- the loader

def _reference_batches(ds, split, index, augment, seed):
    """What `ImageNet.batches` yielded before the loader was kept: a fresh single-process DataLoader per call."""
    from raysub.data.imagenet import _SeededBatches, _SeededSamples

    samples = _SeededSamples(ds._folders[split], ds._train_tf if augment else ds._test_tf)
    loader = torch.utils.data.DataLoader(samples, batch_sampler=_SeededBatches(index, seed, augment),
                                         generator=torch.Generator().manual_seed(seed))
    return list(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_is_kept_across_epochs_and_batches_do_not_change(colour_root, num_workers):
    """Two epochs (different indices and seeds) through one DataLoader — the same object, its worker processes
    kept (persistent) — give exactly the batches a fresh loader per call gives. Catches: a loader rebuilt per
    call, a batch sampler that keeps the first epoch's indices or seed, augmentation tied to the worker."""
    ds = data.load_dataset("imagenet", str(colour_root), image_size=32)
    epochs = [([torch.tensor([0, 5, 17]), torch.tensor([40, 3])], 11), ([torch.tensor([7, 1]), torch.tensor([2])], 12)]
    loaders, workers = [], []
    for index, seed in epochs:
        got = list(ds.batches("train", index, augment=True, seed=seed, num_workers=num_workers))
        want = _reference_batches(ds, "train", index, True, seed)
        assert len(got) == len(want) == len(index)
        for (xg, yg), (xw, yw) in zip(got, want):
            assert torch.equal(xg, xw) and torch.equal(yg, yw)
        loader = ds.loader("train", True, num_workers)
        loaders.append(loader)
        workers.append([w.pid for w in loader._iterator._workers] if num_workers else [])
    assert loaders[0] is loaders[1]
    assert loaders[0].persistent_workers == (num_workers > 0)
    assert loaders[0].pin_memory == (torch.cuda.is_available() and torch.cuda.is_initialized())
    assert workers[0] == workers[1] and len(workers[0]) == num_workers
    assert ds.loader("test", False, num_workers) is not loaders[0]  # one loader per split and augmentation


def test_interleaved_calls_on_one_loader_do_not_disturb_each_other(colour_root):
    """A second `batches` on the same (split, augment) while the first is mid-iteration gets its own loader: the
    first goes on with its own indices. Catches a shared persistent loader reset under its consumer."""
    ds = data.load_dataset("imagenet", str(colour_root), image_size=32)
    a_index = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])]
    b_index = [torch.tensor([30, 31])]
    a = ds.batches("train", a_index, augment=False, seed=0, num_workers=1)
    first = next(a)
    b = list(ds.batches("train", b_index, augment=False, seed=0, num_workers=1))
    rest = list(a)
    want_a = _reference_batches(ds, "train", a_index, False, 0)
    for (xg, yg), (xw, yw) in zip([first] + rest, want_a, strict=True):
        assert torch.equal(xg, xw) and torch.equal(yg, yw)
    assert torch.equal(b[0][0], _reference_batches(ds, "train", b_index, False, 0)[0][0])


def test_dataset_pickles_without_its_loaders(colour_root):
    """A dataset sent to another process (a Ray task) must not try to carry worker processes along."""
    import pickle

    ds = data.load_dataset("imagenet", str(colour_root), image_size=32)
    list(ds.batches("test", [torch.tensor([0, 1])], augment=False, seed=0, num_workers=1))
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._loaders == {} and ds._loaders
    x, _ = next(copy.batches("test", [torch.tensor([0, 1])], augment=False, seed=0))
    assert x.shape == (2, 3, 32, 32)


@pytest.mark.gpu
def test_loader_pins_memory_once_cuda_is_in_use(colour_root):
    """On a GPU worker (CUDA initialised by moving the model) the loader pins its batches, so the loops'
    ``x.to(device, non_blocking=True)`` really overlaps; the batches are unchanged."""
    torch.zeros(1, device="cuda")
    ds = data.load_dataset("imagenet", str(colour_root), image_size=32)
    index = [torch.tensor([0, 5, 17])]
    x, y = next(ds.batches("train", index, augment=True, seed=3, num_workers=1))
    assert ds.loader("train", True, 1).pin_memory and x.is_pinned()
    xw, _ = _reference_batches(ds, "train", index, True, 3)[0]
    assert torch.equal(x, xw)
