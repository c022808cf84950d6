"""Ray plumbing shared by the stages: start or join a cluster, run a TorchTrainer with progress lines.

Progress: rank 0 puts one dict per epoch on a `ray.util.queue.Queue`; the driver prints it as one line while
`fit()` runs in a thread. Ray's own start-up and worker logs are kept off the console for a local run
(``log_to_driver=False``); they stay in Ray's session logs.
"""
from __future__ import annotations

import logging
import math
import os
import queue as pyqueue
import sys
import threading
import time
from typing import Any, Callable, Dict, List
import uuid

from raysub import faults
from raysub.config import Config
from raysub.engine.reaper import start_reaper
from raysub.errors import ConfigError, RaysubError


def ensure_ray(cfg: Config, quiet: bool = True, grow: bool = True) -> None:
    """Start a local Ray cluster for the run (``cluster.address`` None or "local") or join ``cluster.address``.

    A local cluster gets ``cluster.num_cpus`` logical CPUs, else the machine's count — raised to fit the
    workers when ``grow`` (a single run), kept when not (a sweep schedules its trials into what there is).
    It listens on loopback only: its node IP is 127.0.0.1, so Ray binds every gRPC server, agent and
    metrics endpoint (``/metrics`` takes no token) there instead of on all interfaces. (PyTorch's rendezvous
    store, opened by Ray Train's rank 0 during training, still binds all interfaces: torch has no setting.)

    Raises:
        ConfigError: the cluster can never hold the workers ``cluster`` asks for (`check_resources`).
    """
    # heavy: ray loads here, not when this module is imported
    import ray
    from ray._private import ray_constants

    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        # Train V2 drains ray.train.report on its health-check poll (2 s by default), which would stall every
        # epoch shorter than that; a local cluster inherits this from the driver's environment.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        kwargs: Dict[str, Any] = dict(logging_level=logging.ERROR if quiet else logging.WARNING)
        if starts_local(cfg) and os.environ.get("RAY_ADDRESS"):
            # under `ray job submit` (or a shell pointed at a cluster): joining is explicit, never a nested cluster
            raise ConfigError(f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is set but cluster.address is not: pass "
                              f"cluster.address=auto to run on that cluster (the jobs/ entrypoints do), or unset "
                              f"RAY_ADDRESS for a private local cluster")
        if starts_local(cfg):
            # Train V2 starts a preemption watcher per fit: an actor (one more process, ~1 CPU-s) that polls for node
            # drains, which a local cluster (no autoscaler, no spot nodes) never has
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            want = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 1
            num_cpus = cfg.cluster.num_cpus or (max(os.cpu_count() or 1, int(want + 0.999)) if grow
                                                else os.cpu_count() or 1)
            # address="local": a new cluster, even when a `ray start` on this machine left its address file behind
            # (a bare ray.init() would join that cluster, or fail on num_cpus)
            kwargs.update(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet,
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
        if starts_local(cfg):
            start_reaper()
    check_resources(cfg)
    check_run_dir_shared(cfg.run_dir)


def node_count() -> int:
    """Alive nodes of the connected Ray cluster (1 when Ray is not started)."""
    import ray  # heavy: ray loads here, not when this module is imported

    if not ray.is_initialized():
        return 1
    return max(sum(1 for n in ray.nodes() if n.get("Alive")), 1)


def starts_local(cfg: Config) -> bool:
    """Whether raysub starts the cluster itself (``cluster.address`` None, or Ray's "local"), rather than joins."""
    return cfg.cluster.address in (None, "local")


def check_resources(cfg: Config) -> None:
    """Fail before anything starts when the cluster can never hold the workers Ray Train will ask for
    (`resource_problems`): on a local cluster always; on a joined one unless ``cluster.wait_for_autoscaler``, which
    turns the error into a warning (an autoscaler adds the nodes once Ray Train's placement group asks for them).

    Raises:
        ConfigError: one line — no GPU for ``cluster.use_gpu``, no node big enough for one worker, or fewer
            worker slots on all nodes together than ``cluster.num_workers``.
    """
    # heavy: ray loads here, not when this module is imported
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    problems = resource_problems(cfg, ray.cluster_resources(), nodes)
    if not problems:
        return
    if cfg.cluster.wait_for_autoscaler and not starts_local(cfg):
        for p in problems:
            print(f"raysub: warning: {p} (cluster.wait_for_autoscaler=true: waiting for the autoscaler to add nodes)",
                  file=sys.stderr, flush=True)
        return
    hint = "" if starts_local(cfg) else "; or, if an autoscaler adds nodes, set cluster.wait_for_autoscaler=true"
    raise ConfigError(problems[0] + hint)


def resource_problems(cfg: Config, total: Dict[str, float], nodes: List[Dict[str, float]]) -> List[str]:
    """Why ``cfg.cluster``'s workers can never all be placed on a cluster of ``nodes`` (each node's total resources,
    as ``ray.nodes()`` reports them; ``total``: ``ray.cluster_resources()``), most basic reason first; [] if they fit.

    A worker's bundle (``cluster.cpus_per_worker`` CPUs, and 1 GPU with ``cluster.use_gpu``) must fit on one node,
    so totals are not enough: two 2-CPU nodes hold no 3-CPU worker. The count of workers the cluster can hold is
    the sum over nodes of how many bundles each fits.
    """
    c = cfg.cluster
    bundle = {"CPU": c.cpus_per_worker, **({"GPU": 1.0} if c.use_gpu else {})}

    def count(res: Dict[str, float]) -> str:
        return _amount(res.get("CPU", 0), "CPU") + (f", {_amount(res.get('GPU', 0), 'GPU')}" if c.use_gpu else "")

    need = _amount(c.cpus_per_worker, "CPU") + (" + 1 GPU" if c.use_gpu else "")
    have = f"{count(total)} on {_amount(len(nodes), 'node')}"
    if c.use_gpu and not total.get("GPU", 0):
        return [f"cluster.use_gpu=true but the Ray cluster has no GPUs ({have}): set cluster.use_gpu=false or add "
                f"GPU nodes"]

    def slots(res: Dict[str, float]) -> int:
        return min(int(math.floor(res.get(k, 0) / v + 1e-9)) if v > 0 else c.num_workers for k, v in bundle.items())

    per_node = [slots(res) for res in nodes]
    if not any(per_node):
        biggest = max(nodes, key=lambda r: (r.get("GPU", 0) if c.use_gpu else 0, r.get("CPU", 0)), default={})
        return [f"no node of the Ray cluster can hold one worker (cluster.cpus_per_worker={c.cpus_per_worker:g}: "
                f"{need} on one node; the largest node has {count(biggest)}): lower cluster.cpus_per_worker or add a "
                f"node that big"]
    if sum(per_node) < c.num_workers:
        return [f"cluster.num_workers={c.num_workers} workers of {need} each do not fit: the Ray cluster ({have}) "
                f"holds at most {sum(per_node)}: lower cluster.num_workers or cluster.cpus_per_worker, or add nodes"]
    return []


def _amount(n: float, unit: str) -> str:
    """``2 CPUs``, ``1 GPU``, ``0.5 CPU``."""
    return f"{n:g} {unit}{'s' if n > 1 or n == 0 else ''}"


def check_run_dir_shared(run_dir) -> None:
    """On a cluster where workers may run on another node than the driver, a run directory on a local path must be
    one every node sees (a shared filesystem): the driver writes a probe file into it and a zero-CPU task on each
    node that can run workers (it has CPUs or GPUs) reads it back. A node that does not see it would write its
    shards to its own disk — a trajectory half here, half there — so the run is refused before it starts. URIs
    (s3://, gs://) are not probed: every node reaches them, or fails with the storage's own error. The probe's
    name holds ``.tmp-``, which the run-directory checks ignore, should a kill leave it behind.

    Raises:
        ConfigError: one line naming the first node that does not see ``run_dir`` (or does not answer) and the fix.
    """
    # heavy: ray loads here, not when this module is imported
    import ray

    if not run_dir or "://" in run_dir:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive") and
             (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]
    here = ray.get_runtime_context().get_node_id()
    if all(n["NodeID"] == here for n in nodes):  # every worker runs beside the driver (a single-node cluster)
        return

    # heavy: ray loads here, not when this module is imported
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = os.path.abspath(os.path.expanduser(run_dir))
    os.makedirs(path, exist_ok=True)
    token = uuid.uuid4().hex
    probe = os.path.join(path, f".raysub-probe.tmp-{token[:12]}")
    with open(probe, "w") as f:
        f.write(token)
    task = ray.remote(_reads_token)
    refs = [task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(probe, token) for n in nodes]
    reason = "no answer in 120 s"
    try:
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=120)
        for r in pending:
            ray.cancel(r, force=True)
        seen = [ray.get(r) if r in ready else None for r in refs]
    except ray.exceptions.RayError as exc:  # a node died under the probe
        seen, reason = [None] * len(refs), f"the probe failed ({type(exc).__name__})"
    finally:
        os.remove(probe)
    blind = [(n, ok) for n, ok in zip(nodes, seen) if not ok]
    if blind:
        n, ok = blind[0]
        why = "does not see it" if ok is False else reason
        raise ConfigError(f"run_dir={path} is not visible from node {n.get('NodeManagerAddress', '?')} "
                          f"({n['NodeID'][:8]}: {why}; {len(blind)} of the cluster's {len(nodes)} worker nodes): a "
                          f"multi-node cluster needs a run_dir every node reaches: an s3://BUCKET/PATH (or gs://) URI "
                          f"or a shared filesystem path")


