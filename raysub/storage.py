"""Run directories on any `pyarrow.fs` filesystem: atomic writes, Arrow shards with checksums, the manifest.

A run directory is a local path or a URI (``s3://bucket/run``, ``gs://...``) that every node can reach; how a URI
is read — endpoint, credentials, timeouts — is `raysub.uri`'s. A run directory needs a bucket and a path inside it.

Files are written under a temporary name and renamed, so a reader never sees half a file. Every shard's checksum
goes into ``manifest.json`` as ``ALGO:HEX`` (XXH3-128 now; a bare hex digest is an older run's sha256, still
verified as such); readers verify it.

Layout::

    RUN/config.yaml            resolved config
    RUN/manifest.json          versions, git revision, device, world size, stage timings, layout, shards
    RUN/theta0.pt              initial state_dict (parameters and buffers) of the seeded model
    RUN/model.pt               state_dict of the model when the SGD run ends ('train.init_from' of another run)
    RUN/trajectory/block_BBB/snap_SSSSS.arrow   rank B's slice of snapshot S (float32, column "v")
    RUN/trajectory/block_BBB/index.json         the block's snapshots with checksums (written by rank B)
    RUN/basis/block_BBB.arrow  U_b: one float32 column per component (rows = coordinates of block B)
    RUN/basis/spectrum.json    eigenvalues, singular values, explained-variance ratio of every component
    RUN/summary.json, RUN/plots/*.png, RUN/checkpoints/ (Ray Train)
    RUN/raysub.lock            the running command's lock (raysub.lock)

JSON is written strictly (RFC 8259): a non-finite float is written as null, never as a bare NaN/Infinity.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import posixpath
import shlex
import sys
import threading
import time
import uuid
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from raysub import credentials
from raysub.checksums import CHECKSUM, algorithm_of, checksum, hasher, matches
from raysub.errors import StorageError
# re-exported: ~30 importers take the URI helpers from here, beside RunDir
from raysub.uri import (  # noqa: F401  re-exported: the URI helpers' old home
    BUCKET_SCHEMES,
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    TRIES,
    StorageTimeout,
    first_line,
    join_uri,
    open_uri,
    redact,
    split_uri,
    storage_timeout,
    timed_out,
)


LOCK = "raysub.lock"  # the lock file of a running command (raysub.lock); not part of a run's contents
def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, so it serialises as strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


class _HashingSink:
    """A file-like sink that hashes what it forwards (so a streamed shard needs no second read)."""

    def __init__(self, out):
        self.out = out
        self.hash = hasher(CHECKSUM)
        self.sha256: Optional[str] = None  # the digest on exit (``ALGO:HEX``; the name is kept for callers)
        self.closed = False
        self.pos = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.out.write(view)
        self.pos += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


_watching = threading.local()  # a storage call in progress on this thread (nested calls are its own)


class RunDir:
    """A run directory on a pyarrow filesystem.

    Args:
        uri: Local path (made absolute) or filesystem URI.
    """

    def __init__(self, uri: str):
        if "://" not in uri:
            uri = os.path.abspath(os.path.expanduser(uri))
        else:
            uri = credentials.clean(uri)
            scheme, _, rest = uri.partition("://")
            if scheme.lower() in BUCKET_SCHEMES and not rest.split("?", 1)[0].split("/", 1)[0]:
                raise StorageError(f"storage URI {uri} names no bucket: write {scheme}://BUCKET/PATH "
                                   f"(e.g. run_dir={scheme}://my-bucket/runs/NAME)")
        self.uri = uri
        try:
            self.fs, self.root = open_uri(uri)
        except (OSError, ValueError) as exc:  # an unknown scheme, a malformed query, an unresolvable region
            raise StorageError(f"run directory {redact(uri)} cannot be opened: {first_line(exc)}; check the URI "
                               f"(scheme://bucket/path[?endpoint_override=HOST:PORT&scheme=http&region=R])") from None
        self._remote = not isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, *parts: str) -> "RunDir":
        """The run directory ``parts`` below this one, on the same storage (its query kept)."""
        return RunDir(join_uri(self.uri, *parts))

    def arg(self, *parts: str) -> str:
        """The path or URI of ``parts`` in this run, quoted for a shell command line (a URI's query has ``&``)."""
        return shlex.quote(join_uri(self.uri, *parts) if parts else self.uri)

    def probe(self) -> "pafs.FileInfo":
        """What the storage holds at the root (one request): the check that the storage is reachable and we are
        allowed in, made before Ray starts.

        Raises:
            StorageError: the URI is a bucket root (a run needs a directory of its own: the lock's cleanup and
                ``--overwrite`` act on all of it), the endpoint is unreachable or does not answer in time, the
                bucket is missing, or the credentials are refused.
        """
        scheme = self.uri.partition("://")[0] if "://" in self.uri else ""
        bucket, _, key = self.root.strip("/").partition("/")
        if scheme.lower() in BUCKET_SCHEMES and not key:
            raise StorageError(f"run directory {redact(self.uri)} is a bucket root: a run needs a directory of its "
                               f"own (its lock, --overwrite and cleanup act on all of it); write "
                               f"{scheme}://{bucket}/NAME")
        t0 = time.monotonic()
        try:
            return self.fs.get_file_info(self.root)
        except OSError as exc:
            if timed_out(exc):
                timeout = storage_timeout()
                raise StorageError(f"run directory {redact(self.uri)} cannot be reached: the storage did not answer "
                                   f"within {timeout:g} s ({TRIES} tries, gave up after {time.monotonic() - t0:.0f} "
                                   f"s); check that the endpoint (AWS_ENDPOINT_URL_S3, or ?endpoint_override= in the "
                                   f"URI) is up and reachable, or raise {TIMEOUT_ENV}") from None
            raise StorageError(f"run directory {redact(self.uri)} cannot be reached: {first_line(exc)}; check the "
                               f"endpoint (AWS_ENDPOINT_URL_S3, or ?endpoint_override= in the URI), the bucket and "
                               f"the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)") from None

    @contextlib.contextmanager
    def _call(self, op: str, rel: str = ""):
        """Watch one storage call on object storage: a line once it has waited one timeout, a `StorageTimeout`
        naming the storage, the operation and the timeout when it gives up."""
        if not self._remote or getattr(_watching, "active", False):
            yield
            return
        timeout = storage_timeout()
        what = f"{op} {rel}".strip()
        t0 = time.monotonic()
        timer = threading.Timer(timeout, lambda: print(
            f"raysub: storage {redact(self.uri)} has not answered for {timeout:g} s ({what}); waiting (it gives up "
            f"after {TRIES} tries; {TIMEOUT_ENV})", file=sys.stderr, flush=True))
        timer.daemon = True
        _watching.active = True
        timer.start()
        try:
            yield
        except OSError as exc:
            if isinstance(exc, StorageTimeout) or not timed_out(exc):
                raise
            raise StorageTimeout(f"storage {redact(self.uri)} did not answer within {timeout:g} s ({what}: {TRIES} "
                                 f"tries, gave up after {time.monotonic() - t0:.0f} s): check that the endpoint is up "
                                 f"and reachable, or raise {TIMEOUT_ENV}") from exc
        finally:
            timer.cancel()
            _watching.active = False

    # -- paths --------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        with self._call("exists", posixpath.join(*parts) if parts else ""):
            return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_nonempty(self) -> bool:
        """Whether the directory holds anything besides a lock."""
        return any(name != LOCK for name in self.listdir())

    def clear(self) -> None:
        """Delete everything in the directory except the lock (``--overwrite`` under the lock)."""
        for name in self.listdir():
            if name != LOCK:
                self.delete(name)

    def makedirs(self, *parts: str) -> None:
        with self._call("makedirs", posixpath.join(*parts) if parts else ""):
            self.fs.create_dir(self.path(*parts), recursive=True)

    def delete(self, *parts: str) -> None:
        with self._call("delete", posixpath.join(*parts) if parts else ""):
            info = self.fs.get_file_info(self.path(*parts))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(*parts))
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.path(*parts))

    def listdir(self, *parts: str):
        with self._call("list", posixpath.join(*parts) if parts else ""):
            if not self.exists(*parts):
                return []
            sel = pafs.FileSelector(self.path(*parts), recursive=False)
            return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel))

    def ray_storage(self, rel: str) -> Tuple[str, Optional[pafs.FileSystem]]:
        """``(storage_path, storage_filesystem)`` for a Ray Train/Tune RunConfig keeping its files under ``rel``:
        a local path alone, or the path inside this run's filesystem together with the filesystem object, so an
        endpoint or region given in the URI's query reaches Ray (a concatenated URI string would lose it)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return self.path(rel), None
        return self.path(rel), self.fs

    # -- bytes, text, json --------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data) -> str:
        """Atomically write ``data`` to ``rel``; returns its checksum (`checksum`)."""
        target = self.path(rel)
        with self._call("write", rel):
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, target)
        return checksum(data)

    @contextlib.contextmanager
    def open_writer(self, rel: str):
        """Stream a file to ``rel`` atomically; yields a sink with ``write``; ``sink.sha256`` is set on exit."""
        target = self.path(rel)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        out = self.fs.open_output_stream(tmp)
        sink = _HashingSink(out)
        try:
            yield sink
            out.close()
            self.fs.move(tmp, target)
        except BaseException:
            out.close()
            self.fs.delete_file(tmp)
            raise
        sink.sha256 = sink.hash.hexdigest() if CHECKSUM == "sha256" else f"{CHECKSUM}:{sink.hash.hexdigest()}"

    def read_bytes(self, rel: str, checksum: Optional[str] = None) -> pa.Buffer:
        """Read ``rel``; verify its checksum when ``checksum`` is given (in the algorithm the digest names).

        Raises:
            StorageError: missing file or checksum mismatch.
        """
        with self._call("read", rel):
            try:
                # a random-access file knows its size: one read, not a loop of 256 KiB chunks
                with self.fs.open_input_file(self.path(rel)) as src:
                    buf = src.read_buffer()
            except FileNotFoundError as exc:  # missing when we looked (it may exist by now: a racing writer)
                raise self._missing(rel) from exc
            except OSError as exc:
                if timed_out(exc) or self.exists(rel):
                    raise
                raise self._missing(rel) from exc
        return self._verified(rel, buf, checksum)

    def _missing(self, rel: str) -> StorageError:
        return StorageError(f"{self.path(rel)} is missing: the run directory is incomplete; rerun the stage that "
                            f"writes it (with --overwrite)")

    def _verified(self, rel: str, buf: pa.Buffer, checksum: Optional[str]) -> pa.Buffer:
        if checksum is not None and not matches(buf, checksum):
            raise StorageError(f"{self.path(rel)} is corrupted ({algorithm_of(checksum)} does not match the manifest): "
                               f"rerun the stage that writes it (with --overwrite)")
        return buf

    def read_buffer(self, rel: str, checksum: Optional[str] = None) -> pa.Buffer:
        """Like `read_bytes`, but memory-maps local files: the bytes are read once, by the checksum and the
        consumer, instead of being copied into a new buffer first."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            return self.read_bytes(rel, checksum)
        try:
            with pa.memory_map(self.path(rel)) as mm:
                buf = mm.read_buffer()
        except FileNotFoundError as exc:
            raise self._missing(rel) from exc
        return self._verified(rel, buf, checksum)

    def write_json(self, rel: str, obj: Any) -> str:
        """Write strict JSON (non-finite floats as null); returns its checksum."""
        return self.write_text(rel, json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n")

    def read_json(self, rel: str, checksum: Optional[str] = None) -> Any:
        """Parse ``rel`` (verified against ``checksum`` when given).

        Raises:
            StorageError: missing, corrupted (checksum) or not valid JSON (an empty or truncated file).
        """
        buf = self.read_bytes(rel, checksum)
        try:
            return json.loads(buf.to_pybytes().decode("utf-8"))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            raise StorageError(f"{self.path(rel)} is not valid JSON ({getattr(exc, 'msg', exc)}{where}): the file is "
                               f"empty, truncated or corrupted; rerun the stage that writes it (with --overwrite)"
                               ) from None

    def write_text(self, rel: str, text: str) -> str:
        """Write ``text`` atomically, every URI in it without credentials (configs and manifests name the run by
        its clean URI); returns its checksum."""
        return self.write_bytes(rel, credentials.strip(text).encode())

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).to_pybytes().decode()

    # -- torch state --------------------------------------------------------------------------------------
    def write_torch(self, rel: str, obj: Any) -> str:
        # heavy: torch loads here, not when this module is imported
        import torch

        bio = io.BytesIO()
        torch.save(obj, bio)
        return self.write_bytes(rel, bio.getvalue())

    def read_torch(self, rel: str, checksum: Optional[str] = None) -> Any:
        # heavy: torch loads here, not when this module is imported
        import torch

        buf = self.read_bytes(rel, checksum)
        return torch.load(io.BytesIO(buf.to_pybytes()), map_location="cpu", weights_only=True)


    def manifest_checksum(self, rel: str) -> Optional[str]:
        """``rel``'s checksum as ``manifest.json`` records it; None when the manifest or the entry is missing."""
        if not self.exists("manifest.json"):
            return None
        return self.read_json("manifest.json").get("shards", {}).get(rel)

    def read_theta0(self) -> Any:
        """The run's θ0 state_dict, verified against the manifest.

        Raises:
            StorageError: no manifest entry for it, or it does not match (another run's θ0, or corrupted).
        """
        checksum = self.manifest_checksum("theta0.pt")
        if checksum is None:
            raise StorageError(f"{self.path('theta0.pt')} has no checksum in {self.path('manifest.json')}: the run "
                               f"directory is incomplete; start it again with --overwrite")
        return self.read_torch("theta0.pt", checksum)


