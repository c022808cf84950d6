"""Datasets: one registry, one small class per on-disk format.

Every dataset exposes the same interface (`Dataset`): sizes, labels, and `batches`, which turns lists of
example indices into normalized (x, y) tensors. Batching by explicit indices keeps sampling (which examples,
in which order, on which rank) in the caller's hands, so a run is reproducible from its seed alone.

Small datasets (digits, MNIST, Fashion-MNIST, CIFAR) live in memory as uint8/float tensors and are normalized
per batch; ImageNet streams JPEGs through a torch DataLoader. Nothing here downloads or writes files.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from raysub.errors import ConfigError, DataError
from raysub.registry import Registry

DATASETS: Registry = Registry("dataset")
SPLITS = ("train", "test")

Batch = Tuple[torch.Tensor, torch.Tensor]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 on a uint64 array (numpy wraps array overflow silently, as the hash needs)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def example_hashes(seed: int, idx: torch.Tensor, n: int) -> np.ndarray:
    """`n` independent random 64-bit words per example, a pure function of (seed, example index).

    Keying augmentation on the example rather than on the batch means that ranks sharing a seed do not
    repeat each other's crops, and that an example's augmentation does not depend on how the epoch is
    split into batches or over how many workers.

    Args:
        seed: The caller's seed (vary it per epoch for fresh augmentation each epoch).
        idx: 1-D example indices.
        n: Words per example.

    Returns:
        uint64 array of shape (n, len(idx)).
    """
    key = _splitmix64(np.array([seed & 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64))
    base = _splitmix64(idx.numpy().astype(np.uint64) ^ key)
    return _splitmix64(base[None, :] + np.arange(n, dtype=np.uint64)[:, None] * _GOLDEN)


def _as_index(idx) -> torch.Tensor:
    idx = torch.as_tensor(idx, dtype=torch.long)
    assert idx.dim() == 1, f"batch indices must be 1-D, got shape {tuple(idx.shape)}"
    return idx


class Dataset:
    """Abstract base of all datasets.

    Attributes:
        name: Registry name.
        num_classes: Number of classes; labels are in [0, num_classes).
        input_shape: Per-example shape of x, e.g. (64,), (1, 28, 28), (3, 32, 32).
        has_augmentation: Whether `batches(..., augment=True)` changes anything.
        default_root: Where the data lives when no root is given (None: a root is required).
    """

    name: str = ""
    num_classes: int = 0
    input_shape: Tuple[int, ...] = ()
    has_augmentation: bool = False
    default_root: Optional[str] = None

    @classmethod
    def problems(cls, root: Optional[str], **kwargs) -> List[str]:
        """What is missing on disk for this dataset at `root`, without loading it (empty list: fine)."""
        return []

    def size(self, split: str) -> int:
        """Number of examples in `split` ("train" or "test")."""
        raise NotImplementedError

    def labels(self, split: str) -> torch.Tensor:
        """int64 labels of the whole split, in index order."""
        raise NotImplementedError

    def batches(
        self, split: str, batch_indices: Iterable, *, augment: bool, seed: int, num_workers: int = 0
    ) -> Iterator[Batch]:
        """Yield (x float32, y int64) for each 1-D tensor of example indices, in order.

        Args:
            split: "train" or "test".
            batch_indices: Iterable of 1-D LongTensors (or index lists) of examples in `split`.
            augment: Apply the dataset's training augmentation, if it has one.
            seed: Augmentation of each example is a pure function of (seed, example index): the same seed
                gives bit-identical batches, however the indices are grouped. Vary it per epoch.
            num_workers: Loader processes (only streamed datasets use them).

        Yields:
            (x, y): x normalized float32 of shape (len(idx), *input_shape), y int64 of shape (len(idx),).
        """
        raise NotImplementedError

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class InMemoryDataset(Dataset):
    """A dataset held as tensors: x (uint8 pixels or ready floats) and int64 labels per split.

    Subclasses load the splits and pass them to `_finish`; for uint8 pixels they set per-channel
    `mean`/`std` in [0, 1] units.
    """

    mean: Sequence[float] = ()
    std: Sequence[float] = ()

    def _finish(self, x: Dict[str, torch.Tensor], y: Dict[str, torch.Tensor]) -> None:
        """Store the splits, check labels, and precompute the per-batch normalization."""
        for split in SPLITS:
            if len(x[split]) != len(y[split]):
                raise DataError(
                    f"dataset {self.name!r}: {split} split has {len(x[split])} inputs but {len(y[split])} labels"
                )
            labels = y[split]
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise DataError(
                    f"dataset {self.name!r}: {split} labels outside [0, {self.num_classes}) "
                    f"(min {int(labels.min())}, max {int(labels.max())}); the files are not {self.name}"
                )
        self._x, self._y = x, y
        self.input_shape = tuple(x["train"].shape[1:])
        if x["train"].dtype == torch.uint8:
            shape = (-1,) + (1,) * (len(self.input_shape) - 1)
            # Fold the /255 into mean and std: one subtract and one divide per batch.
            self._shift = torch.tensor(self.mean, dtype=torch.float32).mul(255).reshape(shape)
            self._scale = torch.tensor(self.std, dtype=torch.float32).mul(255).reshape(shape)

    def size(self, split: str) -> int:
        self._check_split(split)
        return len(self._y[split])

    def labels(self, split: str) -> torch.Tensor:
        self._check_split(split)
        return self._y[split].clone()

    def _augment(self, x: torch.Tensor, idx: torch.Tensor, seed: int) -> torch.Tensor:
        """Training augmentation of the raw batch x = examples idx (before normalization); identity here."""
        return x

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        return x.to(torch.float32).sub_(self._shift).div_(self._scale)

    def batches(self, split, batch_indices, *, augment, seed, num_workers=0):
        self._check_split(split)
        xs, ys = self._x[split], self._y[split]
        for idx in batch_indices:
            idx = _as_index(idx)
            x = xs[idx]
            if augment and self.has_augmentation:
                x = self._augment(x, idx, seed)
            yield self._normalize(x), ys[idx]


def _missing_root(name: str, hint: str) -> str:
    return f"dataset {name!r}: no data root given; set data.root=DIR ({hint})"


# --------------------------------------------------------------------------------------------------- digits


@DATASETS.register("digits")
class Digits(InMemoryDataset):
    """scikit-learn's 8x8 digits (1797 images, ships with sklearn), flattened to (64,).

    The 80/20 train/test split is fixed (RandomState(0) permutation), independent of any run seed, so all
    runs evaluate on the same test set. Inputs are scaled by 1/16 and standardized with the train split's
    scalar mean and std.

    Args:
        root: Ignored (the data ships with scikit-learn).
    """

    name = "digits"
    num_classes = 10

    def __init__(self, root: Optional[str] = None):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = bunch.data.astype(np.float32) / 16.0
        y = bunch.target.astype(np.int64)
        order = np.random.RandomState(0).permutation(len(y))
        n_train = int(0.8 * len(y))
        train, test = order[:n_train], order[n_train:]
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        self._finish(
            {"train": torch.from_numpy(x[train]), "test": torch.from_numpy(x[test])},
            {"train": torch.from_numpy(y[train]), "test": torch.from_numpy(y[test])},
        )


# ------------------------------------------------------------------------------------------- MNIST (IDX)

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Parse one IDX file (plain or gzip-compressed, chosen by a ``.gz`` suffix).

    Args:
        path: The file.

    Returns:
        A native-endian array with the dims from the header.

    Raises:
        DataError: unreadable file, bad magic number, or a size that does not match the header.
    """
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    # Magic number: two zero bytes, a type code, the number of dims.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"malformed IDX file {path}: bad magic number {raw[:4].hex() or 'none'}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"malformed IDX file {path}: truncated header ({ndim} dims, {len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"malformed IDX file {path}: {len(raw) - header} data bytes, expected {expected} for shape {dims}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(root: str, stem: str) -> Optional[str]:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    return None