def _reads_token(probe: str, token: str) -> bool:
    """Whether this node sees the driver's probe file (as `raysub.faults.node_view` shows it to a test's node)."""
    try:
        with open(faults.node_view(probe)) as f:
            return f.read() == token
    except OSError:
        return False


# Progress queues of this process's Ray session that no fit uses now: each is an actor (a process, ~1.5 CPU-s to
# start on 2 cores), so a driver that runs several fits (`raysub run`: sampling then training; a sweep's trials)
# starts one, not one per fit. {session key: [queue, ...]}; a queue of another session (after ray.shutdown) is
# never handed out.
_idle_queues: Dict[tuple, List[Any]] = {}
_queues_lock = threading.Lock()


def _session_key() -> tuple:
    # heavy: ray loads here, not when this module is imported
    import ray

    ctx = ray.get_runtime_context()
    return ctx.gcs_address, ctx.get_job_id(), ctx.get_node_id()  # a new local cluster: a new node id


def make_progress_queue():
    """A progress queue for one fit: an idle one of this Ray session, emptied, else a new one. Hand it back with
    `release_progress_queue` when the fit has ended."""
    # heavy: ray loads here, not when this module is imported
    from ray.util.queue import Queue

    key = _session_key()
    while True:
        with _queues_lock:
            idle = _idle_queues.get(key)
            queue = idle.pop() if idle else None
        if queue is None:
            return Queue(actor_options={"num_cpus": 0})
        try:
            while True:  # a line the last fit's relay did not take: not this fit's
                queue.get_nowait()
        except pyqueue.Empty:
            return queue
        except Exception:  # its actor died (a lost node): start another
            continue


