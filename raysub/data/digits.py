"""scikit-learn's 8x8 digits, registered as "digits"."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import numpy as np
import torch

from raysub.data.base import DATASETS, InMemoryDataset


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
        data, target = load_digits_arrays()
        x = data.astype(np.float32) / 16.0
        y = target.astype(np.int64)
        order = np.random.RandomState(0).permutation(len(y))
        n_train = int(0.8 * len(y))
        train, test = order[:n_train], order[n_train:]
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        self._finish(
            {"train": torch.from_numpy(x[train]), "test": torch.from_numpy(x[test])},
            {"train": torch.from_numpy(y[train]), "test": torch.from_numpy(y[test])},
        )


def load_digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """The digits' (1797, 64) pixels and (1797,) labels, as ``sklearn.datasets.load_digits`` returns them.

    Read straight from the CSV scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``: 64 pixel columns and
    the label, the file ``load_digits`` itself parses) without importing scikit-learn: its import (SciPy with it)
    costs ~1.7 s of CPU, paid by every Train worker of every stage on digits — more than the quickstart's whole
    training. Falls back to ``load_digits`` where a scikit-learn release keeps the file elsewhere.
    """
    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec and spec.origin \
        else None
    if path and os.path.exists(path):
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1], table[:, -1].astype(int)
    from sklearn.datasets import load_digits  # heavy (SciPy): only where the shipped CSV was not found

    bunch = load_digits()
    return bunch.data, bunch.target
