"""scikit-learn's 8x8 digits, registered as "digits"."""
from __future__ import annotations

from typing import Optional

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
