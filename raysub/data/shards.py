"""WebDataset-style tar shards: where each sample's image lies in its shard, so any sample can be read alone.

A split is a folder of uncompressed ``.tar`` shards (``root/train/*.tar``, ``root/val/*.tar``), as WebDataset writes
them: a sample is the run of consecutive members that share a key (the member's path up to the first dot of its
file name), with one image (``KEY.jpg``, ``.jpeg``, ``.png``, ...) and its class index as decimal text (``KEY.cls``).
Samples are numbered in shard order (shards sorted by path), then in their order inside the shard: a tree packed in
ImageFolder order numbers its samples as the tree does.

raysub's loops pick each rank's examples, in their order, from a seeded permutation of the whole split (as for an
ImageFolder tree), so a decode task reads single images at random: `index_shard` reads a shard's headers once
(Python's ``tarfile``: seeking from header to header on a local disk, one sequential read of the object from an
object store; no image is decoded) and records each image's byte range; a
decode task then reads that range alone. The index of a shard is kept in this process and in a file per shard under
``RAYSUB_CACHE_DIR`` (``~/.cache/raysub`` by default), keyed by the shard's URI, size and modification time, so the
processes of a node read each shard once. Ray Data's ``read_webdataset`` streams shards whole, in shard order: it
cannot give one rank the samples of a permutation, nor restart at a checkpoint's step.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import posixpath
import sys
import tarfile
import threading
import time
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

SUFFIX = ".tar"
COMPRESSED = (".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz")
INDEX_THREADS = 8  # shards indexed at once (each a sequential read: an object store streams many in parallel)
SAY_EVERY_S = 10.0  # progress line while indexing takes longer than this


class Member(NamedTuple):
    """Where one sample's image lies: ``size`` bytes at ``offset`` of the shard at ``shard`` (the filesystem's path);
    ``name`` is the image's member name (for messages)."""
    shard: str
    offset: int
    size: int
    name: str


class ShardError(ValueError):
    """A shard that cannot be indexed: the message names the member and what is wrong, in one line."""


def split_key(name: str) -> Tuple[str, str]:
    """WebDataset's (key, extension) of a member: ``a/b.c.d`` -> (``a/b``, ``c.d``), the extension lower-cased."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower() if dot else ""


def list_shards(fs, top: str):
    """(FileInfo of each ``.tar`` directly in ``top``, sorted by path; paths of the compressed tars there), both
    empty when ``top`` has sub-folders: an ImageFolder split (a class archive left beside its extracted folder
    does not make it a split of shards)."""
    import pyarrow.fs as pafs

    entries = fs.get_file_info(pafs.FileSelector(top, recursive=False))
    if any(e.type == pafs.FileType.Directory for e in entries):
        return [], []
    files = [e for e in entries if e.type == pafs.FileType.File]
    tars = sorted((e for e in files if e.base_name.lower().endswith(SUFFIX)), key=lambda e: e.path)
    compressed = sorted(e.path for e in files if e.base_name.lower().endswith(COMPRESSED))
    return tars, compressed


def _members(fs, path: str):
    """(tar, its members) of one shard: a local file is opened seekable (only the headers are read), a stream
    from an object store is read once from start to end."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        tar = tarfile.open(path, mode="r:")
        return tar, tar
    stream = fs.open_input_stream(path)
    tar = tarfile.open(fileobj=stream, mode="r|")
    return tar, tar


def index_shard(fs, info, image_exts: Sequence[str]) -> List[Tuple[Member, int]]:
    """``[(Member, label), ...]`` of one shard (its headers, or the object once from start to end: `_members`).

    Raises:
        ShardError: a sample without an image or a ``.cls``, with two images, a ``.cls`` that is not an integer
            >= 0, a key that comes back after other samples, or a file that is not a tar.
        OSError: the storage failed.
    """
    exts = {e.lstrip(".").lower() for e in image_exts}
    out: List[Tuple[Member, int]] = []
    seen = set()
    key, image, label = None, None, None

    def close():
        if key is None:
            return
        if image is None or label is None:
            lacks = "image (" + ", ".join(sorted(exts)) + ")" if image is None else ".cls class index"
            raise ShardError(f"sample {key!r} has no {lacks}")
        out.append((Member(info.path, image[0], image[1], image[2]), label))

    try:
        tar, members = _members(fs, info.path)
        with tar:
            for m in members:
                if not m.isfile():
                    continue
                k, ext = split_key(m.name)
                if k != key:
                    close()
                    if k in seen:
                        raise ShardError(f"key {k!r} comes back after other samples (a sample's members must be "
                                         f"consecutive)")
                    seen.add(k)
                    key, image, label = k, None, None
                if ext in exts:
                    if image is not None:
                        raise ShardError(f"sample {k!r} has two images ({image[2]}, {m.name})")
                    image = (m.offset_data, m.size, m.name)
                elif ext == "cls":
                    text = tar.extractfile(m).read().decode("utf-8", "replace").strip()
                    if not (text.isascii() and text.isdigit()):
                        raise ShardError(f"{m.name}: class index {text[:20]!r} is not an integer >= 0")
                    label = int(text)
            close()
    except tarfile.TarError as e:
        raise ShardError(f"not a readable tar ({type(e).__name__}: {e})") from None
    return out