# ---------------------------------------------------------------------------------------------------------
# Arrow shards

def encode_vector(values: np.ndarray, metadata: Optional[Dict[str, str]] = None) -> pa.Buffer:
    """A 1-D float32 vector as an Arrow IPC file (one column "v")."""
    assert values.ndim == 1
    table = pa.table({"v": pa.array(np.ascontiguousarray(values, dtype=np.float32))})
    table = table.replace_schema_metadata({k: str(v) for k, v in (metadata or {}).items()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def decode_vector(buf: pa.Buffer, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Inverse of `encode_vector`; copies into ``out`` when given (no second temporary)."""
    col = pa.ipc.open_file(buf).read_all().column("v")
    arr = col.chunk(0).to_numpy(zero_copy_only=True) if col.num_chunks == 1 else col.to_numpy()
    if out is None:
        return arr.copy()
    out[...] = arr
    return out


class ColumnWriter:
    """Streams a D×N float32/float64 matrix into an Arrow IPC file, one column per row (u0..u{D-1}), tile by tile."""

    def __init__(self, sink, num_columns: int, dtype: str = "float32"):
        self.dtype = np.dtype(dtype)
        self.schema = pa.schema([(f"u{k}", pa.from_numpy_dtype(self.dtype)) for k in range(num_columns)])
        self.writer = pa.ipc.new_file(pa.PythonFile(sink, mode="w"), self.schema)

    def write(self, tile_Dn: np.ndarray) -> None:  # D rows, a tile of n of the N coordinates
        arrays = [pa.array(np.ascontiguousarray(row, dtype=self.dtype)) for row in tile_Dn]
        self.writer.write_batch(pa.record_batch(arrays, schema=self.schema))

    def close(self) -> None:
        self.writer.close()


def decode_columns(buf: pa.Buffer, num_columns: Optional[int] = None) -> np.ndarray:
    """Inverse of `ColumnWriter`: the leading ``num_columns`` rows as a D×N array of the stored dtype."""
    table = pa.ipc.open_file(buf).read_all()
    d = table.num_columns if num_columns is None else num_columns
    out = np.empty((d, table.num_rows), dtype=table.schema.field(0).type.to_pandas_dtype())
    for k in range(d):
        offset = 0
        for chunk in table.column(k).chunks:
            a = chunk.to_numpy(zero_copy_only=True)
            out[k, offset : offset + len(a)] = a
            offset += len(a)
    return out


def block_bounds(num_params: int, num_blocks: int) -> Tuple[Tuple[int, int], ...]:
    """Contiguous, near-equal blocks of the flat parameter vector: ((start, stop), ...)."""
    edges = np.linspace(0, num_params, num_blocks + 1).round().astype(int)
    return tuple((int(edges[i]), int(edges[i + 1])) for i in range(num_blocks))


def snapshot_rel(block: int, snap: int) -> str:
    return f"trajectory/block_{block:03d}/snap_{snap:05d}.arrow"


def block_index_rel(block: int) -> str:
    return f"trajectory/block_{block:03d}/index.json"


def basis_rel(block: int, prefix: str = "basis") -> str:
    return f"{prefix}/block_{block:03d}.arrow"
