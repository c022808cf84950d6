"""The tracking section's checks, before anything starts: `tracking_problems` (MLflow installed, a store a run on
object storage can use; asked by `raysub.pipeline.plan.validate`) and `tracking_probe_problems` (a configured
tracking server answers, a local store is writable; asked by `raysub.pipeline.plan.check`).
"""
from __future__ import annotations

import importlib.util
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional

from raysub.storage import redact

MLFLOW_DIR = "mlruns"  # RUN/mlruns: the default MLflow file store
INSTALL = "pip install 'raysub[tracking]'"
PROBE_TIMEOUT_S = 3.0  # the tracking server's probe before anything starts


def _remote(run_dir: str) -> bool:
    return "://" in run_dir and not run_dir.startswith("file://")


def tracking_problems(cfg) -> List[str]:
    """Problems of the ``tracking`` section (one line each); empty: fine."""
    t = cfg.tracking
    problems: List[str] = []
    if t.mlflow and importlib.util.find_spec("mlflow") is None:
        problems.append(f"tracking.mlflow=true needs MLflow, which is not installed: {INSTALL} (or set "
                        f"tracking.mlflow=false)")
    if t.mlflow and t.mlflow_tracking_uri is None and _remote(cfg.run_dir):
        problems.append(f"tracking.mlflow=true with run_dir on object storage: MLflow's default file store "
                        f"({MLFLOW_DIR}/ in the run directory) must be local; set tracking.mlflow_tracking_uri (an "
                        f"MLflow server such as http://HOST:5000, or a local path)")
    if t.mlflow_experiment is not None and not t.mlflow_experiment.strip():
        problems.append("tracking.mlflow_experiment is empty: give a name, or leave it unset for the run "
                        "directory's name")
    return problems


def tracking_probe_problems(cfg, timeout: float = PROBE_TIMEOUT_S) -> List[str]:
    """Whether ``tracking.mlflow_tracking_uri`` can be used, checked before anything starts (one line; empty: fine).

    An ``http(s)://`` server must answer a GET of its ``/health`` within ``timeout`` seconds (any HTTP status counts:
    it is there); a local path or ``file:`` URI must be a writable directory, or creatable. Nothing is written.
    Other stores (``sqlite:``, ``databricks``) are left to MLflow. The default store, RUN/mlruns, is the run
    directory's, which the run lock checks.
    """
    t = cfg.tracking
    if not t.mlflow or t.mlflow_tracking_uri is None:
        return []
    uri = t.mlflow_tracking_uri
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("http", "https"):
        why = _unreachable(parts, timeout)
        return [f"tracking.mlflow_tracking_uri={redact(uri)} cannot be reached ({why}): start the server, fix the "
                f"URI, or set tracking.mlflow=false"] if why else []
    if parts.scheme in ("", "file") and not uri.startswith("databricks"):
        path = urllib.parse.unquote(parts.path) if parts.scheme else os.path.expanduser(uri)
        why = _unwritable(os.path.abspath(path))
        return [f"tracking.mlflow_tracking_uri={uri} is not a writable directory ({why}): choose a writable path, "
                f"or set tracking.mlflow=false"] if why else []
    return []


def _unreachable(parts: urllib.parse.SplitResult, timeout: float) -> Optional[str]:
    """Why the server at ``parts`` does not answer within ``timeout`` seconds, or None when it answers."""
    if not parts.hostname:
        return "no host in it"
    try:
        port = parts.port
    except ValueError:
        return "its port is not a number"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    # credentials stay out of the probe: /health needs none, and any answer, a 401 too, says the server is there
    url = urllib.parse.urlunsplit((parts.scheme, host + (f":{port}" if port else ""),
                                   parts.path.rstrip("/") + "/health", "", ""))
    box: Dict[str, Any] = {}

    def get():
        try:
            with urllib.request.urlopen(url, timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass
        except Exception as exc:
            box["error"] = getattr(exc, "reason", exc) if isinstance(exc, urllib.error.URLError) else exc
        box["done"] = True

    # a thread bounds the whole probe, name resolution included (urlopen's timeout covers each socket operation)
    thread = threading.Thread(target=get, name="raysub-mlflow-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    err = box.get("error")
    if "done" not in box or isinstance(err, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout:g} s"
    if err is None:
        return None
    if isinstance(err, ConnectionRefusedError):
        return f"connection refused within {timeout:g} s"
    if isinstance(err, socket.gaierror):
        return f"unknown host {parts.hostname}"
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def _unwritable(path: str) -> Optional[str]:
    """Why MLflow could not keep a file store at ``path`` (a directory, made when missing), or None."""
    probe = path
    while not os.path.exists(probe):  # the first existing ancestor is where the store's directories get made
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None

