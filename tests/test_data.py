"""Datasets load from tiny fakes in their exact on-disk layouts; errors are one line and name the path."""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from raysub import data
from raysub.errors import ConfigError, DataError

# ------------------------------------------------------------------------------------------ fake datasets


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes; gzip-compressed when the path ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx(root, n_train=12, n_test=6, compress="gz", seed=0):
    """The four MNIST IDX files; compress is "gz", "plain" or "mixed". Returns the arrays written."""
    rng = np.random.RandomState(seed)
    os.makedirs(root, exist_ok=True)
    arrays = {}
    for i, (split, n) in enumerate((("train", n_train), ("t10k", n_test))):
        images = rng.randint(0, 256, (n, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for j, (kind, arr) in enumerate((("images-idx3", images), ("labels-idx1", labels))):
            gz = compress == "gz" or (compress == "mixed" and (i + j) % 2 == 0)
            write_idx(os.path.join(root, f"{split}-{kind}-ubyte" + (".gz" if gz else "")), arr)
        arrays[split] = (images, labels)
    return arrays


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar(root, name, n_per_file=4, seed=0):
    """torchvision's CIFAR python layout with the real byte-string keys. Returns {split: (data, labels)}."""
    rng = np.random.RandomState(seed)
    if name == "cifar10":
        folder, key, classes = os.path.join(root, "cifar-10-batches-py"), b"labels", 10
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta = ("batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    else:
        folder, key, classes = os.path.join(root, "cifar-100-python"), b"fine_labels", 100
        files = {"train": ["train"], "test": ["test"]}
        meta = ("meta", {b"fine_label_names": [b"c%d" % i for i in range(100)]})
    os.makedirs(folder)
    out = {}
    for split, names in files.items():
        datas, labels = [], []
        for f in names:
            d = rng.randint(0, 256, (n_per_file, 3072)).astype(np.uint8)
            y = list(rng.randint(0, classes, n_per_file))
            entry = {b"batch_label": b"fake", b"data": d, key: y, b"filenames": [b"x.png"] * n_per_file}
            if name == "cifar100":
                entry[b"coarse_labels"] = [0] * n_per_file
            _dump(os.path.join(folder, f), entry)
            datas.append(d)
            labels += y
        out[split] = (np.concatenate(datas).reshape(-1, 3, 32, 32), np.array(labels))
    _dump(os.path.join(folder, meta[0]), meta[1])
    return out


def make_imagefolder(root, train=("n01", "n02", "n03"), val=("n01", "n02", "n03"), per_class=2, seed=0):
    """ImageFolder train/ and val/ of tiny random JPEGs (one grayscale, to check RGB conversion)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(per_class):
                shape = (40 + 4 * i, 48) if i else (44, 40, 3)
                arr = rng.randint(0, 256, shape).astype(np.uint8)
                Image.fromarray(arr).save(os.path.join(root, split, c, f"{c}_{i}.JPEG"))


def tree(root):
    """Every path under root with its size and mtime, to check that loading writes nothing."""
    return sorted(
        (os.path.join(d, f), os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
        for d, _, files in os.walk(root)
        for f in files + ["."]
    )


def all_batches(ds, split, batch_size, **kw):
    index = torch.arange(ds.size(split)).split(batch_size)
    return list(ds.batches(split, index, **kw))


def assert_one_line_naming(err: Exception, path) -> None:
    msg = str(err)
    assert "\n" not in msg
    assert str(path) in msg


# ----------------------------------------------------------------------------------------------- registry


def test_registered_names():
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet"} <= set(data.DATASETS.names())


def test_unknown_name_and_option():
    with pytest.raises(ConfigError, match="choose one of .*cifar10.*digits"):
        data.load_dataset("svhn")
    with pytest.raises(ConfigError, match="'digits' got unexpected option\\(s\\) 'image_size'"):
        data.load_dataset("digits", image_size=32)
    assert "svhn" in data.validate_dataset("svhn", None)[0]


def test_default_root():
    assert data.default_root("fashion-mnist") == "/usr/share/datasets/fashion-mnist"
    assert data.default_root("mnist") is None and data.default_root("cifar10") is None


# ------------------------------------------------------------------------------------------------- digits


def test_digits_fixed_split():
    torch.manual_seed(123)
    np.random.seed(123)
    a = data.load_dataset("digits")
    b = data.load_dataset("digits", root="/ignored")
    assert (a.num_classes, a.input_shape, a.size("train"), a.size("test")) == (10, (64,), 1437, 360)
    assert torch.equal(a.labels("test"), b.labels("test"))
    from sklearn.datasets import load_digits

    order = np.random.RandomState(0).permutation(1797)
    assert a.labels("test").tolist() == load_digits().target[order[1437:]].tolist()
    (x, y), = a.batches("train", [torch.arange(1437)], augment=True, seed=0)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (1437, 64)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert data.validate_dataset("digits", None) == []


def test_digits_read_from_the_shipped_csv_equal_scikit_learns(monkeypatch):
    """The digits are read from scikit-learn's own CSV without importing scikit-learn (its import costs every Train
    worker ~1.7 s): the arrays must be load_digits' exactly — a dropped or shifted column, the label read as a
    pixel, or another dtype fails here; and where the CSV is missing the fallback gives the same arrays."""
    import sklearn.datasets

    from raysub.data import digits

    want = sklearn.datasets.load_digits()
    x, y = digits.load_digits_arrays()
    assert x.shape == (1797, 64) and x.dtype == want.data.dtype and np.array_equal(x, want.data)
    assert y.dtype == want.target.dtype and np.array_equal(y, want.target)
    assert (x[0, :4].tolist(), y[:5].tolist()) == ([0.0, 0.0, 5.0, 13.0], [0, 1, 2, 3, 4])  # the file's first row
    monkeypatch.setattr(digits.os.path, "exists", lambda path: False)  # a release that keeps the CSV elsewhere
    x2, y2 = digits.load_digits_arrays()
    assert np.array_equal(x2, want.data) and np.array_equal(y2, want.target)


# --------------------------------------------------------------------------------------------- MNIST / IDX


@pytest.mark.parametrize("name,compress", [("mnist", "plain"), ("fashion-mnist", "gz"), ("mnist", "mixed")])
def test_idx_dataset(tmp_path, name, compress):
    arrays = make_idx(tmp_path, compress=compress)
    before = tree(tmp_path)
    assert data.validate_dataset(name, str(tmp_path)) == []
    ds = data.load_dataset(name, str(tmp_path))
    assert tree(tmp_path) == before
    assert (ds.num_classes, ds.input_shape, ds.size("train"), ds.size("test")) == (10, (1, 28, 28), 12, 6)
    mean, std = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}[name]
    idx = torch.tensor([5, 0, 3])
    (x, y), = ds.batches("test", [idx], augment=True, seed=1)  # no augmentation defined: a no-op
    images, labels = arrays["t10k"]
    assert x.dtype == torch.float32 and x.shape == (3, 1, 28, 28) and y.dtype == torch.int64
    expect = (torch.from_numpy(images[idx.numpy()]).float() / 255 - mean) / std
    torch.testing.assert_close(x[:, 0], expect)
    assert y.tolist() == labels[idx.numpy()].tolist()
    assert ds.labels("train").dtype == torch.int64 and ds.labels("train").tolist() == arrays["train"][1].tolist()


def test_idx_missing(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_dataset("fashion-mnist", str(tmp_path))
    assert_one_line_naming(e.value, tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and "data.root=DIR" in str(e.value)
    make_idx(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="missing IDX file\\(s\\) t10k-labels-idx1-ubyte"):
        data.load_dataset("mnist", str(tmp_path))
    with pytest.raises(DataError, match="set data.root=DIR"):
        data.load_dataset("mnist")
    assert len(data.validate_dataset("mnist", str(tmp_path / "nowhere"))) == 1


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda p: p.write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5), "truncated header"),
        (lambda p: p.write_bytes(b"\x01\x02\x08\x03" + b"\x00" * 40), "bad magic number"),
        (lambda p: write_idx(p, np.zeros((2, 28, 27), np.uint8)) or p.write_bytes(p.read_bytes()[:-1]), "data bytes"),
    ],
)
def test_malformed_idx(tmp_path, corrupt, match):
    make_idx(tmp_path, compress="plain")
    path = tmp_path / "train-images-idx3-ubyte"
    corrupt(path)
    with pytest.raises(DataError, match=match) as e:
        data.load_dataset("mnist", str(tmp_path))
    assert_one_line_naming(e.value, path)


def test_malformed_gzip(tmp_path):
    make_idx(tmp_path, compress="gz")
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError) as e:
        data.read_idx(str(path))
    assert_one_line_naming(e.value, path)


def test_idx_wrong_labels(tmp_path):
    make_idx(tmp_path, compress="plain")
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(12, 10, np.uint8))
    with pytest.raises(DataError, match="labels outside"):
        data.load_dataset("mnist", str(tmp_path))


def needs_fashion_mnist() -> None:
    """Skip the calling test where the real Fashion-MNIST is not installed — except under
    RAYSUB_REQUIRE_FASHION_MNIST=1 (set by .ci/run), where the test runs and fails on the missing files, so CI
    cannot stay green without the real data."""
    problems = data.validate_dataset("fashion-mnist", None)
    if problems and os.environ.get("RAYSUB_REQUIRE_FASHION_MNIST") != "1":
        pytest.skip(problems[0])


def test_real_fashion_mnist():
    needs_fashion_mnist()
    ds = data.load_dataset("fashion-mnist")
    assert (ds.size("train"), ds.size("test"), ds.input_shape) == (60000, 10000, (1, 28, 28))
    assert torch.bincount(ds.labels("test")).tolist() == [1000] * 10
    (x, _), = ds.batches("train", [torch.arange(60000)], augment=False, seed=0)
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02  # the constants fit the data


def test_fashion_mnist_tests_fail_instead_of_skipping_in_ci(monkeypatch, tmp_path):
    """Without the data the real-data tests skip, but not under RAYSUB_REQUIRE_FASHION_MNIST=1. Catches: a skip
    that ignores the variable (CI green with the dataset missing)."""
    monkeypatch.setattr(data.DATASETS.get("fashion-mnist"), "default_root", str(tmp_path / "absent"))
    monkeypatch.delenv("RAYSUB_REQUIRE_FASHION_MNIST", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install dataset-fashion-mnist"):
        test_real_fashion_mnist()
    monkeypatch.setenv("RAYSUB_REQUIRE_FASHION_MNIST", "1")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        try:
            test_real_fashion_mnist()
        except pytest.skip.Exception as e:
            pytest.fail(f"skipped under RAYSUB_REQUIRE_FASHION_MNIST=1: {e}")


STUB_PYTHON3 = """#!/bin/sh
echo "python3 $*" >> "$CI_LOG"
case "$*" in
  *validate_dataset*) [ -e "$CI_DATA" ] || { echo "Fashion-MNIST missing" >&2; exit 1; } ;;
  *pytest*) echo "pytest RAYSUB_REQUIRE_FASHION_MNIST=$RAYSUB_REQUIRE_FASHION_MNIST" >> "$CI_LOG" ;;
