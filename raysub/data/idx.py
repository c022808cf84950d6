"""MNIST-style datasets stored as IDX files: MNIST ("mnist") and Fashion-MNIST ("fashion-mnist")."""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import Optional

import numpy as np
import torch

from raysub.data.base import DATASETS, InMemoryDataset, _missing_root
from raysub.errors import DataError

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
