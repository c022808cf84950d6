"""Credentials written into a storage URI: split off at the entrance, handed to the environment, masked everywhere.

A URI may carry credentials in its userinfo (``s3://KEY:SECRET@bucket/run``) or in its query (``access_key=``,
``secret_key=``, ``session_token=``, any case). raysub never keeps them in a URI: `split_credentials` returns the
URI without them, and `adopt` exports them as ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``
— the AWS default chain every filesystem built afterwards reads, Ray workers of a cluster started afterwards
included — and registers their values, which `mask` replaces by ``***`` in any text. What raysub stores (configs,
manifests, lock records) names the run by its clean URI; a ``--resume`` gets the credentials from the environment
again.
"""
from __future__ import annotations

import io
import os
import re
import sys
import threading
from typing import Dict, List, Set, Tuple
from urllib.parse import quote, unquote

from raysub.errors import ConfigError

# the query keys pyarrow's S3 URIs take credentials from, and the variables of the AWS default chain
QUERY_KEYS = {"access_key": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY",
              "session_token": "AWS_SESSION_TOKEN"}

_known: Set[str] = set()
_adopted: Dict[str, str] = {}
_guard = threading.Lock()

_SCHEME = r"[a-zA-Z][a-zA-Z0-9+.-]*://"
# userinfo: KEY:SECRET@ (a secret may hold '/', as AWS secret keys do; a key never does) or KEY@
_USERINFO = re.compile(rf"^({_SCHEME})(?:([^@/?#:]+):([^@?#]*)|([^@/?#:]*))@")
_USERINFO_IN_TEXT = re.compile(rf"({_SCHEME})(?:[^@/?#:\s'\"<>]+:[^@?#\s'\"<>]*|[^@/?#:\s'\"<>]*)@")
_QUERY_SECRET_IN_TEXT = re.compile(r"(?i)([?&](?:access_key|secret_key|session_token)=)[^&#\s'\"<>]*")
_URI_IN_TEXT = re.compile(rf"{_SCHEME}[^\s'\"<>]*")
_MIN_SECRET = 4  # a shorter value would mask ordinary words everywhere


def split_credentials(uri: str) -> Tuple[str, Dict[str, str]]:
    """``(uri without credentials, {"access_key"|"secret_key"|"session_token": value})`` (values URL-decoded).

    A local path, or a URI without credentials, comes back unchanged with ``{}``.
    """
    m = _USERINFO.match(uri)
    creds: Dict[str, str] = {}
    if m:
        key, secret = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), "")
        if key:
            creds["access_key"] = unquote(key)
        if secret:
            creds["secret_key"] = unquote(secret)
        uri = m.group(1) + uri[m.end():]
    base, sep, query = uri.partition("?")
    if sep and "://" in base:
        kept: List[str] = []
        for item in query.split("&"):
            name, _, value = item.partition("=")
            if name.lower() in QUERY_KEYS:
                if value:
                    creds[name.lower()] = unquote(value)
            else:
                kept.append(item)
        uri = base + ("?" + "&".join(kept) if kept else "")
    return uri, creds


def register(value: str) -> None:
    """Mask ``value`` (and its URL-encoded form) in everything `mask` sees from now on."""
    if value and len(value) >= _MIN_SECRET:
        with _guard:
            _known.update({value, quote(value, safe=""), quote(value)})


def adopt(creds: Dict[str, str], where: str) -> None:
    """Register ``creds`` (from `split_credentials`) and export them to the AWS default chain.

    Raises:
        ConfigError: another URI of this command carried different credentials (the environment holds one set).
    """
    if not creds:
        return
    for value in creds.values():
        register(value)
    with _guard:
        for name, value in creds.items():
            env = QUERY_KEYS[name]
            if _adopted.get(env, value) != value:
                raise ConfigError(f"{mask(where)} carries other credentials than an earlier URI of this command: "
                                  f"one command uses one set; give it in the environment ({env}) instead of URIs")
        if "access_key" in creds and "session_token" not in creds and "AWS_SESSION_TOKEN" not in _adopted:
            os.environ.pop("AWS_SESSION_TOKEN", None)  # the environment's token belongs to its own key, not this one
        for name, value in creds.items():
            _adopted[QUERY_KEYS[name]] = value
            os.environ[QUERY_KEYS[name]] = value


def clean(uri: str) -> str:
    """``uri`` without its credentials, which are adopted (`adopt`): what raysub keeps, prints and stores."""
    out, creds = split_credentials(uri)
    adopt(creds, uri)
    return out


def clean_args(args: List[str]) -> List[str]:
    """Command-line arguments with every URI in them (``run_dir=s3://KEY:SECRET@b/run``, a config URI, a
    ``train.init_from``) stripped of its credentials, which are adopted: a new command, whose URIs may carry
    other credentials than the previous command's of this process."""
    with _guard:
        _adopted.clear()
    return [_URI_IN_TEXT.sub(lambda m: clean(m.group(0)), a) if "://" in a else a for a in args]


def strip(text: str) -> str:
    """``text`` to be stored: every URI in it without credentials (a stored URI must still work once the
    environment supplies them), every registered secret masked."""
    if "://" in text:
        text = _URI_IN_TEXT.sub(lambda m: split_credentials(m.group(0))[0], text)
    return _mask_known(text)


def strip_values(obj):
    """``obj`` (a config's dict) with `strip` applied to every string in it, keys kept: what raysub hands to a
    tracker as parameters (a URI written into a YAML file — a weights path, a basis run — may carry credentials)."""
    if isinstance(obj, str):
        return strip(obj)
    if isinstance(obj, dict):
        return {k: strip_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(strip_values(v) for v in obj)
    return obj


def mask(text: str) -> str:
    """``text`` to be shown: URI credentials (userinfo, secret query keys) and registered secrets as ``***``."""
    if "://" in text:
        text = _USERINFO_IN_TEXT.sub(r"\1***@", text)
    if "=" in text:
        text = _QUERY_SECRET_IN_TEXT.sub(r"\1***", text)
    return _mask_known(text)


def _mask_known(text: str) -> str:
    if _known:
        for secret in sorted(_known, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, "***")
    return text


class _MaskedStream(io.TextIOBase):
    """A text stream that masks (`mask`) what it forwards: raysub's prints and Ray's forwarded worker logs."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, s: str) -> int:
        self._stream.write(mask(s))
        return len(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def mask_output() -> None:
    """Mask everything later printed to ``sys.stdout``/``sys.stderr`` (installed once per stream)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _MaskedStream):
            setattr(sys, name, _MaskedStream(stream))