esac
"""
STUB_APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$CI_LOG"
case "$*" in *install*) [ "$CI_APT_RC" = 0 ] && touch "$CI_DATA"; exit "$CI_APT_RC" ;; esac
"""


@pytest.mark.parametrize("installed, apt_rc, rc", [(True, 100, 0), (False, 0, 0), (False, 100, 1)],
                         ids=["installed", "installs", "install-fails"])
@pytest.mark.system  # runs .ci/run in bash
def test_ci_script_requires_fashion_mnist(tmp_path, installed, apt_rc, rc):
    """.ci/run with python3 and apt-get stubbed: with the data present (or installed by apt-get) it runs pytest
    with RAYSUB_REQUIRE_FASHION_MNIST=1 and apt-get only when needed; a failed install stops CI with a non-zero
    exit naming the package before pytest. Catches: an install failure swallowed into a note (CI green)."""
    import subprocess

    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("python3", STUB_PYTHON3), ("apt-get", STUB_APT_GET)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log, marker = tmp_path / "log", tmp_path / "data"
    if installed:
        marker.touch()
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "CI_LOG": str(log),
           "CI_DATA": str(marker), "CI_APT_RC": str(apt_rc)}
    env.pop("RAYSUB_REQUIRE_FASHION_MNIST", None)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci", "run")
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text()
    assert proc.returncode == rc, proc.stderr
    assert ("apt-get install" in calls) == (not installed)
    if rc == 0:
        assert calls.endswith("pytest RAYSUB_REQUIRE_FASHION_MNIST=1\n")
    else:
        assert "pytest" not in calls and "dataset-fashion-mnist" in proc.stderr


