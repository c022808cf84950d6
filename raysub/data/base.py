"""Dataset base classes, the dataset registry, and helpers shared by every format.

Every dataset exposes the same interface (`Dataset`): sizes, labels, and `batches`, which turns lists of
example indices into normalized (x, y) tensors. Batching by explicit indices keeps sampling (which examples,
in which order, on which rank) in the caller's hands, so a run is reproducible from its seed alone.

Small datasets (digits, MNIST, Fashion-MNIST, CIFAR) live in memory as uint8/float tensors and are normalized
per batch (`InMemoryDataset`); ImageNet streams JPEGs through a torch DataLoader. Nothing here downloads or
writes files.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from raysub.errors import DataError
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
