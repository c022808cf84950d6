"""Storage URIs: how raysub reads a path or a URI into a `pyarrow.fs` filesystem, joins and splits it, and prints it.

A run directory is a local path or a URI (``s3://bucket/run``, ``gs://...``) that every node can reach.
A URI follows pyarrow's conventions (``pyarrow.fs.FileSystem.from_uri``): the endpoint and region come from the
environment (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``) or from the URI's query
(``s3://bucket/run?endpoint_override=host:9000&scheme=http&region=us-east-1``); credentials from the AWS
default chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance role). Credentials written
into a URI (``s3://KEY:SECRET@bucket/run``, ``?secret_key=``) are split off and exported to that chain
(`raysub.credentials`): ``RunDir.uri`` never holds them, so nothing raysub prints or stores does. A run directory
needs a bucket and a path inside it. Paths inside a run are joined before the query (`join_uri`), and Ray
Train/Tune get the filesystem object itself (``storage_filesystem``), never a concatenated string.

A stalled object store: every S3 request gives up after ``RAYSUB_STORAGE_TIMEOUT_S`` seconds without an answer
(default 10; connecting: at most 5) and is tried 3 times, so a storage call fails within about a minute — inside
the lock's stale time — instead of pyarrow's ~100 s of silent retries. A call still waiting after one timeout
prints a line; one that gives up raises `StorageTimeout`, naming the storage, the operation and the timeout.
"""
from __future__ import annotations

import math
import os
import posixpath
from typing import Tuple

import pyarrow.fs as pafs

from raysub import credentials
from raysub.errors import StorageError

TIMEOUT_ENV = "RAYSUB_STORAGE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 10.0
TRIES = 3
BUCKET_SCHEMES = ("s3", "gs", "gcs")  # the URI's host part is a bucket


class StorageTimeout(OSError):
    """A storage request that got no answer within the timeout (`storage_timeout`), after every try."""


def storage_timeout() -> float:
    """Seconds an S3 request may go without an answer before it is retried (``RAYSUB_STORAGE_TIMEOUT_S``).

    Raises:
        StorageError: the variable is not a number of seconds > 0.
    """
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise StorageError(f"{TIMEOUT_ENV}={text}: must be a number of seconds > 0 (default {DEFAULT_TIMEOUT_S:g})")
    return value


def timed_out(exc: BaseException) -> bool:
    """Whether a storage error is a request that got no answer in time (curl's timeout, as pyarrow reports it)."""
    if isinstance(exc, StorageTimeout):
        return True
    text = str(exc)
    return "curlCode: 28" in text or "Timeout was reached" in text


def open_uri(uri: str) -> Tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` of a URI, like ``pyarrow.fs.FileSystem.from_uri``, with its credentials adopted
    (`raysub.credentials`) and, for S3, the request timeouts and a bounded number of tries.

    Raises:
        OSError, ValueError: as ``FileSystem.from_uri`` (an unknown scheme, a malformed query).
        StorageError: ``RAYSUB_STORAGE_TIMEOUT_S`` is not a number > 0.
    """
    fs, path = pafs.FileSystem.from_uri(credentials.clean(uri))
    if isinstance(fs, pafs.S3FileSystem):
        timeout = storage_timeout()
        _, (options,) = fs.__reduce__()
        # from_uri's default retries a stalled request for ~100 s in silence: longer than the lock's stale time
        options.update(connect_timeout=min(timeout, 5.0), request_timeout=timeout,
                       retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=TRIES))
        fs = pafs.S3FileSystem(**options)
    return fs, path


def first_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for a one-line message (300 characters at most)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def join_uri(uri: str, *parts: str) -> str:
    """``uri/parts...``: a local path joined as paths are; a URI's ``?query`` (endpoint, region) stays at the end."""
    if "://" not in uri:
        return os.path.join(uri, *parts)
    base, sep, query = uri.partition("?")
    return posixpath.join(base.rstrip("/"), *parts) + sep + query


def split_uri(uri: str) -> Tuple[str, str]:
    """(parent, name) of a path or URI, the inverse of `join_uri` for one part (the query stays with the parent)."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
        return os.path.dirname(uri), os.path.basename(uri)
    base, sep, query = uri.partition("?")
    parent, name = base.rstrip("/").rsplit("/", 1)
    return parent + sep + query, name


def redact(uri: str) -> str:
    """``uri`` for messages: credentials written into it (``s3://KEY:SECRET@bucket``, ``?secret_key=...``) and
    every registered secret are replaced by ``***``."""
    return credentials.mask(uri)
