"""Starting or joining Ray the same way in every stage."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at ``RAY_ADDRESS`` or start a local one, once per process.

    A local cluster that viscy starts uses Ray's token authentication. When joining a cluster, the client
    follows that cluster's mode: export ``RAY_AUTH_MODE=token`` for a token-protected cluster (Ray's default
    since 2.59), leave it unset for one started with ``RAY_AUTH_MODE=disabled``.

    The dashboard stays on: Ray Train/Tune need its state API to clean up placement groups. What workers
    print goes to the log file (:mod:`viscy.console`), not the console.
    """
    joining = bool(os.environ.get("RAY_ADDRESS"))
    # Not joining, ``import viscy`` has set RAY_AUTH_MODE=token (Ray reads it at import): our own cluster
    # gets token auth; joining, the user's setting for that cluster stands.
    import ray

    from viscy.console import quiet_loggers, route_worker_logs, verbose

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
        port = free_port()
        ray.init(
            address="local",
            num_cpus=num_cpus,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
            **kwargs,
        )
    import ray.data  # noqa: F401  (configures Ray Data's loggers, which quiet_loggers then routes)

    quiet_loggers()
    route_worker_logs()


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
