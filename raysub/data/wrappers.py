"""Datasets wrapping another: label noise (`NoisyLabels`) and a held-out validation split (`HoldOut`)."""
from __future__ import annotations

import torch

from raysub.data.base import Dataset, _as_index
from raysub.errors import DataError


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