# -------------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar(tmp_path, name):
    arrays = make_cifar(tmp_path, name)
    before = tree(tmp_path)
    ds = data.load_dataset(name, str(tmp_path))
    assert tree(tmp_path) == before
    n_train = 20 if name == "cifar10" else 4
    assert (ds.size("train"), ds.size("test"), ds.input_shape) == (n_train, 4, (3, 32, 32))
    assert ds.num_classes == (10 if name == "cifar10" else 100) and ds.has_augmentation
    assert ds.labels("train").tolist() == arrays["train"][1].tolist()
    (x, y), = ds.batches("train", [torch.tensor([3, 1])], augment=False, seed=0)
    mean = torch.tensor(ds.mean).view(3, 1, 1)
    std = torch.tensor(ds.std).view(3, 1, 1)
    torch.testing.assert_close(x, (torch.from_numpy(arrays["train"][0][[3, 1]]).float() / 255 - mean) / std)
    assert y.tolist() == arrays["train"][1][[3, 1]].tolist()


def test_cifar_augmentation(tmp_path):
    arrays = make_cifar(tmp_path, "cifar10", n_per_file=8)
    ds = data.load_dataset("cifar10", str(tmp_path))
    a = all_batches(ds, "train", 16, augment=True, seed=7)
    b = all_batches(ds, "train", 16, augment=True, seed=7)
    c = all_batches(ds, "train", 16, augment=True, seed=8)
    plain = all_batches(ds, "train", 16, augment=False, seed=7)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    assert all(torch.equal(ya, yp) for (_, ya), (_, yp) in zip(a, plain))
    # Keyed on (seed, example): regrouping the same indices (other batch size, other ranks) changes nothing.
    regrouped = all_batches(ds, "train", 5, augment=True, seed=7)
    assert torch.equal(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in regrouped]))
    assert a[0][0].shape == (16, 3, 32, 32) and a[0][0].dtype == torch.float32
    # Every augmented image is one of the 9x9 crops of the zero-padded image, possibly flipped.
    mean, std = torch.tensor(ds.mean).view(3, 1, 1) * 255, torch.tensor(ds.std).view(3, 1, 1) * 255
    raw = torch.from_numpy(arrays["train"][0])
    aug = torch.cat([x for x, _ in a]) * std + mean
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4)).float()
    flips = 0
    for img, pad in zip(aug, padded):
        crops = pad.unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 32, 32)
        err = (crops - img).abs().amax(dim=(1, 2, 3)).min()
        err_flip = (crops - img.flip(-1)).abs().amax(dim=(1, 2, 3)).min()
        assert min(err, err_flip) < 1e-3
        flips += bool(err_flip < err)
    assert 0 < flips < len(aug)


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar10", str(tmp_path))
    assert_one_line_naming(e.value, tmp_path / "cifar-10-batches-py")
    assert "put torchvision's cifar-10-batches-py folder under data.root" in str(e.value)
    with pytest.raises(DataError, match="set data.root=DIR"):
        data.load_dataset("cifar100")
    make_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar100", str(tmp_path))
    assert_one_line_naming(e.value, tmp_path / "cifar-100-python" / "test")


