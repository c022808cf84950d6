"""Checksums (issue 26 §2): new shards carry ``xxh3_128:HEX``; digests of runs written before (bare sha256 hex)
and BLAKE3 ones are verified in their own algorithm; a streamed write hashes what passes, no second read."""
import hashlib

import pytest

from raysub.errors import StorageError
from raysub.checksums import CHECKSUM, algorithm_of, checksum, matches, sha256
from raysub.storage import RunDir


def test_a_new_digest_names_its_algorithm_and_an_old_one_is_sha256():
    """Pinned: XXH3-128 of b"abc" (the xxHash reference value). Catches a digest without its algorithm (a reader
    could not tell it from sha256) and a 64-bit XXH3 in place of the 128-bit one."""
    assert CHECKSUM == "xxh3_128"
    assert checksum(b"abc") == "xxh3_128:06b05ab6733a618578af5f94892f3950"
    old = hashlib.sha256(b"abc").hexdigest()
    assert sha256(b"abc") == old and algorithm_of(old) == "sha256" and matches(b"abc", old)
    assert not matches(b"abd", old) and not matches(b"abd", checksum(b"abc"))
    assert matches(b"abc", checksum(b"abc", "blake3"))
    assert checksum(b"abc", "blake3").startswith("blake3:6437b3ac38465133ffb63b75273a8db5")  # BLAKE3 test vector
    with pytest.raises(StorageError, match="unknown checksum algorithm 'md5'"):
        matches(b"abc", "md5:900150983cd24fb0d6963f7d28e17f72")


def test_a_run_written_with_sha256_stays_readable_and_verified(tmp_path):
    """A shard recorded with a bare sha256 (a run from before) reads back; one flipped bit is refused, naming the
    algorithm. Catches verification that assumes every digest is the new algorithm (every old run 'corrupted')
    or that skips digests it does not recognise."""
    run = RunDir(str(tmp_path / "run"))
    new = run.write_bytes("x.bin", b"0123456789" * 100)
    assert new == checksum(b"0123456789" * 100)
    old = sha256(b"0123456789" * 100)
    assert run.read_bytes("x.bin", old).to_pybytes() == b"0123456789" * 100
    assert run.read_bytes("x.bin", new).to_pybytes() == b"0123456789" * 100
    (tmp_path / "run" / "x.bin").write_bytes(b"1123456789" + b"0123456789" * 99)
    with pytest.raises(StorageError, match=r"x.bin is corrupted \(sha256 does not match"):
        run.read_bytes("x.bin", old)
    with pytest.raises(StorageError, match=r"x.bin is corrupted \(xxh3_128 does not match"):
        run.read_bytes("x.bin", new)


def test_a_streamed_write_hashes_what_passes(tmp_path):
    """The sink's digest is the checksum of the bytes written in pieces. Catches a hash of the last piece only,
    and a sink that reports the old algorithm's digest."""
    run = RunDir(str(tmp_path / "run"))
    with run.open_writer("s.bin") as sink:
        for piece in (b"a" * 1000, b"b" * 3, b"c" * 70000):
            sink.write(piece)
    data = b"a" * 1000 + b"b" * 3 + b"c" * 70000
    assert sink.sha256 == checksum(data) and run.read_bytes("s.bin", sink.sha256).to_pybytes() == data
