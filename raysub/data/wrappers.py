"""Datasets wrapping another: a class subset (`ClassSubset`), label noise (`NoisyLabels`) and a held-out
validation split (`HoldOut`)."""
from __future__ import annotations

from typing import List, Sequence

import torch

from raysub.data.base import SPLITS, Dataset, _as_index
from raysub.errors import ConfigError, DataError


def classes_problems(classes: Sequence[int]) -> List[str]:
    """Problems of a ``data.classes`` list that need no dataset (empty list: fine): at least two classes, no
    duplicates, none negative. Whether each class exists is known only from the dataset (`ClassSubset`)."""
    problems = []
    if len(classes) < 2:
        problems.append(f"data.classes={list(classes)}: a subset needs at least 2 classes; list more, or unset "
                        f"data.classes (null) for all classes")
    dups = sorted({c for c in classes if list(classes).count(c) > 1})
    if dups:
        problems.append(f"data.classes={list(classes)} names class {dups[0]} twice: list each class once")
    negative = [c for c in classes if c < 0]
    if negative:
        problems.append(f"data.classes={list(classes)} names class {negative[0]}: class numbers start at 0")
    return problems


def class_range_problem(classes: Sequence[int], name: str, num_classes: int) -> str:
    """'' when every class of ``classes`` is below ``num_classes`` (dataset ``name``'s), else the one-line problem
    naming the first that is not."""
    over = [c for c in classes if c >= num_classes]
    if not over:
        return ""
    return (f"data.classes={list(classes)} names class {over[0]}, but {name} has {num_classes} classes "
            f"(0–{num_classes - 1}): pick classes in that range")


class ClassSubset(Dataset):
    """The examples of some classes only, in every split, relabelled ``classes[i]`` -> ``i`` (for transfer: a
    base model on classes 0-4, fine-tuned on 5-9).

    Index i of a split is the i-th kept example in the base split's order; batches map indices into the base
    split, so an example's augmentation is the base's. Deterministic: no seed.

    Args:
        base: The dataset to subset (its splits are kept as they are; wrap this in `HoldOut` for a val split).
        classes: Base class numbers to keep, in the order of their new labels 0..k-1.

    Raises:
        ConfigError: fewer than 2 classes, a duplicate or a negative class.
        DataError: a class the base does not have, or one with no examples in a split.
    """

    def __init__(self, base: Dataset, classes: Sequence[int]):
        problems = classes_problems(classes)
        if problems:
            raise ConfigError(problems)
        self.base = base
        self.classes = [int(c) for c in classes]
        self.name, self.num_classes, self.input_shape = base.name, len(self.classes), base.input_shape
        problem = class_range_problem(self.classes, base.name, base.num_classes)
        if problem:
            raise DataError(problem)
        # base label -> new label, -1 for a class left out
        self.relabel = torch.full((base.num_classes,), -1, dtype=torch.long)
        self.relabel[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        self.index = {}
        for split in SPLITS:
            labels = base.labels(split)
            counts = torch.bincount(labels, minlength=base.num_classes)
            empty = [c for c in self.classes if counts[c] == 0]
            if empty:
                raise DataError(f"data.classes={self.classes}: class {empty[0]} has no examples in the {split} "
                                f"split of {base.name}; leave it out of data.classes")
            self.index[split] = (self.relabel[labels] >= 0).nonzero().squeeze(1)

    def size(self, split: str) -> int:
        self._check_split(split)
        return len(self.index[split])

    def labels(self, split: str) -> torch.Tensor:
        self._check_split(split)
        return self.relabel[self.base.labels(split)[self.index[split]]]

    def batches(self, split, batch_indices, *, augment, seed, num_workers=0):
        self._check_split(split)
        mapped = [self.index[split][_as_index(idx)] for idx in batch_indices]
        for x, y in self.base.batches(split, mapped, augment=augment, seed=seed, num_workers=num_workers):
            yield x, self.relabel[y]


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
