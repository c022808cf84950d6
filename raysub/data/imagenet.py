"""ImageNet ("imagenet") in ImageFolder layout, on a local disk or in object storage, streamed as JPEGs through a
torch DataLoader (``ingest="dataloader"``, local trees) or Ray Data (``ingest="ray_data"``, `raysub.data.image_tree`;
the default for an ``s3://``/``gs://`` root).

Both paths decode with PIL and run the same transforms under each example's own seed, so the same files give the same
tensors bit for bit. One DataLoader per (split, augment, num_workers), built on first use and reused by every later `batches` call:
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

import raysub.data.image_tree as image_tree
import raysub.data.shards as shards
from raysub.data.base import DATASETS, Dataset, _as_index, _missing_root, example_hashes
from raysub.errors import DataError

INGESTS = ("auto", "dataloader", "ray_data")

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
        try:
            image = self.folder.loader(path)
        except Exception as e:  # a truncated or non-image file: named, not a PIL traceback from a loader worker
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''};"
                            f" replace or remove it (data.bad_images=skip needs data.ingest=ray_data)") from None
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
    """ImageNet in ImageFolder layout: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``, or as
    WebDataset tar shards ``root/train/*.tar`` and ``root/val/*.tar`` (``KEY.jpg`` + ``KEY.cls``; `raysub.data.shards`,
    read through the stream).

    Standard ResNet transforms: RandomResizedCrop + horizontal flip when augmenting, else Resize + CenterCrop.

    Args:
        root: The folder holding train/ and val/.
        image_size: Crop size (224); smaller sizes keep tests fast.
        resize_size: Resize before the center crop (default image_size * 256/224, i.e. 256 for 224).
        ingest: "dataloader" (a torch DataLoader in the loop's process; a local root only), "ray_data" (Ray Data's
            streaming executor decodes on the cluster's CPUs), "auto" (ray_data for a URI root, else dataloader).
        bad_images: an unreadable image "stop"s the run with its URI, or is left out of its batch with a line
            saying so ("skip", ray_data only).
        partial_val: accept a val/ that lacks some of train/'s classes (refused by default: a typo'd or
            half-copied val/ would silently evaluate on fewer classes).
        preprocess_cpus: CPUs each Ray Data decode task reserves.
        preprocess_labels: node labels the decode tasks must run on (Ray's label_selector), e.g. CPU-only nodes.
    """

    name = "imagenet"
    has_augmentation = True
    _dirs = {"train": "train", "test": "val"}

    @classmethod
    def problems(cls, root, image_size: int = 224, resize_size: Optional[int] = None, ingest: str = "auto",
                 bad_images: str = "stop", partial_val: bool = False, preprocess_cpus: float = 1.0,
                 preprocess_labels: Optional[Dict[str, str]] = None):
        layout = "ImageFolder layout root/train/<class>/*.JPEG and root/val/<class>/*.JPEG"
        if root is None:
            return [_missing_root(cls.name, f"the folder with the {layout}")]
        problems = []
        if ingest not in INGESTS:
            problems.append(f"dataset {cls.name!r}: ingest={ingest!r}: choose one of {', '.join(INGESTS)}")
        if bad_images not in image_tree.BAD_IMAGES:
            problems.append(f"dataset {cls.name!r}: bad_images={bad_images!r}: choose stop or skip")
        elif bad_images == "skip" and cls._ingest(root, ingest) != "ray_data":
            problems.append(f"dataset {cls.name!r}: bad_images=skip needs ingest=ray_data (the DataLoader stops)")
        if not (isinstance(preprocess_cpus, (int, float)) and preprocess_cpus > 0):
            problems.append(f"dataset {cls.name!r}: preprocess_cpus={preprocess_cpus!r} must be a number > 0")
        if cls._ingest(root, ingest) == "dataloader" and image_tree.is_uri(root):
            problems.append(f"dataset {cls.name!r}: ingest=dataloader reads a local folder; {image_tree.shown(root)} "
                            f"is a URI: use ingest=ray_data (or auto)")
        elif cls._ingest(root, ingest) == "dataloader" and image_tree.is_sharded(root):
            problems.append(f"dataset {cls.name!r}: ingest=dataloader reads an ImageFolder tree; {root}/train holds "
                            f"tar shards: use ingest=ray_data (or auto)")
        for key, value in (("image_size", image_size), ("resize_size", resize_size)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                problems.append(f"dataset {cls.name!r}: {key}={value!r} must be a positive integer")
        labels = preprocess_labels or {}
        if not (isinstance(labels, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())):
            problems.append(f"dataset {cls.name!r}: preprocess_labels={labels!r} must map label names to string "
                            f"values, e.g. {{raysub/role: data}}")
        if image_tree.is_uri(root) or image_tree.is_sharded(root):
            # listed (shards indexed) now: an unreachable store, a missing bucket or class, a bad shard, before Ray
            return problems + image_tree.tree_problems(cls.name, root, cls._dirs, partial_val)
        missing = [d for d in cls._dirs.values() if not os.path.isdir(os.path.join(root, d))]
        if missing:
            problems.append(
                f"dataset {cls.name!r}: no {' or '.join(d + '/' for d in missing)} folder in {root}; "
                f"expected the {layout}"
            )
        return problems

    @staticmethod
    def _ingest(root, ingest: str) -> str:
        if ingest != "auto":
            return ingest
        return "ray_data" if image_tree.is_uri(root) or image_tree.is_sharded(root) else "dataloader"

    def __init__(self, root: Optional[str] = None, image_size: int = 224, resize_size: Optional[int] = None,
                 ingest: str = "auto", bad_images: str = "stop", partial_val: bool = False,
                 preprocess_cpus: float = 1.0, preprocess_labels: Optional[Dict[str, str]] = None):
        # heavy: torchvision loads here, not when this module is imported
        from torchvision import datasets
        from torchvision import transforms as T

        problems = self.problems(root, image_size, resize_size, ingest, bad_images, partial_val, preprocess_cpus,
                                 preprocess_labels)
        if problems:
            raise DataError(problems)
        resize_size = resize_size or int(image_size * 256 / 224)
        self.root, self.ingest, self.bad_images = str(root), self._ingest(root, ingest), bad_images
        self.stream = image_tree.Stream(cpus=float(preprocess_cpus), labels=preprocess_labels)
        if self.ingest == "ray_data":
            # listed and checked once (a URI's listing is the one `problems` just made, kept by image_tree)
            problems, listed = image_tree.check_tree(self.name, self.root, self._dirs, partial_val)
            if problems:
                raise DataError(problems)
            classes = listed["train"][0]
            index = {c: i for i, c in enumerate(classes)}
            self._samples = {s: [(path, index[c]) for path, c in files] for s, (_, files) in listed.items()}
            self._folders = {}
        else:
            try:
                train = datasets.ImageFolder(os.path.join(root, "train"))
                val = datasets.ImageFolder(os.path.join(root, "val"), allow_empty=True)
            except (FileNotFoundError, ValueError) as e:
                raise DataError(f"dataset {self.name!r}: {e} (in {root})".replace("\n", " ")) from None
            _relabel(val, train.class_to_idx, root)
            absent = sorted(set(train.classes) - {val.classes[t] for t in set(val.targets)})
            if absent and not partial_val:
                raise DataError(f"dataset {self.name!r}: {len(absent)} class(es) of train/ have no images in val/ "
                                f"of {root} ({', '.join(absent[:5])}); add them, or set data.partial_val=true to "
                                f"evaluate on the classes val/ has")
            classes = list(train.classes)
            self._folders = {"train": train, "test": val}
            self._samples = {s: folder.samples for s, folder in self._folders.items()}
        self.num_classes = len(classes)
        self.classes = list(classes)
        self.input_shape = (3, image_size, image_size)
        normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        # the PIL part (what a Ray Data task runs: it ships uint8 crops), then the float part
        self._train_pil = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()])
        self._test_pil = T.Compose([T.Resize(resize_size), T.CenterCrop(image_size)])
        self._train_tf = T.Compose([self._train_pil] + normalize)
        self._test_tf = T.Compose([self._test_pil] + normalize)
        self._loaders: Dict[Tuple[str, bool, int], torch.utils.data.DataLoader] = {}
        self._busy: Set[Tuple[str, bool, int]] = set()

    def __getstate__(self):
        # loaders hold worker processes and threads: a copy sent elsewhere builds its own
        state = dict(self.__dict__)
        state["_loaders"], state["_busy"] = {}, set()
        return state

    def size(self, split):
        self._check_split(split)
        return len(self._samples[split])

    def labels(self, split):
        self._check_split(split)
        return torch.tensor([t for _, t in self._samples[split]], dtype=torch.int64)

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
        if self.ingest == "ray_data":
            yield from self._streamed(split, batch_indices, augment, seed)
            return
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

    def _streamed(self, split, batch_indices, augment, seed):
        """`batches` through Ray Data (`raysub.data.image_tree`): the same (index, seed) keys as the DataLoader's."""
        samples = self._samples[split]
        batches = [_as_index(b) for b in batch_indices]
        rows = []
        for idx in batches:
            seeds = (example_hashes(seed, idx, 1)[0] >> np.uint64(1)).astype(np.int64) if augment else \
                np.zeros(len(idx), dtype=np.int64)
            picked = [samples[i] for i in idx.tolist()]
            row = {"index": idx.numpy(), "seed": seeds, "label": np.array([t for _, t in picked], dtype=np.int64)}
            if picked and isinstance(picked[0][0], shards.Member):  # tar shards: where each image lies
                for column in ("offset", "size"):
                    row[column] = np.array([getattr(m, column) for m, _ in picked], dtype=np.int64)
                row["path"] = np.array([m.shard for m, _ in picked], dtype=object)
            else:
                row["path"] = np.array([p for p, _ in picked], dtype=object)
            rows.append(row)
        transform = self._train_pil if augment else self._test_pil
        blocks = self.stream(self.root, [r for r in rows if len(r["index"])], transform)
        sizes = [len(idx) for idx in batches if len(idx)]
        out = image_tree.rebatch(blocks, sizes)
        for idx in batches:
            if not len(idx):
                yield torch.empty((0, *self.input_shape)), torch.empty(0, dtype=torch.int64)
                continue
            block = next(out)
            if not np.array_equal(block["index"], idx.numpy()):  # the stream's order is the loop's: checked
                raise RuntimeError(f"Ray Data returned examples {block['index'][:5].tolist()}... for a batch of "
                                   f"{idx[:5].tolist()}...: the stream lost its order")
            ok = block["ok"].astype(bool)
            for i, why in zip(block["index"][~ok].tolist(), block["error"][~ok].tolist()):
                where = samples[i][0]
                uri = (f"{image_tree.object_uri(self.root, where.shard)} (member {where.name})"
                       if isinstance(where, shards.Member) else image_tree.object_uri(self.root, where))
                if self.bad_images == "stop":
                    raise DataError(f"cannot read image {uri}: {why}; replace or remove it, or set "
                                    f"data.bad_images=skip to leave it out")
                image_tree.warn(f"skipped unreadable image {uri} ({why}; data.bad_images=skip)")
            yield (image_tree.to_float(block["x"][ok], IMAGENET_MEAN, IMAGENET_STD),
                   torch.from_numpy(block["label"][ok]))
        next(out, None)  # the stream must end here: rows beyond the batches asked for are an error
