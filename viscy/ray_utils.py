"""Starting or joining Ray the same way in every stage; the only module that uses Ray's private names.

Everything viscy needs from Ray beyond its public API sits in the functions of the last section, each naming
the private names it relies on and the Ray version they were checked on (2.60.0). ``tests/test_ray_utils.py``
fails, naming the function to update, when a Ray upgrade removes or changes one of them.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator
from typing import Any

# Settings of a cluster viscy starts for itself (never of one it joins).
PRIVATE_CLUSTER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
IDLE_WORKER_KEEP_MS = 60_000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, held back from the OS's own choices for a minute.

    The port is left in TIME_WAIT (``ephemeral_port_reserve``): until it is bound, no other process asking the OS
    for any free port (Ray's workers and gRPC servers do, all the time) is given it, while Ray's dashboard, which
    binds with SO_REUSEADDR, still can. A port only found free was taken in between on a busy host.
    """
    import ephemeral_port_reserve

    return int(ephemeral_port_reserve.reserve("127.0.0.1"))


_START_THREAD = "viscy-ray-start"
_background_start: dict[str, Any] = {}


def start_ray_in_background() -> None:
    """Begin :func:`ensure_ray` in a background thread, so Ray starts while this process goes on with checks.

    Ray's start mostly waits on the processes it launches (GCS, dashboard, raylet), so it overlaps the config
    check's torch and model imports. The next :func:`ensure_ray` waits for it and raises what it raised;
    :func:`settle_background_start` waits for it on a path that ends before. The thread then stays blocked
    for the life of the process: Ray's head processes are killed when the thread that started them ends.
    """
    import logging
    import signal
    import sys
    import threading

    ray = sys.modules.get("ray")  # not imported here: the thread imports it
    if _background_start or (ray is not None and ray.is_initialized()):
        return
    if threading.current_thread() is threading.main_thread():
        # What ray.init sets up in the main thread only: on SIGTERM (`ray job stop`) exit through the atexit
        # handlers, so Ray shuts down; the warning it logs when called from another thread is then moot.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    logging.getLogger(RAY_WORKER_LOGGER).addFilter(
        lambda record: not str(record.msg).startswith("SIGTERM handler is not set")
    )
    ready = threading.Event()

    def start() -> None:
        try:
            ensure_ray()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the thread that waits for it)
            _background_start["error"] = exc
        ready.set()
        threading.Event().wait()

    _background_start["ready"] = ready
    threading.Thread(target=start, name=_START_THREAD, daemon=True).start()


