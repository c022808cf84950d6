"""Ray plumbing shared by the stages: start or join a cluster, run a TorchTrainer with progress lines.

Progress: rank 0 puts one dict per epoch on a `ray.util.queue.Queue`; the driver prints it as one line while
`fit()` runs in a thread. Ray's own start-up and worker logs are kept off the console for a local run
(``log_to_driver=False``); they stay in Ray's session logs.
"""
from __future__ import annotations

import logging
import os
import queue as pyqueue
import sys
import threading
import time
from typing import Any, Callable, Dict, List

from raysub.config import Config
from raysub.errors import ConfigError


def ensure_ray(cfg: Config, quiet: bool = True, grow: bool = True) -> None:
    """Start a local Ray cluster for the run (``cluster.address`` None or "local") or join ``cluster.address``.

    A local cluster gets ``cluster.num_cpus`` logical CPUs, else the machine's count — raised to fit the
    workers when ``grow`` (a single run), kept when not (a sweep schedules its trials into what there is).
    It listens on loopback only: its node IP is 127.0.0.1, so Ray binds every gRPC server, agent and
    metrics endpoint (``/metrics`` takes no token) there instead of on all interfaces. (PyTorch's rendezvous
    store, opened by Ray Train's rank 0 during training, still binds all interfaces: torch has no setting.)

    Raises:
        ConfigError: the cluster has fewer logical CPUs/GPUs than ``cluster`` asks for.
    """
    import ray
    from ray._private import ray_constants

    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        # Train V2 drains ray.train.report on its health-check poll (2 s by default), which would stall every
        # epoch shorter than that; a local cluster inherits this from the driver's environment.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        kwargs: Dict[str, Any] = dict(logging_level=logging.ERROR if quiet else logging.WARNING)
        if starts_local(cfg):
            want = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 1
            num_cpus = cfg.cluster.num_cpus or (max(os.cpu_count() or 1, int(want + 0.999)) if grow
                                                else os.cpu_count() or 1)
            kwargs.update(num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet,
                          _node_ip_address="127.0.0.1")
        else:
            kwargs.update(address=cfg.cluster.address)
        # Ray binds its servers to the node IP, but ray.init swaps a loopback _node_ip_address for the machine's
        # routable IP unless multi-node support is off — Ray's own single-machine mode, its default on macOS and
        # Windows (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). Ray reads that variable into ray_constants at import, so
        # the constant is switched for this start-up only (a later join from this process needs it back on);
        # joining a cluster keeps Ray's default. tests/test_cluster_local.py lists the sockets this opens.
        multi_node = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = multi_node and not starts_local(cfg)
        try:
            ray.init(**kwargs)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = multi_node
    check_resources(cfg)


def starts_local(cfg: Config) -> bool:
    """Whether raysub starts the cluster itself (``cluster.address`` None, or Ray's "local"), rather than joins."""
    return cfg.cluster.address in (None, "local")


def check_resources(cfg: Config) -> None:
    """Fail early when a local cluster cannot fit the workers; on a joined cluster only warn, since an
    autoscaler may add the nodes once Ray Train asks for them.

    Raises:
        ConfigError: a local cluster with fewer logical CPUs/GPUs than ``cluster`` asks for.
    """
    import ray

    total = ray.cluster_resources()
    need_cpu = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    problems = []
    if total.get("CPU", 0) < need_cpu:
        problems.append(
            f"cluster.num_workers={cfg.cluster.num_workers} × cluster.cpus_per_worker={cfg.cluster.cpus_per_worker} "
            f"needs {need_cpu:g} CPUs but the Ray cluster has {total.get('CPU', 0):g}: lower them or add nodes"
        )
    if cfg.cluster.use_gpu and total.get("GPU", 0) < cfg.cluster.num_workers:
        problems.append(
            f"cluster.use_gpu=true with {cfg.cluster.num_workers} workers needs as many GPUs but the Ray cluster "
            f"has {total.get('GPU', 0):g}: lower cluster.num_workers or set cluster.use_gpu=false"
        )
    if problems and starts_local(cfg):
        raise ConfigError(problems)
    for p in problems:
        print(f"raysub: warning: {p} (waiting for the autoscaler, if there is one)", file=sys.stderr, flush=True)


def make_progress_queue():
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})


def fit_with_progress(trainer, progress, printer: Callable[[Dict[str, Any]], None]):
    """Run ``trainer.fit()`` in a thread, printing each progress dict rank 0 sends; return the Result.

    Raises:
        whatever fit raised (a worker's error surfaces as Ray Train's TrainingFailedError).
    """
    box: Dict[str, Any] = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    relay = True
    while True:
        alive = thread.is_alive()
        try:
            while relay:
                printer(progress.get_nowait())
        except pyqueue.Empty:
            pass
        except Exception as exc:  # the queue's actor died (a lost node): training goes on, say so once
            relay = False
            print(f"raysub: warning: progress lines stopped ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                  f"); training continues and its results are still recorded", file=sys.stderr, flush=True)
        if not alive:
            break
        time.sleep(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def torch_trainer(loop: Callable, loop_config: Dict[str, Any], cfg: Config, name: str, storage_path: str,
                  callbacks=None):
    """A TorchTrainer on ``cluster.num_workers`` workers (gloo on CPU, nccl on GPU)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = ScalingConfig(
        num_workers=cfg.cluster.num_workers,
        use_gpu=cfg.cluster.use_gpu,
        resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if cfg.cluster.use_gpu else {})},
    )
    run_config = RunConfig(
        name=name,
        storage_path=storage_path,
        failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        logging_config=LoggingConfig(log_level="WARNING"),  # raysub prints its own progress lines
        callbacks=callbacks,
    )
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
    )


def _wrapped(e: BaseException, context: bool = True) -> List[BaseException]:
    """The errors a Ray failure wraps: a task's original exception (``cause``) alone, else every Train worker's
    (``worker_failures``), the explicit cause and (with ``context``) the one being handled when it was raised."""
    cause = getattr(e, "cause", None)  # RayTaskError: the original exception
    if isinstance(cause, BaseException):
        return [cause]
    failures = getattr(e, "worker_failures", None)
    out = [v for v in failures.values() if isinstance(v, BaseException)] if isinstance(failures, dict) else []
    for attr in ("__cause__", "__context__") if context else ("__cause__",):
        val = getattr(e, attr, None)
        if isinstance(val, BaseException):
            out.append(val)
    return out


def unwrap_train_error(exc: BaseException) -> BaseException:
    """Our ConfigError inside a Ray failure (a task, actor or Train worker error), if there is one; else ``exc``."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        # a RayTaskError subclasses its cause's type: the cause, not the wrapper, is the error
        if isinstance(e, ConfigError) and not isinstance(getattr(e, "cause", None), BaseException):
            return e
        stack.extend(_wrapped(e))
    return exc


def innermost_error(exc: BaseException) -> BaseException:
    """The original error behind Ray's wrappers, following the first wrapped one (the first failed worker's)."""
    seen = {id(exc)}
    while True:
        inner = _wrapped(exc, context=False)
        if not inner or id(inner[0]) in seen:
            return exc
        exc = inner[0]
        seen.add(id(exc))