def release_progress_queue(queue) -> None:
    """Give ``queue`` back for the next fit of this Ray session."""
    # heavy: ray loads here, not when this module is imported
    import ray

    if queue is None or not ray.is_initialized():  # Ray is down (asking it for its context would start it)
        return
    try:
        key = _session_key()
    except Exception:  # Ray is going down: nothing to reuse
        return
    with _queues_lock:
        _idle_queues.setdefault(key, []).append(queue)


def fit_with_progress(trainer, progress, printer: Callable[[Dict[str, Any]], None]):
    """Run ``trainer.fit()`` in a thread, printing each progress dict rank 0 sends (and on stderr each warning line
    a callback sends, `raysub.tracking.show_warning`); return the Result.

    Raises:
        whatever fit raised (a worker's error surfaces as Ray Train's TrainingFailedError).
    """
    # heavy: pyarrow loads here, not when this module is imported
    from raysub.tracking import show_warning

    box: Dict[str, Any] = {}

    def show(item):
        if not show_warning(item):  # a callback's warning from the Train controller goes to stderr
            printer(item)

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
            # one blocking get (the queue actor waits, not the driver polling it every 0.2 s: the polls' RPCs took
            # ~3.5% of a core from the workers, measured by jobs/bench/ddp_overhead.py), then what else is there
            if relay and alive:
                show(progress.get(block=True, timeout=0.5))
            while relay:
                show(progress.get_nowait())
        except pyqueue.Empty:
            pass
        except Exception as exc:  # the queue's actor died (a lost node): training goes on, say so once
            relay = False
            print(f"raysub: warning: progress lines stopped ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                  f"); training continues and its results are still recorded", file=sys.stderr, flush=True)
        if not alive:
            break
        if not relay:
            time.sleep(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def torch_trainer(loop: Callable, loop_config: Dict[str, Any], cfg: Config, name: str, storage, callbacks=None):
    """A TorchTrainer on ``cluster.num_workers`` workers (gloo on CPU, nccl on GPU).

    ``storage`` is where Ray Train keeps the checkpoints: ``RunDir.ray_storage(...)``'s (path, filesystem).
    """
    # heavy: ray loads here, not when this module is imported
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = ScalingConfig(
        num_workers=cfg.cluster.num_workers,
        use_gpu=cfg.cluster.use_gpu,
        resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if cfg.cluster.use_gpu else {})},
    )
    run_config = RunConfig(
        name=name,
        storage_path=storage[0],
        storage_filesystem=storage[1],
        failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        logging_config=LoggingConfig(log_level="WARNING"),  # raysub prints its own progress lines
        callbacks=callbacks,
    )
    for cb in callbacks or []:
        # raysub's callbacks run in the Train controller, whose output a quiet local cluster keeps off the console:
        # their warnings travel on the progress queue, which fit_with_progress relays
        if hasattr(cb, "relay_warnings") and loop_config.get("progress") is not None:
            cb.relay_warnings(loop_config["progress"])
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
    )


