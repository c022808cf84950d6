"""Launch plumbing shared by the jobs/ entrypoints: join a running cluster, call the CLI.

Every job runs the same way. No job edits ``sys.path``: ``python jobs/x.py`` puts jobs/, not the repo root, on it,
and raysub comes from the installed package (``pip install -e .``, which is this checkout); under ``ray job submit
--working-dir .`` Ray puts the uploaded copy of the working dir first on the driver's PYTHONPATH, so the driver
imports that copy's raysub.

    python jobs/dldr.py [CONFIG] [key=value ...]                  # local: a throwaway Ray cluster on this machine
    ray job submit --working-dir . -- python jobs/dldr.py ...     # on a running Ray cluster

Joining the cluster. Under ``ray job submit`` the job supervisor starts the driver on the head node with
``RAY_ADDRESS`` set to the cluster's GCS address, and raysub must join that cluster rather than start its own
(raysub's default, ``cluster.address: null``, starts a local one). So a job appends ``cluster.address=auto``
when ``RAY_ADDRESS`` is set (non-empty) or Ray is already initialized in this process, unless the command line
has its own ``cluster.address=...``. ``auto`` makes ``ray.init`` use ``RAY_ADDRESS``, else the latest cluster
started on this machine (``ray start --head``). The same rule lets ``RAY_ADDRESS=127.0.0.1:6379 python
jobs/dldr.py`` drive a cluster directly from a shell on the head node. To force a private local cluster while
``RAY_ADDRESS`` is exported, unset it (``env -u RAY_ADDRESS python jobs/dldr.py``). A job-server URL in
``RAY_ADDRESS`` (``http://HEAD:8265``, for the ``ray job`` CLI) cannot drive a run: the job stops with a one-line
error; give the job CLI ``RAY_API_SERVER_ADDRESS`` instead.

Run directories. The driver of a submitted job runs in a temporary copy of the working dir, so a relative
``run_dir`` (the shipped configs use ``runs/NAME``) lands inside that copy and is lost with it. On a cluster pass
an absolute path (single node) or a URI every node can reach (``run_dir=s3://bucket/run``, multi-node); the
jobs print a warning otherwise.

Token auth (Ray 2.60 turns it on for ``ray start --head`` whenever a token exists): the job client needs
``RAY_AUTH_MODE=token`` in its own environment and the cluster's token (``~/.ray/auth_token``, or
``RAY_AUTH_TOKEN``); a submitted driver inherits both from the cluster. See cluster/local.md.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

from raysub import cli  # cheap (no Ray, no torch); called as cli.main so that tests can replace it
from raysub.config import load_config
from raysub.credentials import mask
from raysub.errors import RaysubError


def job_server_address() -> Optional[str]:
    """``RAY_ADDRESS`` when it is a job-server URL (``http://HEAD:8265``): meant for ``ray job``, not a driver."""
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address.startswith(("http://", "https://")) else None


def on_cluster() -> bool:
    """True when this driver should join a running cluster: ``RAY_ADDRESS`` is set or Ray is initialized."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    if "ray" in sys.modules:
        return bool(sys.modules["ray"].is_initialized())
    return False


def split_flags(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(positionals, flags): ``--resume`` / ``--overwrite`` / ``-h`` may be written anywhere."""
    flags = [a for a in argv if a.startswith("-")]
    return [a for a in argv if not a.startswith("-")], flags


def cluster_overrides(positionals: Sequence[str]) -> List[str]:
    """``["cluster.address=auto"]`` on a cluster unless the command line sets cluster.address; else ``[]``."""
    if any(a.startswith("cluster.address=") for a in positionals):
        return []
    return ["cluster.address=auto"] if on_cluster() else []


def run_dir_of(command: str, positionals: Sequence[str]) -> Optional[str]:
    """The run directory a command will use (None when the config does not load: the CLI reports that)."""
    if command in ("basis", "train"):
        return positionals[0] if positionals else None
    has_config = bool(positionals) and "=" not in positionals[0]
    config = cli.resolve_config(positionals[0]) if has_config else cli.QUICKSTART
    try:
        return load_config(config, positionals[1:] if has_config else positionals).run_dir
    except RaysubError:
        return None


def warn_local_run_dir(run_dir: Optional[str]) -> None:
    """On a cluster, warn when ``run_dir`` is a relative path (it would land in the job's temporary copy)."""
    if not run_dir or not on_cluster() or "://" in run_dir or os.path.isabs(os.path.expanduser(run_dir)):
        return
    print(mask(f"raysub job: warning: run_dir={run_dir} is relative: on a cluster it resolves to "
          f"{os.path.abspath(run_dir)} (under `ray job submit`: inside the job's temporary copy of the working dir, "
          f"lost with it) and only this node sees it. "
          f"Pass run_dir=/absolute/path (single node) or run_dir=s3://bucket/path (multi-node)."),
          file=sys.stderr, flush=True)


def run_cli(command: str, argv: Sequence[str], *, config: Optional[str] = None, subcommand: Optional[str] = None
            ) -> int:
    """``raysub COMMAND [SUBCOMMAND] [config] ARGV... [cluster.address=auto]``; returns the exit status.

    Args:
        command: run | sample | basis | train | sweep | l2o (with ``subcommand`` meta-train or tune).
        argv: The job's own arguments (positionals and flags in any order).
        config: A fixed config placed before ``argv`` (jobs that ship one config).
    """
    positionals, flags = split_flags(argv)
    if job_server_address():  # its URL may carry a user and password
        print(mask(f"raysub job: error: RAY_ADDRESS={job_server_address()} is a job-server address: submit with "
                   f"`ray job submit --working-dir . -- python jobs/...` (set RAY_API_SERVER_ADDRESS for the job "
                   f"client instead), or unset RAY_ADDRESS to run here, or set it to the cluster's GCS address "
                   f"HEAD:6379"), file=sys.stderr, flush=True)
        return 2
    if config is not None:
        positionals = [config, *positionals]
    if on_cluster() and "-h" not in flags and "--help" not in flags:
        warn_local_run_dir(run_dir_of(command, positionals))
    return cli.main([command, *([subcommand] if subcommand else []), *positionals, *cluster_overrides(positionals),
                 *flags])
