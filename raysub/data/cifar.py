"""CIFAR-10 ("cifar10") and CIFAR-100 ("cifar100") in torchvision's on-disk python format."""
from __future__ import annotations

import os
import pickle
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from raysub.data.base import DATASETS, InMemoryDataset, _missing_root, example_hashes
from raysub.errors import DataError


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