class IDXDataset(InMemoryDataset):
    """The four IDX files of MNIST-style datasets, plain or ``.gz``; x is (1, rows, cols) uint8."""

    num_classes = 10
    install_hint = "put the four IDX files there"

    @classmethod
    def problems(cls, root, **kwargs):
        if root is None:
            return [_missing_root(cls.name, f"the folder holding the {cls.name} IDX files")]
        stems = [stem for pair in _IDX_FILES.values() for stem in pair]
        missing = [stem for stem in stems if _find_idx(root, stem) is None]
        if not missing:
            return []
        what = "no IDX files" if len(missing) == len(stems) else f"missing IDX file(s) {', '.join(missing)}"
        return [
            f"dataset {cls.name!r}: {what} in {root} (expected {'[.gz], '.join(stems)}[.gz]); "
            f"{cls.install_hint} or set data.root=DIR"
        ]

    def __init__(self, root: Optional[str] = None):
        problems = self.problems(root)
        if problems:
            raise DataError(problems)
        x, y = {}, {}
        for split, (images, labels) in _IDX_FILES.items():
            try:
                img = read_idx(_find_idx(root, images))
                lab = read_idx(_find_idx(root, labels))
            except DataError as e:
                raise DataError(f"dataset {self.name!r}: {e}") from None
            if img.ndim != 3 or lab.ndim != 1 or img.dtype != np.uint8:
                raise DataError(
                    f"dataset {self.name!r}: {split} IDX files in {root} hold shapes {img.shape} {img.dtype} and "
                    f"{lab.shape}; expected (N, rows, cols) uint8 images and (N,) labels"
                )
            x[split] = torch.from_numpy(img).unsqueeze(1)
            y[split] = torch.from_numpy(lab.astype(np.int64))
        self._finish(x, y)