# ----------------------------------------------------------------------------------------------- ImageNet


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_imagefolder(root)
    return root


def test_imagenet(imagenet_root):
    before = tree(imagenet_root)
    ds = data.load_dataset("imagenet", str(imagenet_root), image_size=32)
    assert tree(imagenet_root) == before
    assert (ds.num_classes, ds.input_shape, ds.size("train"), ds.size("test")) == (3, (3, 32, 32), 6, 6)
    assert ds.labels("test").tolist() == [0, 0, 1, 1, 2, 2]
    index = [torch.tensor([0, 5, 2]), torch.tensor([4, 1])]
    rng = torch.get_rng_state()
    test_a = list(ds.batches("test", index, augment=False, seed=0))
    test_b = list(ds.batches("test", index, augment=False, seed=9))
    aug_a = list(ds.batches("train", index, augment=True, seed=3))
    aug_b = list(ds.batches("train", index, augment=True, seed=3))
    aug_c = list(ds.batches("train", index, augment=True, seed=4))
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    x, y = aug_a[0]
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [0, 2, 1] and aug_a[1][1].tolist() == [2, 0]
    for (xa, _), (xb, _) in zip(test_a + aug_a, test_b + aug_b):
        assert torch.equal(xa, xb)
    assert not torch.equal(aug_a[0][0], aug_c[0][0])
    regrouped = list(ds.batches("train", [torch.tensor([0]), torch.tensor([5, 2, 4, 1])], augment=True, seed=3))
    assert torch.equal(torch.cat([x for x, _ in aug_a]), torch.cat([x for x, _ in regrouped]))


