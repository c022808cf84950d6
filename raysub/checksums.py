"""Shard checksums: the digest every file of a run directory is recorded and verified with (`raysub.storage`).

New shards get XXH3-128, stored as ``xxh3_128:HEX`` (issue 26 §2: 28.8 GB/s on one core of the development machine
against sha256's 1.72, `jobs/bench/checksums.py`). A bare hex digest is a run written before and is verified as
sha256; BLAKE3 (``blake3:HEX``) is read too. Every digest names its algorithm, so runs and readers may mix them.
"""
from __future__ import annotations

import hashlib
import os

from raysub.errors import StorageError


def sha256(data) -> str:
    """The plain sha256 hex digest (what runs written before checksums named their algorithm store)."""
    return hashlib.sha256(memoryview(data)).hexdigest()


# Not a security boundary (the manifest and the lock are not authentication): 128 bits against accidental
# corruption, at memory speed.
_ALGORITHMS = ("xxh3_128", "blake3", "sha256")
# RAYSUB_CHECKSUM picks another for new shards (sha256 where a policy asks for it; the benchmarks' before/after)
CHECKSUM = os.environ.get("RAYSUB_CHECKSUM") or "xxh3_128"
if CHECKSUM not in _ALGORITHMS:
    raise StorageError(f"RAYSUB_CHECKSUM={CHECKSUM!r}: choose one of {', '.join(_ALGORITHMS)}")


def hasher(algorithm: str):
    """A fresh incremental hasher (``update``, ``hexdigest``) of ``algorithm``."""
    if algorithm == "xxh3_128":
        import xxhash  # heavy-ish: a C extension, loaded on the first checksum

        return xxhash.xxh3_128()
    if algorithm == "blake3":
        try:
            import blake3  # optional: raysub writes XXH3-128; BLAKE3 digests come from RAYSUB_CHECKSUM=blake3
        except ImportError:
            raise StorageError("a BLAKE3 checksum needs the blake3 package: pip install blake3") from None
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise StorageError(f"unknown checksum algorithm {algorithm!r} (raysub knows {', '.join(_ALGORITHMS)}): was this "
                       f"run written by a newer raysub?")


def algorithm_of(digest: str) -> str:
    """The algorithm a stored digest names (``ALGO:HEX``); a bare 64-hex digest is an older run's sha256."""
    return digest.split(":", 1)[0] if ":" in digest else "sha256"


def checksum(data, algorithm: str = CHECKSUM) -> str:
    """The digest of ``data`` as the manifest stores it: ``ALGO:HEX`` (sha256 without a prefix, as older runs)."""
    if algorithm == "sha256":
        return sha256(data)
    h = hasher(algorithm)
    h.update(memoryview(data))
    return f"{algorithm}:{h.hexdigest()}"


def matches(data, digest: str) -> bool:
    """Whether ``data`` has the stored ``digest``, in the algorithm the digest names."""
    return checksum(data, algorithm_of(digest)) == digest