def settle_background_start() -> BaseException | None:
    """Wait for a Ray start begun by :func:`start_ray_in_background`; return what it raised (None if fine).

    A command that ends before its :func:`ensure_ray` calls this first, so its exit handlers shut down a
    started cluster instead of racing ``ray.init``.
    """
    import threading

    ready = _background_start.get("ready")
    if ready is None or threading.current_thread().name == _START_THREAD:
        return None
    ready.wait()
    return _background_start.pop("error", None)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at ``RAY_ADDRESS`` or start a local one, once per process.

    If :func:`start_ray_in_background` began it, wait for that start instead (``num_cpus`` is then Ray's
    default, the node's CPUs) and raise what it raised.

    A local cluster that viscy starts uses Ray's token authentication. When joining a cluster, the client
    follows that cluster's mode: export ``RAY_AUTH_MODE=token`` for a token-protected cluster (Ray's default
    since 2.59), leave it unset for one started with ``RAY_AUTH_MODE=disabled``.

    The dashboard stays on: Ray Train/Tune need its state API to clean up placement groups. What workers
    print goes to the log file (:mod:`viscy.console`), not the console.
    """
    error = settle_background_start()
    if error is not None:
        raise error
    joining = bool(os.environ.get("RAY_ADDRESS"))
    # Not joining, ``import viscy`` has set RAY_AUTH_MODE=token (Ray reads it at import): our own cluster
    # gets token auth; joining, the user's setting for that cluster stands.
    import ray

    from viscy.console import log_worker_lines, quiet_loggers, verbose

    if ray.is_initialized():
        return
    kwargs: dict = {
        "include_dashboard": True,
        "log_to_driver": True,
        "configure_logging": True,
        "logging_level": "INFO" if verbose() else "WARNING",
    }
    if joining:
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        # address="local" always starts a private cluster, never joining one that `ray start` left running.
        # Workers find the state API through RAY_API_SERVER_ADDRESS. Without it they read the address file a
        # `ray start` left in /tmp/ray (stale, or another cluster's), and Ray Train's placement-group cleaner
        # then cannot remove a stopped Tune trial's reservation.
        # On this private single-node cluster: no node can be preempted, so Ray Train's preemption watcher
        # (one more process importing Ray Train) is off, in this process and in every worker (tune trials).
        port = free_port()
        private_env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", **PRIVATE_CLUSTER_ENV}
        os.environ.update(PRIVATE_CLUSTER_ENV)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": private_env},
            _system_config={
                # Ray kills a worker idle for 1 s once more processes run than the node has CPUs (always, with
                # Train's actors): the read workers warmed while the worker group starts must outlive that wait.
                "idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS,
                # Ray starts one idle worker per CPU for the first driver, but only a job without a runtime env
                # can use them (this one has env vars): they would only take CPU while the cluster starts.
                "prestart_worker_first_driver": False,
            },
            **kwargs,
        )
        atexit.register(stop_autoscaler_monitor)  # atexit runs it before Ray's own shutdown (registered earlier)
    import ray.data  # noqa: F401  (configures Ray Data's loggers, which quiet_loggers then routes)

    quiet_loggers()
    route_worker_output(log_worker_lines, console=verbose())


def as_completed(refs: list, desc: str, unit: str, progress: bool = True) -> Iterator[tuple[Any, Any]]:
    """Yield ``(ref, result)`` for Ray object refs as they finish, with a progress bar.

    A task that failed with a :class:`~viscy.errors.ViscyError` re-raises that error (its message names
    the fix) instead of Ray's wrapped traceback.
    """
    import ray
    from tqdm.auto import tqdm

    from viscy.errors import ViscyError

    pending = list(refs)
    with tqdm(total=len(pending), desc=desc, unit=unit, disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, ViscyError):
                    raise exc.cause from None
                raise
            bar.update(1)
            yield done[0], result


def _sees(path: str) -> bool:
    return os.path.exists(path)


def check_shared_path(path: str, what: str) -> str | None:
    """On a cluster of several nodes, check that every node sees the local directory ``path``.

    Parameters
    ----------
    path
        A local directory (URIs are shared by nature and not checked).
    what
        The setting that named it, for messages (e.g. ``trainer.storage_path``).

    Returns
    -------
    A note for the console when ``path`` is local on several nodes and all of them see it (a shared
    filesystem), None on one node. Raises ``ConfigError`` naming the nodes that do not see it.
    """
    import uuid
    from pathlib import Path

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from viscy.config import ConfigError

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2 or "://" in path:
        return None
    folder = Path(path).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".viscy_shared_check_{uuid.uuid4().hex}"
    marker.touch()
    probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
    try:
        refs = {
            n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for n in nodes
        }
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=120)
        seen = {name: (ray.get(ref) if ref in ready else None) for name, ref in refs.items()}
    finally:
        marker.unlink(missing_ok=True)
    blind = [name for name, ok in seen.items() if ok is False]
    silent = [name for name, ok in seen.items() if ok is None]
    if blind:
        raise ConfigError(
            f"{what} {folder} is a local path that node(s) {', '.join(blind)} of this {len(nodes)}-node cluster do "
            f"not see; workers there could not write or read it. Point {what} at a filesystem every node mounts, "
            "or at a URI (s3://bucket/path, gs://bucket/path)"
        )
    if silent:
        return (
            f"warning: {what} {folder} is a local path on a {len(nodes)}-node cluster, and node(s) "
            f"{', '.join(silent)} did not answer whether they see it. Unless every node mounts it, use a URI "
            "(s3://, gs://)"
        )
    return (
        f"note: {what} {folder} is a local path on a {len(nodes)}-node cluster; every node sees it now (a shared "
        "filesystem). Node-local disks would need a URI (s3://, gs://) instead"
    )


# ------------------------------------------------------------------------------------ Ray's private names
# Each function below relies on names outside Ray's public API, checked on Ray 2.60.0 (ray 2.60.0, commit b7f4259).
# tests/test_ray_utils.py checks that they exist with the signatures used here.

# The logger of ray._private.worker, whose "SIGTERM handler is not set" warning a start in a thread triggers.
RAY_WORKER_LOGGER = "ray._private.worker"
RAY_CONSOLE_HANDLER = "ray_print_logs"  # the name ray.init gives its console printer in the dispatcher
VISCY_LOG_HANDLER = "viscy_worker_logs"


def route_worker_output(handler: Callable[[dict[str, Any]], None], console: bool) -> bool:
    """Hand every batch of lines that Ray workers print (``{"lines", "pid", "actor_name", ...}``) to ``handler``.

    With ``console`` False, Ray stops printing them on this driver's console, and the raylet's messages to the
    driver (e.g. "N PYTHON worker processes have been started"), which bypass the dispatcher, go to ``handler``
    too. Ray has no public way to do this: ``ray.init(log_to_driver=False)`` keeps worker output out of the
    driver altogether (only in the session's log folder). Returns False where this Ray lacks the dispatcher:
    worker output then stays on the console.

    Private (Ray 2.60.0): ``ray._private.ray_logging.global_worker_stdstream_dispatcher`` with
    ``add_handler(name, handler)`` / ``remove_handler(name)`` and the ``"ray_print_logs"`` handler that
    ``ray.init(log_to_driver=True)`` adds; ``ray._private.worker.print_to_stdstream(data, ignore_prefix)``.
    """
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    if not console:
        dispatcher.remove_handler(RAY_CONSOLE_HANDLER)
        ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: handler(data)
    dispatcher.remove_handler(VISCY_LOG_HANDLER)
    dispatcher.add_handler(VISCY_LOG_HANDLER, handler)
    return True


def train_controller_env_vars() -> dict[str, str] | None:
    """The env vars Ray Train gives its controller actor, which its dataset coordinators pass on to read tasks.

    Ray reuses an idle worker only for a task of the same runtime env: workers warmed for Ray Train's read tasks
    must be started with these. None where Ray's names are missing (the warm-up then misses, nothing fails).

    Private (Ray 2.60.0): ``ray.train.v2._internal.constants.get_env_vars_to_propagate()`` and
    ``DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE``,
    ``ray._common.constants.RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR`` (what
    ``DataParallelTrainer._initialize_and_run_controller`` puts in the controller's runtime env).
    """
    try:
        from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
        from ray.train.v2._internal.constants import (
            DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
            get_env_vars_to_propagate,
        )
    except ImportError:
        return None
    env_vars = get_env_vars_to_propagate()
    env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    return env_vars


def stop_autoscaler_monitor() -> None:
    """Stop the autoscaler monitor of the cluster this process started, before Ray's shutdown does.

    Ray's shutdown stops the GCS first; the monitor, told to stop after it, reports its own end to the gone
    GCS and is killed only after a 1 s timeout, so every command would exit 1 s later. A single-node cluster's
    monitor holds nothing: it is killed (told to stop, it would report an autoscaler failure to the driver).

    Private (Ray 2.60.0): ``ray._private.worker._global_node`` (None once Ray shut down) and its
    ``all_processes`` (process type to ``ProcessInfo`` list, each with ``.process``, a ``subprocess.Popen``),
    ``ray._private.ray_constants.PROCESS_TYPE_MONITOR``.
    """
    import ray._private.worker as ray_worker
    from ray._private.ray_constants import PROCESS_TYPE_MONITOR

    node = getattr(ray_worker, "_global_node", None)
    for info in (getattr(node, "all_processes", None) or {}).get(PROCESS_TYPE_MONITOR, []):
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait(timeout=5)
