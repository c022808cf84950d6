"""Datasets: one registry, one small module per on-disk format.

`base` holds the registry `DATASETS`, the `Dataset` interface, `InMemoryDataset` and the per-example hashing
that keys augmentation; `digits`, `idx` (MNIST, Fashion-MNIST), `cifar` (CIFAR-10/100) and `imagenet` each
register their datasets on import (`image_tree` streams ImageNet's trees, and `shards` indexes its tar shards,
local or in object storage, through Ray Data); `wrappers` holds `ClassSubset`, `NoisyLabels` and `HoldOut`; `api`
loads and checks datasets by name (`load_dataset`, `validate_dataset`, `default_root`) or from a run config
(`open_dataset`, `dataset_kwargs`, `check_data_section`). Importing this package registers every dataset and
re-exports all of these names. Nothing here downloads; the only files written are the shard indexes' cache.
"""
from raysub.data.base import (
    DATASETS,
    SPLITS,
    Batch,
    Dataset,
    InMemoryDataset,
    example_hashes,
)
from raysub.data.digits import Digits
from raysub.data.idx import MNIST, FashionMNIST, IDXDataset, read_idx
from raysub.data.cifar import CIFAR10, CIFAR100, CifarDataset
from raysub.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageNet
from raysub.data.wrappers import ClassSubset, HoldOut, NoisyLabels
from raysub.data.api import (
    check_data_section,
    dataset_kwargs,
    default_root,
    load_dataset,
    open_dataset,
    validate_dataset,
)

__all__ = [
    "DATASETS",
    "SPLITS",
    "Batch",
    "Dataset",
    "InMemoryDataset",
    "example_hashes",
    "Digits",
    "read_idx",
    "IDXDataset",
    "FashionMNIST",
    "MNIST",
    "CifarDataset",
    "CIFAR10",
    "CIFAR100",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNet",
    "ClassSubset",
    "NoisyLabels",
    "HoldOut",
    "default_root",
    "load_dataset",
    "validate_dataset",
    "dataset_kwargs",
    "open_dataset",
    "check_data_section",
]
