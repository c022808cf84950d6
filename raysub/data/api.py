"""The dataset API: find, check and load a registered dataset by name, or the dataset a run config asks for.

`default_root`, `load_dataset` and `validate_dataset` take a registry name; `dataset_kwargs`, `open_dataset`
and `check_data_section` take a `raysub.config.Config` (imported for typing only, so this module never imports
the config module).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from raysub.data.base import DATASETS, Dataset
from raysub.data.wrappers import ClassSubset, HoldOut, NoisyLabels, class_range_problem, classes_problems
from raysub.errors import ConfigError
from raysub.config import positive

if TYPE_CHECKING:
    from raysub.config import Config


def default_root(name: str) -> Optional[str]:
    """Where dataset `name` is looked for when no root is given.

    Returns:
        A path, or None when the dataset needs an explicit root (or needs none at all, like digits).

    Raises:
        ConfigError: unknown dataset name.
    """
    return getattr(DATASETS.get(name), "default_root", None)


def load_dataset(name: str, root: Optional[str] = None, **kwargs) -> Dataset:
    """Load a registered dataset.

    Args:
        name: Registry name ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet").
        root: Data folder; None uses `default_root(name)`.
        **kwargs: Dataset options (e.g. image_size for imagenet).

    Returns:
        The loaded Dataset.

    Raises:
        ConfigError: unknown name or option.
        DataError: missing or malformed files (one line, naming the path and the fix).
    """
    factory = DATASETS.get(name)
    DATASETS.check_options(name, kwargs, skip=1)
    if root is None:
        root = default_root(name)
    elif "://" not in root:
        root = os.path.expanduser(root)
    return factory(root, **kwargs)


def validate_dataset(name: str, root: Optional[str], **kwargs) -> List[str]:
    """Problems that would stop `load_dataset`, found by checking paths only (nothing is loaded).

    Args:
        name: Registry name.
        root: Data folder; None uses `default_root(name)`.
        **kwargs: Dataset options.

    Returns:
        One-line problem messages; empty when the files are where they should be.
    """
    try:
        factory = DATASETS.get(name)
        DATASETS.check_options(name, kwargs, skip=1)
    except ConfigError as e:
        return list(e.problems)
    root = default_root(name) if root is None else root if "://" in root else os.path.expanduser(root)
    check = getattr(factory, "problems", None)
    return list(check(root, **kwargs)) if check else []


# data.* keys that are dataset options (ImageNet's), passed only when set away from their defaults: a dataset
# that lacks one then refuses it by name
_OPTIONS = {"ingest": "auto", "bad_images": "stop", "partial_val": False, "preprocess_cpus": 1.0,
            "preprocess_labels": {}}


def dataset_kwargs(cfg: Config) -> Dict[str, Any]:
    """The dataset options a config implies (ImageNet's image_size and ingest options), for `load_dataset`."""
    out = {"image_size": cfg.data.image_size} if cfg.data.image_size else {}
    out.update({k: getattr(cfg.data, k) for k, default in _OPTIONS.items() if getattr(cfg.data, k) != default})
    return out


def open_dataset(cfg: Config):
    """The run's dataset: only the ``data.classes`` (relabelled 0..k-1) when set, then label noise when
    ``data.label_noise`` > 0, then a validation split held out of the training split when ``data.val_fraction``
    > 0.

    The subset comes first so that noisy labels are drawn among the k kept classes and val is held out of the
    subset's training examples.

    Raises:
        ConfigError: a bad ``data.classes`` list.
        DataError: missing or malformed files; a ``data.classes`` class the dataset lacks or has no examples of.
    """
    data = load_dataset(cfg.data.name, cfg.data.root, **dataset_kwargs(cfg))
    if cfg.data.classes is not None:
        data = ClassSubset(data, cfg.data.classes)
    if cfg.data.label_noise > 0:
        seed = cfg.seed if cfg.data.label_noise_seed is None else cfg.data.label_noise_seed
        data = NoisyLabels(data, cfg.data.label_noise, seed)
    if cfg.data.val_fraction > 0:
        data = HoldOut(data, cfg.data.val_fraction, cfg.data.val_seed)
    return data


def check_data_section(cfg: Config, check_data: bool = True) -> List[str]:
    """Problems of the ``data`` section of a config (empty list: fine); nothing is loaded.

    Checks the dataset name, the batch sizes and loader processes, ``val_fraction``, ``label_noise`` and
    ``classes`` (a class beyond a registered dataset's fixed ``num_classes`` too), that
    ``data.batch_size`` and ``train.batch_size`` split evenly over ``cluster.num_workers``, and, when
    ``check_data``, that the dataset's files are where they should be (`validate_dataset`).
    """

    problems: List[str] = []
    if cfg.data.name not in DATASETS:
        problems.append(
            f"data.name: unknown {DATASETS.kind} {cfg.data.name!r}: choose one of {', '.join(DATASETS.names())}"
        )
    for key, value in (
        ("data.batch_size", cfg.data.batch_size),
        ("data.eval_batch_size", cfg.data.eval_batch_size),
    ):
        positive(problems, key, value)
    positive(problems, "data.num_workers", cfg.data.num_workers, allow_zero=True)
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        problems.append(f"data.val_fraction={cfg.data.val_fraction}: the held-out fraction must be in [0, 1)")
    if not 0.0 <= cfg.data.label_noise <= 1.0:
        problems.append(f"data.label_noise={cfg.data.label_noise}: a fraction of the labels must be in [0, 1]")
    if cfg.data.classes is not None:
        problems.extend(classes_problems(cfg.data.classes))
        # the registered class's num_classes when it is fixed (ImageNet counts its folders: checked at open)
        known = getattr(DATASETS.get(cfg.data.name), "num_classes", 0) if cfg.data.name in DATASETS else 0
        if known:
            problems.extend(filter(None, [class_range_problem(cfg.data.classes, cfg.data.name, known)]))
    if cfg.cluster.num_workers and cfg.data.batch_size and cfg.data.batch_size % cfg.cluster.num_workers:
        problems.append(
            f"data.batch_size={cfg.data.batch_size} is not divisible by cluster.num_workers="
            f"{cfg.cluster.num_workers}: pick a multiple so every rank gets an equal share"
        )
    tb = cfg.train.batch_size
    if tb and cfg.cluster.num_workers and tb % cfg.cluster.num_workers:
        problems.append(
            f"train.batch_size={tb} is not divisible by cluster.num_workers={cfg.cluster.num_workers}: pick a multiple"
        )
    if check_data and cfg.data.name in DATASETS:
        problems.extend(validate_dataset(cfg.data.name, cfg.data.root, **dataset_kwargs(cfg)))
    return problems
