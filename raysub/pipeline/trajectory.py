"""The sampled trajectory on disk: each rank writes its block's snapshots and index, and every reader gets them
back verified.

Layout: ``trajectory/block_BBB/snap_SSSSS.arrow`` (rank B's slice of snapshot S, float32) and
``trajectory/block_BBB/index.json`` (the block's snapshots with their sha256), whose digests the manifest holds.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List

import torch

from raysub.errors import StorageError
from raysub.runs.layout import CONFIG, TRAJECTORY  # (the module's name `layout` is the manifest's blocks here)
from raysub.checksums import checksum
from raysub.storage import RunDir, block_index_rel, encode_vector, snapshot_rel


def write_snapshot(run: RunDir, flat_N: torch.Tensor, block: int, bounds, snap: int, step: int, epoch: int,
                   index: List[Dict[str, Any]]) -> str:
    """Write block ``block`` of the flat vector as snapshot ``snap`` and rewrite the block's index; returns the
    index's sha256.

    ``index`` is this block's snapshot list; entries from ``snap`` on are replaced (a resumed run rewrites them).
    """
    start, stop = bounds[block]
    values = flat_N[start:stop].detach().to("cpu", torch.float32).numpy()
    rel = snapshot_rel(block, snap)
    checksum = run.write_bytes(rel, encode_vector(values, {"snapshot": snap, "step": step, "block": block}))
    del index[snap:]
    index.append({"snapshot": snap, "step": step, "epoch": epoch, "path": rel, "sha256": checksum})
    return write_index(run, block, bounds, index)


def write_index(run: RunDir, block: int, bounds, index: List[Dict[str, Any]]) -> str:
    """Write block ``block``'s index of snapshots; returns its sha256 (which the driver commits)."""
    start, stop = bounds[block]
    return run.write_json(block_index_rel(block), {"block": block, "start": start, "stop": stop, "snapshots": index})


def collect_trajectory(run: RunDir, shards=None, layout=None):
    """Read every block's index (verified against ``shards``, the manifest's checksums, when given); check all
    blocks hold the same snapshots. Returns (blocks, {path: sha256} of every snapshot and index).

    With ``shards`` the blocks are those the manifest lists — ``layout`` (its ``blocks``: block, start, stop)
    and its ``trajectory/block_BBB/index.json`` entries — never just the directories that happen to exist: each
    must be there with every snapshot its index names (checked by listing, before a snapshot is read), a
    directory the manifest does not list is refused, and the blocks must be the layout's (without one: cover
    the parameter vector from 0 without a gap). Without ``shards`` the blocks are the directories (the
    sampler, right after writing them).

    Raises:
        StorageError: a listed block or snapshot missing; an index missing from the manifest, corrupted, not
            valid JSON or not a block index; blocks that disagree, leave a gap or differ from the layout.
    """
    resample = f"resample with 'raysub sample {run.arg(CONFIG)} --overwrite'"
    present = [d for d in run.listdir(TRAJECTORY) if d.startswith("block_")]
    names = present
    if shards is not None:  # an unlisted directory among them is refused below: its index has no checksum
        listed = {rel.split("/")[1] for rel in shards if re.fullmatch(rf"{TRAJECTORY}/block_\d+/index\.json", rel)}
        listed |= {f"block_{b['block']:03d}" for b in layout or ()}
        names = sorted(listed | set(present))
    if not names:
        raise StorageError(f"{run.path(TRAJECTORY)} holds no trajectory blocks: run 'raysub sample' (or resample "
                           f"with --overwrite)")
    blocks, sums = [], {}
    for d in names:
        if d not in present:
            raise StorageError(f"{run.path(TRAJECTORY, d)} is missing, one of the {len(names)} trajectory blocks "
                               f"the manifest lists: restore it, or {resample}")
        rel = f"{TRAJECTORY}/{d}/index.json"
        if shards is not None and rel not in shards:
            raise StorageError(f"{run.path(rel)} has no checksum in the manifest: resample with --overwrite")
        index = run.read_json(rel, None if shards is None else shards[rel])
        if not (isinstance(index, dict) and isinstance(index.get("snapshots"), list)
                and all(k in index for k in ("block", "start", "stop"))):
            raise StorageError(f"{run.path(rel)} is not a trajectory block index (block, start, stop, snapshots): "
                               f"resample with --overwrite")
        if shards is not None:
            files = {f"{TRAJECTORY}/{d}/{name}" for name in run.listdir(TRAJECTORY, d)}
            gone = [s["path"] for s in index["snapshots"] if s["path"] not in files]
            if gone:
                raise StorageError(f"{run.path(gone[0])} is missing ({len(gone)} of the {len(index['snapshots'])} "
                                   f"snapshots of {d}): restore it, or {resample}")
        sums[rel] = shards[rel] if shards is not None else checksum(run.read_bytes(rel))
        blocks.append(index)
    counts = {len(b["snapshots"]) for b in blocks}
    if len(counts) != 1:
        raise StorageError(f"trajectory blocks in {run.path(TRAJECTORY)} disagree on the number of snapshots "
                           f"{sorted(counts)}: resample with --overwrite")
    if shards is not None:
        edge = 0
        for i, b in enumerate(sorted(blocks, key=lambda b: b["block"])):
            want = layout[i] if layout is not None and i < len(layout) else {"block": i, "start": edge}
            if any(b[k] != v for k, v in want.items() if k in ("block", "start", "stop")):
                raise StorageError(f"the trajectory blocks the manifest of {run.uri} lists do not cover the parameter "
                                   f"vector as its layout does (block {i}, from coordinate {edge}): {resample}")
            edge = b["stop"]
        if layout is not None and len(blocks) != len(layout):
            raise StorageError(f"the manifest of {run.uri} lays the parameters out in {len(layout)} blocks but lists "
                               f"{len(blocks)} trajectory blocks: {resample}")
    sums.update({s["path"]: s["sha256"] for b in blocks for s in b["snapshots"]})
    return blocks, sums