def test_imagenet_workers_do_not_change_augmentation(imagenet_root):
    ds = data.load_dataset("imagenet", str(imagenet_root), image_size=32)
    index = [torch.tensor([0, 1, 2]), torch.tensor([3, 4]), torch.tensor([5])]
    serial = list(ds.batches("train", index, augment=True, seed=5, num_workers=0))
    parallel = list(ds.batches("train", index, augment=True, seed=5, num_workers=2))
    for (xs, ys), (xp, yp) in zip(serial, parallel, strict=True):
        assert torch.equal(xs, xp) and torch.equal(ys, yp)


def test_imagenet_val_missing_a_class_keeps_train_labels(tmp_path):
    make_imagefolder(tmp_path, val=("n01", "n03"), per_class=1)
    ds = data.load_dataset("imagenet", str(tmp_path), image_size=16, partial_val=True)
    assert ds.num_classes == 3 and ds.labels("test").tolist() == [0, 2]


def test_imagenet_missing(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError) as e:
        data.load_dataset("imagenet", str(tmp_path))
    assert_one_line_naming(e.value, tmp_path)
    assert "val/" in str(e.value) and "root/train/<class>/*.JPEG" in str(e.value)
    (tmp_path / "val").mkdir()
    assert data.validate_dataset("imagenet", str(tmp_path)) == []  # paths only: nothing is scanned
    with pytest.raises(DataError) as e:  # loading does scan, and finds no classes
        data.load_dataset("imagenet", str(tmp_path))
    assert_one_line_naming(e.value, tmp_path)
    problems = data.validate_dataset("imagenet", None, image_size=0)
    assert len(problems) == 1 and "set data.root=DIR" in problems[0]
