"""ImageNet ("imagenet") in ImageFolder layout, streamed as JPEGs through a torch DataLoader.

One DataLoader per (split, augment, num_workers), built on first use and reused by every later `batches` call:
its worker processes persist across epochs (``persistent_workers``) and, in a process that already uses CUDA,
batches come in pinned memory (``pin_memory``) so ``x.to(device, non_blocking=True)`` overlaps the copy. Each
call points the loader's batch sampler at that call's indices and seed; augmentation stays a pure function of
(seed, example index) whichever worker loads an example.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Set, Tuple

import numpy as np
import torch

from raysub.data.base import DATASETS, Dataset, _as_index, _missing_root, example_hashes
from raysub.errors import DataError

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
    """Batch sampler: turns index batches into lists of (index, seed) keys, lazily.

    A persistent loader keeps one instance; each `ImageNet.batches` call sets ``batch_indices`` and ``seed``
    before iterating (the loader reads its batch sampler in this process, never in the workers)."""

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
        # heavy: torchvision loads here, not when this module is imported
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
        self._loaders: Dict[Tuple[str, bool, int], torch.utils.data.DataLoader] = {}
        self._busy: Set[Tuple[str, bool, int]] = set()

    def __getstate__(self):
        # loaders hold worker processes and threads: a copy sent elsewhere builds its own
        state = dict(self.__dict__)
        state["_loaders"], state["_busy"] = {}, set()
        return state

    def size(self, split):
        self._check_split(split)
        return len(self._folders[split].samples)

    def labels(self, split):
        self._check_split(split)
        return torch.tensor(self._folders[split].targets, dtype=torch.int64)

    def loader(self, split: str, augment: bool, num_workers: int = 0) -> torch.utils.data.DataLoader:
        """The DataLoader `batches` reuses for (split, augment, num_workers), built on first use.

        Workers persist between calls when ``num_workers`` > 0; ``pin_memory`` is on when this process has
        already initialised CUDA (a GPU training loop moves its model there first), never on a CPU-only worker.
        """
        key = (split, bool(augment), int(num_workers))
        if key not in self._loaders:
            self._loaders[key] = self._new_loader(*key)
        return self._loaders[key]

    def _new_loader(self, split: str, augment: bool, num_workers: int, persistent: bool = True
                    ) -> torch.utils.data.DataLoader:
        samples = _SeededSamples(self._folders[split], self._train_tf if augment else self._test_tf)
        return torch.utils.data.DataLoader(
            samples,
            batch_sampler=_SeededBatches([], 0, augment),
            num_workers=num_workers,
            persistent_workers=persistent and num_workers > 0,
            pin_memory=torch.cuda.is_available() and torch.cuda.is_initialized(),
            # Without an explicit generator the loader draws its workers' base seed from the global RNG (the
            # transforms do not use it: each sample runs under its own seed).
            generator=torch.Generator().manual_seed(0),
        )

    def batches(self, split, batch_indices, *, augment, seed, num_workers=0):
        self._check_split(split)
        key = (split, bool(augment), int(num_workers))
        # A loader mid-iteration (an unfinished generator of an earlier call) would be reset under its consumer:
        # a nested or interleaved call on the same key gets a loader of its own instead.
        shared = key not in self._busy
        loader = self.loader(*key) if shared else self._new_loader(*key, persistent=False)  # one-off: no lingering workers
        loader.batch_sampler.batch_indices = batch_indices
        loader.batch_sampler.seed = seed
        if shared:
            self._busy.add(key)
        try:
            yield from loader
        finally:
            if shared:
                self._busy.discard(key)
