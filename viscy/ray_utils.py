"""Starting or joining Ray the same way in every stage."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at ``RAY_ADDRESS`` or start a local one, once per process.

    The dashboard stays on: Ray Train/Tune need its state API to clean up placement groups.
    """
    # Ray reads the auth mode when it is imported; clients of a token-protected cluster need "token".
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {
        "include_dashboard": True,
        "log_to_driver": True,
        "configure_logging": True,
        "logging_level": "ERROR",
    }
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        # address="local" always starts a private cluster, never joining one that `ray start` left running.
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", **kwargs)


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
