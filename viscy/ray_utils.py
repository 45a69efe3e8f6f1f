"""Starting or joining Ray the same way in every stage."""

from __future__ import annotations

import os


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