def cache_dir() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("RAYSUB_CACHE_DIR") or "~/.cache/raysub"), "shard-index")


def _cache_file(uri: str, info) -> str:
    mtime = getattr(info, "mtime_ns", None)
    key = hashlib.sha256(f"{uri}|{info.size}|{mtime}".encode()).hexdigest()[:32]
    return os.path.join(cache_dir(), key + ".npz")


def _load(path: str, info) -> List[Tuple[Member, int]]:
    with np.load(path, allow_pickle=False) as z:
        return [(Member(info.path, int(o), int(s), str(n)), int(t))
                for o, s, n, t in zip(z["offset"], z["size"], z["name"], z["label"])]


def _store(path: str, members: List[Tuple[Member, int]]) -> None:
    """Atomically (a reader sees the whole index or none); a cache that cannot be written is skipped."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, offset=np.array([m.offset for m, _ in members], dtype=np.int64),
                 size=np.array([m.size for m, _ in members], dtype=np.int64),
                 name=np.array([m.name for m, _ in members], dtype=str),
                 label=np.array([t for _, t in members], dtype=np.int64))
        os.replace(tmp, path)
    except OSError:
        pass


_INDEXED: Dict[Tuple[str, int, object], List[Tuple[Member, int]]] = {}  # this process's: (uri, size, mtime)


def index_shards(fs, infos, uri_of, image_exts: Sequence[str]) -> List[Tuple[Member, int]]:
    """The samples of ``infos``' shards in order, each shard from this process's index, the node's cache file or
    one read (``INDEX_THREADS`` at a time). ``uri_of(path)`` is a shard's URI (the cache key and the messages).

    Raises:
        ShardError: the first bad shard's problem, with its URI.
    """
    todo = [i for i in infos if (uri_of(i.path), i.size, getattr(i, "mtime_ns", None)) not in _INDEXED]
    t0 = said = time.monotonic()
    done = 0

    def one(info):
        path = _cache_file(uri_of(info.path), info)
        try:
            return _load(path, info)
        except (OSError, ValueError, KeyError):
            pass
        try:
            members = index_shard(fs, info, image_exts)
        except ShardError as e:
            raise ShardError(f"bad shard {uri_of(info.path)}: {e}; fix or rewrite the shard") from None
        _store(path, members)
        return members

    if todo:
        with concurrent.futures.ThreadPoolExecutor(min(INDEX_THREADS, len(todo))) as pool:
            futures = {pool.submit(one, i): i for i in todo}
            for future in concurrent.futures.as_completed(futures):
                info = futures[future]
                if future.exception() is not None:  # the first bad shard says so now, not after every other read
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise future.exception()
                _INDEXED[(uri_of(info.path), info.size, getattr(info, "mtime_ns", None))] = future.result()
                done += 1
                if time.monotonic() - said > SAY_EVERY_S:
                    said = time.monotonic()
                    print(f"[data] indexed {done:,}/{len(todo):,} shards in {said - t0:.0f} s", file=sys.stderr,
                          flush=True)
    return [s for i in infos for s in _INDEXED[(uri_of(i.path), i.size, getattr(i, "mtime_ns", None))]]


class Reader:
    """Reads single images from shards, for one decode task: each shard is opened once (one metadata request on an
    object store) and read by range from any number of threads (Arrow's ``read_at`` is thread-safe)."""

    def __init__(self, fs):
        self.fs, self.files, self.lock = fs, {}, threading.Lock()

    def __call__(self, member: Member) -> bytes:
        f = self.files.get(member.shard)
        if f is None:  # opened outside the lock (an object store's open is a request); the first one kept
            mine = self.fs.open_input_file(member.shard)
            with self.lock:
                f = self.files.setdefault(member.shard, mine)
            if f is not mine:
                mine.close()
        return f.read_at(member.size, member.offset)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()
