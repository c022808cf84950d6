"""A run's committed basis, read through the run-directory service: where it is (`basis_dir`), its spectrum
record (`read_spectrum`) and the D×N matrix (`load_basis`), each verified against the manifest's checksums.

Written by the basis stage (`raysub.pipeline.basis`) and by the sampling ranks; read by the DLDR projection
(`raysub.projections.dldr`) and the benchmarks.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from raysub.errors import ConfigError, StorageError
from raysub.runs import layout
from raysub.runs.manifest import Manifest
from raysub.storage import RunDir, decode_columns


def read_num_params(run: RunDir) -> Optional[int]:
    """The number of trainable parameters the run's manifest records (None without a manifest or the key)."""
    return Manifest.peek(run).num_params


def basis_dir(run: RunDir) -> Optional[str]:
    """The directory of the run's committed basis, or None when it has none.

    ``raysub basis`` writes each basis into a new directory ``basis/GEN/`` and commits it by naming it in the
    manifest (``stages.basis.dir``), so a rebuild killed half-way leaves the previous basis in force. Runs written
    before generations keep theirs in ``basis/``.
    """
    stage = Manifest.peek(run).stages.get("basis", {})
    if stage.get("complete") and stage.get("dir"):
        return stage["dir"]
    return layout.BASIS if run.exists(layout.spectrum(layout.BASIS)) else None


def read_spectrum(run: RunDir) -> Optional[Dict[str, Any]]:
    """The committed basis's spectrum record (verified against the manifest), or None when there is no basis."""
    where = basis_dir(run)
    if where is None:
        return None
    shards = Manifest.peek(run).shards
    return run.read_json(layout.spectrum(where), shards.get(layout.spectrum(where)))


def load_basis(run_uri: str, dim: Optional[int] = None, rows: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """The D×N basis (leading ``dim`` components) of a run, checked against the manifest's checksums.

    With ``rows`` = (start, stop): only those parameter rows (D × (stop − start)), reading only the stored blocks
    that overlap them — a sharded worker's share (`raysub.engine.sharded`). When the training's slices are the
    stored blocks (as many slices as the sampling run had ranks: `raysub.storage.block_bounds` both), a rank reads
    exactly its block; otherwise it reads each overlapping block whole (every block is verified against its
    checksum, so no partial read) and keeps its rows.

    Raises:
        ConfigError/StorageError: no basis yet, ``dim`` above the stored one, or a corrupted shard.
    """
    run = RunDir(run_uri) if isinstance(run_uri, str) else run_uri
    spec = read_spectrum(run)
    if spec is None:
        raise StorageError(f"{run.uri} has no basis: run 'raysub basis {run.uri}' first")
    dim = spec["dim"] if dim is None else dim
    if dim > spec["dim"]:
        raise ConfigError(f"train.dim={dim} exceeds the {spec['dim']} components stored in {run.path(layout.BASIS)}: "
                          f"rebuild with 'raysub basis {run.uri} basis.dim={dim} --overwrite'")
    sums = Manifest.peek(run).shards
    parts = []
    for b in spec["blocks"]:
        if rows is not None and (b["stop"] <= rows[0] or b["start"] >= rows[1]):
            continue
        cols = decode_columns(run.read_bytes(b["path"], sums.get(b["path"], b["sha256"])), dim)
        if rows is not None:  # this block's share of the rows
            cols = cols[:, max(rows[0], b["start"]) - b["start"] : min(rows[1], b["stop"]) - b["start"]]
        parts.append(cols)
    return np.concatenate(parts, axis=1) if len(parts) != 1 else parts[0]
