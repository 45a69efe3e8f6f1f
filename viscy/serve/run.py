"""``viscy serve``: start the Serve application locally or on the cluster at ``RAY_ADDRESS``.

Everything that can be checked without Ray (model files and their metadata, the token source) is checked
first, so a bad config fails in a second instead of after replicas have started.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from viscy.config import ConfigError, absolute_paths
from viscy.errors import ViscyError
from viscy.serve.config import ServeConfig

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 300.0


@dataclass
class ServeResult:
    """A running application: where it answers and what it serves.

    Attributes
    ----------
    url
        Base URL (the page is at ``url + "/"``, the API docs at ``url + "/docs"``).
    app_name
        Ray Serve application name (``serve status`` lists it).
    models
        Served model names.
    health
        The ``/healthz`` answer once ready (providers per model, segmentation methods, auth).
    seconds
        From the call to a healthy ``/healthz``.
    """

    url: str
    app_name: str
    models: list[str]
    health: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def stop(self) -> None:
        """Delete the application (its replicas stop; the Serve proxy of the cluster stays)."""
        from ray import serve

        serve.delete(self.app_name)


def base_url(config: ServeConfig) -> str:
    """The URL clients on this machine use (a wildcard bind is reached on loopback)."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    prefix = "" if config.route_prefix == "/" else config.route_prefix
    return f"http://{host}:{config.port}{prefix}"


def _wait_healthy(url: str, timeout: float, token: str | None = None) -> dict[str, Any]:
    import requests

    deadline = time.monotonic() + timeout
    last = "no answer"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url}/healthz", timeout=10, headers=headers)
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:200]}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise ViscyError(
        f"the application deployed but {url}/healthz did not answer 200 within {timeout:.0f} s (last: {last}). "
        "If Serve already runs on this cluster with other http_options, use its host and port"
    )


def check_capacity(config: ServeConfig) -> None:
    """Refuse settings whose minimum replicas cannot all be placed on this (local, fixed-size) cluster.

    Raises
    ------
    ConfigError
        Naming what the replicas need, what the cluster has and the keys to lower.
    """
    import ray

    have = ray.cluster_resources()
    parts = {"stainer": config.stainer, "segmenter": config.segmenter, "ingress": config.ingress}
    for resource, attr in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = {k: getattr(s, attr, 0.0) * s.autoscaling.min_replicas for k, s in parts.items()}
        total = sum(need.values())
        if total > have.get(resource, 0.0) + 1e-9:
            detail = " + ".join(f"{k}.{attr} {v:g}" for k, v in need.items() if v)
            raise ConfigError(
                f"the replicas need {total:g} {resource} ({detail}, times min_replicas) but this machine's Ray has "
                f"{have.get(resource, 0.0):g}; lower those keys (e.g. --stainer.{attr} 0.5)"
            )


def run_serve(config: ServeConfig) -> ServeResult:
    """Deploy the application and return once ``/healthz`` answers 200 (non-blocking; ``stop()`` removes it).

    Raises
    ------
    ModelError
        If a model path is missing or a file lacks the metadata of ``viscy export``.
    ConfigError
        If a configured token source is missing or empty.
    """
    from viscy.ray_utils import ensure_ray
    from viscy.serve.app import build_app
    from viscy.serve.gate import read_token
    from viscy.serve.models import find_models

    t0 = time.perf_counter()
    config = absolute_paths(config)
    models = find_models(config.models)
    joining = bool(os.environ.get("RAY_ADDRESS"))
    if config.detach and not joining:
        raise ConfigError("detach leaves the application on a cluster: set RAY_ADDRESS to one (ray start --head)")
    try:
        token = read_token(config)  # here it also lets healthz tell the details
    except ConfigError:
        if not joining:  # the replicas read it on this machine: fail now rather than in every replica
            raise
        token = None  # a cluster's replicas read their own
    ensure_ray()
    if not joining:
        check_capacity(config)
    from ray import serve

    serve.start(http_options={"host": config.host, "port": config.port,
                              "request_timeout_s": config.request_timeout_s})
    try:
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    except RuntimeError as exc:
        raise ViscyError(
            f"the application failed to start: {str(exc).strip().splitlines()[-1]}; the replica logs are in "
            "/tmp/ray/session_latest/logs/serve/"
        ) from exc
    url = base_url(config)
    health = _wait_healthy(url, READY_TIMEOUT_S, token)
    return ServeResult(url, config.app_name, list(models), health, time.perf_counter() - t0)


def _describe(result: ServeResult, config: ServeConfig) -> str:
    from viscy.serve.models import find_models

    models = find_models(absolute_paths(config).models)
    lines = [f"viscy serve: {len(models)} model(s) at {result.url} (application {result.app_name!r}, "
             f"ready in {result.seconds:.0f} s)"]
    for name, m in models.items():
        provider = result.health.get("providers", {}).get(name, "?")
        card = m.card
        lines.append(f"  {name}: {', '.join(card.source_channels)} -> {', '.join(card.target_channels)} "
                     f"(Z {card.spec.z_window_size}->{card.spec.out_depth}, {provider})")
    lines.append(f"  segmentation: {', '.join(result.health.get('segmentation', []))}")
    lines.append(f"  page {result.url}/   API docs {result.url}/docs   health {result.url}/healthz")
    token_set = config.auth_token_env is not None or config.auth_token_file is not None
    lines.append("  auth: bearer token required" if token_set
                 else "  auth: off (set auth_token_env or auth_token_file to require a bearer token)")
    return "\n".join(lines)


def serve_forever(config: ServeConfig) -> ServeResult:
    """The CLI: deploy, print where it answers, then serve until Ctrl-C (or SIGTERM), or return if detached."""
    result = run_serve(config)
    print(_describe(result, config), flush=True)
    if config.detach:
        print(f"  left running on the cluster; stop it with: serve delete {result.app_name}", flush=True)
        return result
    print("  Ctrl-C stops it.", flush=True)

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("viscy serve: stopping ...", flush=True)
        result.stop()
        print("viscy serve: stopped", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return result