def _wrapped(e: BaseException, context: bool = True) -> List[BaseException]:
    """The errors a Ray failure wraps: a task's original exception (``cause``) or the Train controller's
    (``controller_failure``) alone, else every Train worker's (``worker_failures``), the explicit cause and (with
    ``context``) the one being handled when it was raised."""
    # RayTaskError: the original exception; Ray Train's ControllerError: the controller's, whose message is only
    # in the wrapper's second line and whose __cause__ is lost on the way to the driver
    for attr in ("cause", "controller_failure"):
        cause = getattr(e, attr, None)
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
    """Our RaysubError inside a Ray failure (a task, actor or Train worker error), if there is one; else ``exc``."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        # a RayTaskError subclasses its cause's type: the cause, not the wrapper, is the error
        if isinstance(e, RaysubError) and not isinstance(getattr(e, "cause", None), BaseException):
            return e
        stack.extend(_wrapped(e))
    return exc


def failure_kind(exc: BaseException, inner: BaseException) -> str:
    """What failed, in a few words, from the types of a command's error ``exc`` and of the error behind Ray's
    wrappers, ``inner`` (`innermost_error`): a Ray Train worker, the Ray Train controller, a Ray Tune experiment, a
    Ray actor, the Ray cluster, a storage operation, else "the command failed". Ray's types are only looked up when
    Ray is loaded: an error raised before Ray started is none of them."""
    storage = isinstance(inner, OSError)  # pyarrow's ArrowIOError is OSError, and so is a timeout
    if "ray" in sys.modules:
        # heavy: ray loads here, not when this module is imported
        import ray.exceptions as rex
        from ray.tune.error import TuneError

        storage = storage and not isinstance(inner, rex.RayError)  # Ray's GetTimeoutError is a TimeoutError

        try:
            # heavy: ray loads here, not when this module is imported
            from ray.train.v2.api.exceptions import ControllerError, TrainingFailedError
        except ImportError:  # a Ray without Train V2
            ControllerError = TrainingFailedError = ()
        if isinstance(exc, ControllerError):
            return "a storage operation of the Ray Train controller failed" if storage else \
                "the Ray Train controller failed"
        if isinstance(exc, TrainingFailedError):
            return "a Ray Train worker failed"
        if isinstance(exc, TuneError):
            return "a storage operation of the Ray Tune experiment failed" if storage else \
                "the Ray Tune experiment failed"
        if isinstance(exc, rex.RayActorError):
            return "a Ray actor died"
        if isinstance(exc, (rex.RaySystemError, rex.GetTimeoutError, rex.ObjectLostError, rex.NodeDiedError)):
            return "the Ray cluster failed"
    if isinstance(getattr(exc, "worker_failures", None), dict):  # Ray Train V1's TrainingFailedError carries them too
        return "a Ray Train worker failed"
    return "a storage operation failed" if storage else "the command failed"


def innermost_error(exc: BaseException) -> BaseException:
    """The original error behind Ray's wrappers, following the first wrapped one (the first failed worker's)."""
    tune_error = sys.modules.get("ray.tune.error")
    seen = {id(exc)}
    while True:
        # Tune wraps a failure of its own loop as TuneError(traceback text), raised while handling the failure
        inner = _wrapped(exc, context=tune_error is not None and isinstance(exc, tune_error.TuneError))
        if not inner or id(inner[0]) in seen:
            return exc
        exc = inner[0]
        seen.add(id(exc))
