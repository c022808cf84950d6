"""φ on disk: ``weights.pt`` = {"config": LearnedOptimizerConfig.to_dict(), "params": {name: tensor}}, read and
written through the run-directory storage (`raysub.storage.RunDir`), so a local path and a URI work alike.

``uri`` names the file itself, or a directory holding ``weights.pt`` or ``l2o/weights.pt`` (a meta-training run
directory). Every failure is one `ConfigError` line naming the input and what to do.
"""
from __future__ import annotations

import posixpath
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from raysub.errors import ConfigError
from raysub.l2o.lstm import LearnedOptimizerConfig, check_params, expectation_problems

WEIGHTS = "weights.pt"
HOW = "give the weights.pt that `raysub l2o meta-train` writes (RUN/l2o/weights.pt), or a path/URI to it"


def _locate(uri: str):
    """(RunDir, relative name) of the weights file ``uri`` names; raises ConfigError when there is none."""
    import pyarrow.fs as pafs

    from raysub.storage import RunDir, split_uri

    try:
        run = RunDir(uri)
        kind = run.fs.get_file_info(run.root).type
    except Exception as exc:  # an unknown scheme, unreachable storage
        raise ConfigError(f"learned-optimizer weights {uri!r} cannot be opened ({type(exc).__name__}: {exc}): "
                          f"{HOW}") from None
    if kind == pafs.FileType.File:
        parent, _ = split_uri(run.uri)
        return RunDir(parent), posixpath.basename(run.root)
    if kind == pafs.FileType.Directory:
        for rel in (WEIGHTS, f"l2o/{WEIGHTS}"):
            if run.exists(rel):
                return run, rel
        raise ConfigError(f"learned-optimizer weights {uri!r}: the directory holds neither {WEIGHTS} nor "
                          f"l2o/{WEIGHTS}: {HOW}")
    raise ConfigError(f"learned-optimizer weights {uri!r}: no such file or directory: {HOW}")


def save_learned_optimizer(uri: str, config: LearnedOptimizerConfig, params: Dict[str, torch.Tensor]) -> str:
    """Write φ and its config atomically to the file ``uri`` (a path or URI ending in the file name).

    Returns:
        The file's sha256.
    """
    from raysub.storage import RunDir, split_uri

    problems = check_params(config, params)
    assert not problems, problems  # our own φ: a bad one is a bug, not a user error
    parent, name = split_uri(uri)
    return RunDir(parent).write_torch(name, {"config": config.to_dict(),
                                             "params": {k: v.detach().cpu().clone() for k, v in params.items()}})


def load_learned_optimizer(uri: str, *, hidden_size: Optional[int] = None,
                           features: Optional[Sequence[str]] = None
                           ) -> Tuple[LearnedOptimizerConfig, Dict[str, torch.Tensor]]:
    """φ and its config from ``uri``, checked against what the caller expects.

    Args:
        uri: The weights file, or a directory holding ``weights.pt`` or ``l2o/weights.pt``.
        hidden_size, features: The caller's expectation (None: any).

    Raises:
        ConfigError: one line — no weights there, not a weights file, or a config that differs from the
            expectation.
    """
    run, rel = _locate(uri)
    try:
        blob = run.read_torch(rel)
    except ConfigError:
        raise
    except Exception as exc:  # not a torch file, or one with objects weights_only refuses
        raise ConfigError(f"learned-optimizer weights {uri!r} cannot be read ({type(exc).__name__}): {HOW}"
                          ) from None
    if not (isinstance(blob, dict) and isinstance(blob.get("config"), dict) and isinstance(blob.get("params"), dict)):
        raise ConfigError(f"learned-optimizer weights {uri!r} is not a weights file (expected a mapping with "
                          f"'config' and 'params'): {HOW}")
    try:
        config = LearnedOptimizerConfig.from_dict(blob["config"])
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"learned-optimizer weights {uri!r} has a bad config ({exc}): {HOW}") from None
    problems = check_params(config, blob["params"])
    if problems:
        raise ConfigError(f"learned-optimizer weights {uri!r} do not match their config ({'; '.join(problems)}): "
                          f"{HOW}")
    mismatch = expectation_problems(config, hidden_size, features)
    if mismatch:
        raise ConfigError(f"learned-optimizer weights {uri!r} were meta-trained with {' and '.join(mismatch)}: "
                          f"use weights meta-trained with the expected settings, or change the expectation")
    return config, dict(blob["params"])


def weights_problems(uri: str, *, hidden_size: Optional[int] = None,
                     features: Optional[Sequence[str]] = None) -> List[str]:
    """`load_learned_optimizer`'s error as a list of problems (empty: the weights load and match)."""
    try:
        load_learned_optimizer(uri, hidden_size=hidden_size, features=features)
    except ConfigError as exc:
        return list(exc.problems)
    return []
