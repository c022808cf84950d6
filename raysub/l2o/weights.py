"""φ on disk: ``weights.pt`` = {"config": LearnedOptimizerConfig.to_dict(), "params": {name: tensor}, "sha256":
`content_digest` of the two}, read and written through the run-directory storage (`raysub.storage.RunDir`), so a
local path and a URI work alike.

``uri`` names the file itself, or a directory holding ``weights.pt`` or ``l2o/weights.pt``. Every read is
verified: against the meta-training run's manifest (``raysub l2o meta-train``: the committed generation's
weights, `raysub.l2o.layout.state_files`, which ``RUN`` and ``RUN/l2o/weights.pt`` both resolve to), against
``l2o_tune/results.json`` (``raysub l2o tune``'s best φ), and always against the digest stored in the file (a copy
anywhere else is checked too). Every failure is one `ConfigError` line naming the input and what to do.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow.fs as pafs
import torch

from raysub.errors import ConfigError, StorageError
from raysub.l2o.layout import WEIGHTS as RUN_WEIGHTS, state_files
from raysub.l2o.lstm import SCHEDULE_KNOTS, LearnedOptimizerConfig, check_params, expectation_problems
from raysub.runs.layout import L2O_TUNE_RESULTS, MANIFEST
from raysub.runs.manifest import Manifest
from raysub.checksums import matches
from raysub.storage import RunDir, split_uri

WEIGHTS = "weights.pt"
HOW = "give the weights.pt that `raysub l2o meta-train` writes (RUN/l2o/weights.pt), or a path/URI to it"
TUNE_RESULTS = L2O_TUNE_RESULTS  # `raysub l2o tune`: records the sha256 of its RUN/l2o/weights.pt


def content_digest(config: Dict, params: Dict[str, torch.Tensor]) -> str:
    """sha256 of φ's config and tensors (names, dtypes, shapes, bytes): stored in the file, so a copy of
    ``weights.pt`` anywhere verifies on its own."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(params):
        t = params[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _recorded(run, rel: str) -> Tuple[str, Optional[str], Optional[str]]:
    """(the file to read, its recorded sha256, the record) for ``rel`` in ``run`` when a record there names it;
    (``rel``, None, None) otherwise. A meta-training run's ``l2o/weights.pt`` (and its directory) is its committed generation's."""
    try:
        if run.exists(MANIFEST):
            manifest = Manifest.peek(run)
            if rel == RUN_WEIGHTS:
                rel = state_files(manifest).get(WEIGHTS, rel)
            return rel, manifest.shards.get(rel), run.path(MANIFEST)
        if run.exists(TUNE_RESULTS) and rel == f"l2o/{WEIGHTS}":
            best = run.read_json(TUNE_RESULTS).get("best") or {}
            return rel, best.get("weights_sha256"), run.path(TUNE_RESULTS)
    except StorageError as exc:
        raise ConfigError(f"learned-optimizer weights in {run.uri}: its record cannot be read ({exc})") from None
    return rel, None, None


def _locate(uri: str):
    """(RunDir, relative name, recorded sha256 or None, the record) of the weights file ``uri`` names; raises
    ConfigError when there is none."""
    try:
        run = RunDir(uri)
        kind = run.fs.get_file_info(run.root).type
    except Exception as exc:  # an unknown scheme, unreachable storage
        raise ConfigError(f"learned-optimizer weights {uri!r} cannot be opened ({type(exc).__name__}: {exc}): "
                          f"{HOW}") from None
    if kind == pafs.FileType.Directory:
        for rel in (WEIGHTS, f"l2o/{WEIGHTS}"):
            found, checksum, record = _recorded(run, rel)
            if run.exists(found):
                return run, found, checksum, record
        raise ConfigError(f"learned-optimizer weights {uri!r}: the directory holds neither {WEIGHTS} nor "
                          f"l2o/{WEIGHTS}: {HOW}")
    # a file: its record is the run it lies in (RUN/l2o/weights.pt, RUN/l2o/ckpt/GEN/weights.pt)
    parent, name = split_uri(run.uri)
    parts = [name]
    for _ in range(3):
        parent, last = split_uri(parent)
        parts.insert(0, last)
        if last == "l2o":
            owner = RunDir(parent)
            found, checksum, record = _recorded(owner, "/".join(parts))
            if checksum is not None and owner.exists(found):
                return owner, found, checksum, record
            break
    if kind == pafs.FileType.File:
        parent, _ = split_uri(run.uri)
        return RunDir(parent), posixpath.basename(run.root), None, None
    raise ConfigError(f"learned-optimizer weights {uri!r}: no such file or directory: {HOW}")


def weights_run(uri: str) -> Optional[str]:
    """The URI of the meta-training (or tuning) run whose record vouches for the weights ``uri`` names (RUN, RUN/l2o/
    weights.pt or RUN/l2o/ckpt/GEN/weights.pt; a run that is itself named ``l2o`` included), or None for a copy no
    run records. Raises ConfigError when ``uri`` names no weights."""
    run, _, _, record = _locate(uri)
    return run.uri if record is not None else None


def save_learned_optimizer(uri: str, config: LearnedOptimizerConfig, params: Dict[str, torch.Tensor]) -> str:
    """Write φ and its config atomically to the file ``uri`` (a path or URI ending in the file name).

    Returns:
        The file's sha256.
    """
    problems = check_params(config, params)
    assert not problems, problems  # our own φ: a bad one is a bug, not a user error
    parent, name = split_uri(uri)
    params = {k: v.detach().cpu().clone() for k, v in params.items()}
    return RunDir(parent).write_torch(name, {"config": config.to_dict(), "params": params,
                                             "sha256": content_digest(config.to_dict(), params)})


def load_learned_optimizer(uri: str, *, hidden_size: Optional[int] = None,
                           features: Optional[Sequence[str]] = None
                           ) -> Tuple[LearnedOptimizerConfig, Dict[str, torch.Tensor]]:
    """φ and its config from ``uri``, checked against what the caller expects.

    Args:
        uri: The weights file, or a directory holding ``weights.pt`` or ``l2o/weights.pt``.
        hidden_size, features: The caller's expectation (None: any).

    Raises:
        ConfigError: one line — no weights there, bytes that differ from their record (the run's manifest, the
            tuning's results.json, the digest stored in the file), not a weights file, or a config that differs
            from the expectation.
    """
    run, rel, checksum, record = _locate(uri)
    try:
        data = run.read_bytes(rel).to_pybytes()
    except StorageError as exc:  # gone since it was located
        raise ConfigError(f"learned-optimizer weights {uri!r}: {exc.problems[0]}") from None
    if checksum is not None and not matches(data, checksum):
        raise ConfigError(f"learned-optimizer weights {uri!r} are corrupted: {run.path(rel)} does not match the "
                          f"sha256 in {record}: restore the run directory, or meta-train again")
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one with objects weights_only refuses
        raise ConfigError(f"learned-optimizer weights {uri!r} cannot be read ({type(exc).__name__}): {HOW}"
                          ) from None
    if not (isinstance(blob, dict) and isinstance(blob.get("config"), dict) and isinstance(blob.get("params"), dict)):
        raise ConfigError(f"learned-optimizer weights {uri!r} is not a weights file (expected a mapping with "
                          f"'config' and 'params'): {HOW}")
    stored = blob.get("sha256")  # absent in files written before it was stored (their run's record checks them)
    tensors = all(isinstance(v, torch.Tensor) for v in blob["params"].values())  # else check_params says so
    if stored is not None and tensors and stored != content_digest(blob["config"], blob["params"]):
        raise ConfigError(f"learned-optimizer weights {uri!r} are corrupted (their content does not match the "
                          f"sha256 stored with them): meta-train them again, or use an intact copy")
    try:
        config = LearnedOptimizerConfig.from_dict(blob["config"])
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"learned-optimizer weights {uri!r} has a bad config ({exc}): {HOW}") from None
    params = dict(blob["params"])
    if config.rule == "adam_schedule" and "sched.weight" not in params:  # written before the learned schedule: flat
        params["sched.weight"] = torch.zeros(len(SCHEDULE_KNOTS))
    problems = check_params(config, params)
    if problems:
        raise ConfigError(f"learned-optimizer weights {uri!r} do not match their config ({'; '.join(problems)}): "
                          f"{HOW}")
    mismatch = expectation_problems(config, hidden_size, features)
    if mismatch:
        raise ConfigError(f"learned-optimizer weights {uri!r} were meta-trained with {' and '.join(mismatch)}: "
                          f"use weights meta-trained with the expected settings, or change the expectation")
    return config, params


def weights_problems(uri: str, *, hidden_size: Optional[int] = None,
                     features: Optional[Sequence[str]] = None) -> List[str]:
    """`load_learned_optimizer`'s error as a list of problems (empty: the weights load and match)."""
    try:
        load_learned_optimizer(uri, hidden_size=hidden_size, features=features)
    except ConfigError as exc:
        return list(exc.problems)
    return []