@DATASETS.register("fashion-mnist")
class FashionMNIST(IDXDataset):
    """Fashion-MNIST from its IDX files (Debian's ``dataset-fashion-mnist`` installs them by default)."""

    name = "fashion-mnist"
    default_root = "/usr/share/datasets/fashion-mnist"
    install_hint = "install them with 'apt-get install dataset-fashion-mnist'"
    mean, std = (0.2860,), (0.3530,)


@DATASETS.register("mnist")
class MNIST(IDXDataset):
    """MNIST from its IDX files; a root is required."""

    name = "mnist"
    install_hint = "put the four MNIST IDX files there"
    mean, std = (0.1307,), (0.3081,)


# ------------------------------------------------------------------------------------------------- CIFAR


def _pad_crop_flip(x: torch.Tensor, words: np.ndarray, pad: int = 4) -> torch.Tensor:
    """Batched RandomCrop(size, padding=pad) + RandomHorizontalFlip(0.5) on raw (B, C, H, W) pixels.

    Args:
        x: Raw pixels.
        words: (3, B) random uint64 words (see `example_hashes`): row offset, column offset, flip.
        pad: Padding on each side; zero in pixel space (black), as torchvision's RandomCrop on PIL images.

    Returns:
        The augmented batch, same shape and dtype; all crops and flips are one gather.
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = torch.from_numpy((words[:2] % np.uint64(2 * pad + 1)).astype(np.int64))
    dy, dx = offsets[0], offsets[1]
    flip = torch.from_numpy(words[2] >> np.uint64(63) == 1)
    rows = dy[:, None] + torch.arange(h)
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    return padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def _unpickle(path: str) -> Dict[str, Any]:
    """One CIFAR pickle with str keys (the real files are Python 2 pickles with byte-string keys).

    Note: unpickling runs code from the file; only point data.root at files you trust.
    """
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:  # pickle raises many types on garbage input
        raise DataError(f"cannot read CIFAR pickle {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"malformed CIFAR pickle {path}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


class CifarDataset(InMemoryDataset):
    """torchvision's on-disk CIFAR python format under ``root/<folder>``; x is (3, 32, 32) uint8.

    Training augmentation: 4-pixel zero padding, random 32x32 crop, horizontal flip with p=0.5.
    """

    folder = ""
    train_files: Tuple[str, ...] = ()
    test_files: Tuple[str, ...] = ()
    label_key = ""
    has_augmentation = True

    @classmethod
    def problems(cls, root, **kwargs):
        hint = f"the folder holding torchvision's {cls.folder} folder"
        if root is None:
            return [_missing_root(cls.name, hint)]
        path = os.path.join(root, cls.folder)
        missing = [f for f in cls.train_files + cls.test_files if not os.path.isfile(os.path.join(path, f))]
        if not missing:
            return []
        what = "no such folder" if not os.path.isdir(path) else f"missing {', '.join(missing)}"
        return [f"dataset {cls.name!r}: {what} in {path}; put torchvision's {cls.folder} folder under data.root"]

    def __init__(self, root: Optional[str] = None):
        problems = self.problems(root)
        if problems:
            raise DataError(problems)
        x, y = {}, {}
        for split, files in (("train", self.train_files), ("test", self.test_files)):
            xs, ys = [], []
            for f in files:
                path = os.path.join(root, self.folder, f)
                xb, yb = self._read(path)
                xs.append(xb)
                ys.append(yb)
            x[split] = torch.from_numpy(np.concatenate(xs))
            y[split] = torch.from_numpy(np.concatenate(ys))
        self._finish(x, y)

    def _read(self, path: str) -> Tuple[np.ndarray, np.ndarray]:
        d = _unpickle(path)
        data, labels = d.get("data"), d.get(self.label_key)
        if not isinstance(data, np.ndarray) or labels is None:
            raise DataError(
                f"dataset {self.name!r}: malformed CIFAR pickle {path}: needs keys b'data' and "
                f"b'{self.label_key}' (has {', '.join(sorted(map(str, d)))})"
            )
        labels = np.asarray(labels, dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape != (len(labels), 3 * 32 * 32):
            raise DataError(
                f"dataset {self.name!r}: malformed CIFAR pickle {path}: data is {data.dtype} {data.shape}, "
                f"expected uint8 ({len(labels)}, 3072)"
            )
        return data.reshape(-1, 3, 32, 32), labels

    def _augment(self, x, idx, seed):
        return _pad_crop_flip(x, example_hashes(seed, idx, 3))


@DATASETS.register("cifar10")
class CIFAR10(CifarDataset):
    name = "cifar10"
    num_classes = 10
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@DATASETS.register("cifar100")
class CIFAR100(CifarDataset):
    name = "cifar100"
    num_classes = 100
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


# ---------------------------------------------------------------------------------------------- ImageNet

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _SeededSamples(torch.utils.data.Dataset):
    """Loads (index, sample seed) keys; the transform runs under its own seed.

    Seeding per sample (rather than per worker via worker_init_fn) makes the augmentation independent of
    num_workers and of which worker gets which batch. fork_rng keeps the caller's global RNG untouched when
    num_workers=0.
    """

    def __init__(self, folder, transform):
        self.folder, self.transform = folder, transform

    def __len__(self):
        return len(self.folder.samples)

    def __getitem__(self, key):
        index, sample_seed = key
        path, target = self.folder.samples[index]
        image = self.folder.loader(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.transform(image), target


class _SeededBatches:
    """Batch sampler: turns index batches into lists of (index, seed) keys, lazily."""

    def __init__(self, batch_indices, seed: int, augment: bool):
        self.batch_indices, self.seed, self.augment = batch_indices, seed, augment

    def __iter__(self):
        for idx in self.batch_indices:
            idx = _as_index(idx)
            if self.augment:
                seeds = (example_hashes(self.seed, idx, 1)[0] >> np.uint64(1)).tolist()
                yield list(zip(idx.tolist(), seeds))
            else:
                yield [(i, 0) for i in idx.tolist()]


def _relabel(val, class_to_idx: Dict[str, int], root: str) -> None:
    """Give `val` train's class indices: ImageFolder numbers classes by the folders it sees, so a val/
    missing a class would otherwise shift every label after it."""
    extra = sorted(set(val.classes) - set(class_to_idx))
    if extra:
        raise DataError(
            f"dataset 'imagenet': val/ in {root} has class folders not in train/: {', '.join(extra[:5])}"
        )
    remap = [class_to_idx[c] for c in val.classes]
    val.samples = val.imgs = [(path, remap[t]) for path, t in val.samples]
    val.targets = [t for _, t in val.samples]
    val.classes = sorted(class_to_idx, key=class_to_idx.get)
    val.class_to_idx = dict(class_to_idx)


@DATASETS.register("imagenet")
class ImageNet(Dataset):
    """ImageNet in ImageFolder layout: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``.

    Standard ResNet transforms: RandomResizedCrop + horizontal flip when augmenting, else Resize + CenterCrop.

    Args:
        root: The folder holding train/ and val/.
        image_size: Crop size (224); smaller sizes keep tests fast.
        resize_size: Resize before the center crop (default image_size * 256/224, i.e. 256 for 224).
    """

    name = "imagenet"
    has_augmentation = True
    _dirs = {"train": "train", "test": "val"}

    @classmethod
    def problems(cls, root, image_size: int = 224, resize_size: Optional[int] = None):
        layout = "ImageFolder layout root/train/<class>/*.JPEG and root/val/<class>/*.JPEG"
        if root is None:
            return [_missing_root(cls.name, f"the folder with the {layout}")]
        problems = []
        missing = [d for d in cls._dirs.values() if not os.path.isdir(os.path.join(root, d))]
        if missing:
            problems.append(
                f"dataset {cls.name!r}: no {' or '.join(d + '/' for d in missing)} folder in {root}; "
                f"expected the {layout}"
            )
        for key, value in (("image_size", image_size), ("resize_size", resize_size)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                problems.append(f"dataset {cls.name!r}: {key}={value!r} must be a positive integer")
        return problems

    def __init__(self, root: Optional[str] = None, image_size: int = 224, resize_size: Optional[int] = None):
        from torchvision import datasets
        from torchvision import transforms as T

        problems = self.problems(root, image_size, resize_size)
        if problems:
            raise DataError(problems)
        resize_size = resize_size or int(image_size * 256 / 224)
        try:
            train = datasets.ImageFolder(os.path.join(root, "train"))
            val = datasets.ImageFolder(os.path.join(root, "val"), allow_empty=True)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"dataset {self.name!r}: {e} (in {root})".replace("\n", " ")) from None
        _relabel(val, train.class_to_idx, root)
        self._folders = {"train": train, "test": val}
        self.num_classes = len(train.classes)
        self.classes = list(train.classes)
        self.input_shape = (3, image_size, image_size)
        normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self._train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] + normalize)
        self._test_tf = T.Compose([T.Resize(resize_size), T.CenterCrop(image_size)] + normalize)

    def size(self, split):
        self._check_split(split)
        return len(self._folders[split].samples)

    def labels(self, split):
        self._check_split(split)
        return torch.tensor(self._folders[split].targets, dtype=torch.int64)

    def batches(self, split, batch_indices, *, augment, seed, num_workers=0):
        self._check_split(split)
        samples = _SeededSamples(self._folders[split], self._train_tf if augment else self._test_tf)
        loader = torch.utils.data.DataLoader(
            samples,
            batch_sampler=_SeededBatches(batch_indices, seed, augment),
            num_workers=num_workers,
            # Without an explicit generator the loader draws its base seed from the global RNG.
            generator=torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF),
        )
        yield from loader


# ------------------------------------------------------------------------------------------------- API


def default_root(name: str) -> Optional[str]:
    """Where dataset `name` is looked for when no root is given.

    Returns:
        A path, or None when the dataset needs an explicit root (or needs none at all, like digits).

    Raises:
        ConfigError: unknown dataset name.
    """
    return getattr(DATASETS.get(name), "default_root", None)


def load_dataset(name: str, root: Optional[str] = None, **kwargs) -> Dataset:
    """Load a registered dataset.

    Args:
        name: Registry name ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet").
        root: Data folder; None uses `default_root(name)`.
        **kwargs: Dataset options (e.g. image_size for imagenet).

    Returns:
        The loaded Dataset.

    Raises:
        ConfigError: unknown name or option.
        DataError: missing or malformed files (one line, naming the path and the fix).
    """
    factory = DATASETS.get(name)
    DATASETS.check_options(name, kwargs, skip=1)
    if root is None:
        root = default_root(name)
    else:
        root = os.path.expanduser(root)
    return factory(root, **kwargs)


def validate_dataset(name: str, root: Optional[str], **kwargs) -> List[str]:
    """Problems that would stop `load_dataset`, found by checking paths only (nothing is loaded).

    Args:
        name: Registry name.
        root: Data folder; None uses `default_root(name)`.
        **kwargs: Dataset options.

    Returns:
        One-line problem messages; empty when the files are where they should be.
    """
    try:
        factory = DATASETS.get(name)
        DATASETS.check_options(name, kwargs, skip=1)
    except ConfigError as e:
        return list(e.problems)
    root = default_root(name) if root is None else os.path.expanduser(root)
    check = getattr(factory, "problems", None)
    return list(check(root, **kwargs)) if check else []


class NoisyLabels(Dataset):
    """A dataset whose training labels are partly replaced by uniformly random ones (DLDR §5.4, Zhang et al.).

    A fixed fraction of the training examples, chosen by ``seed``, gets a label drawn uniformly from all
    classes (so about 1/C of them keep their true label, as in the protocol). The choice depends only on
    (seed, fraction, dataset), so every method trained with the same seed sees the same corrupted labels.
    The test split is untouched.
    """

    def __init__(self, base: Dataset, fraction: float, seed: int):
        self.base = base
        self.name, self.num_classes, self.input_shape = base.name, base.num_classes, base.input_shape
        self.fraction, self.seed = fraction, seed
        labels = base.labels("train")
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(labels), generator=gen)[: int(round(fraction * len(labels)))]
        self.noisy = labels.clone()
        self.noisy[chosen] = torch.randint(0, base.num_classes, (len(chosen),), generator=gen)
        self.corrupted = chosen

    def size(self, split: str) -> int:
        return self.base.size(split)

    def labels(self, split: str) -> torch.Tensor:
        return self.noisy.clone() if split == "train" else self.base.labels(split)

    def batches(self, split, batch_indices, *, augment, seed, num_workers=0):
        batch_indices = list(batch_indices)
        for (x, y), idx in zip(self.base.batches(split, batch_indices, augment=augment, seed=seed,
                                                 num_workers=num_workers), batch_indices):
            yield x, (self.noisy[_as_index(idx)] if split == "train" else y)


class HoldOut(Dataset):
    """A validation split held out of the training split: ``val`` is a fixed random ``fraction`` of the training
    examples (chosen by ``seed`` alone, so every trial of a sweep validates on the same examples), ``train`` is
    the rest, ``test`` is untouched. Selection (which d reaches the threshold) reads ``val``, never ``test``."""

    def __init__(self, base: Dataset, fraction: float, seed: int):
        self.base = base
        self.name, self.num_classes, self.input_shape = base.name, base.num_classes, base.input_shape
        n = base.size("train")
        k = int(round(fraction * n))
        if not 0 < k < n:
            raise DataError(f"data.val_fraction={fraction} holds out {k} of the {n} training examples: pick a "
                            f"fraction that leaves both splits non-empty")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.index = {"val": perm[:k].sort().values, "train": perm[k:].sort().values}

    def size(self, split: str) -> int:
        return len(self.index[split]) if split in self.index else self.base.size(split)

    def labels(self, split: str) -> torch.Tensor:
        if split in self.index:
            return self.base.labels("train")[self.index[split]]
        return self.base.labels(split)

    def batches(self, split, batch_indices, *, augment, seed, num_workers=0):
        if split not in self.index:
            yield from self.base.batches(split, batch_indices, augment=augment, seed=seed, num_workers=num_workers)
            return
        mapped = [self.index[split][_as_index(idx)] for idx in batch_indices]
        yield from self.base.batches("train", mapped, augment=augment and split == "train", seed=seed,
                                     num_workers=num_workers)
