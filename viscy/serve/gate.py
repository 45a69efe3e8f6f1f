"""Who may talk to the server: the Host check (against DNS rebinding) and the bearer token, and the
``gatekeeper`` middleware that applies them before any route and turns every error into JSON with a request id.

The gate lives in this module rather than in :mod:`viscy.serve.app` because Ray Serve ships the FastAPI
app (and its middleware) to the replica by value: the Ingress replica installs its gate here, where the
middleware's copy finds it.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from viscy.config import ConfigError
from viscy.serve.codecs import PayloadError
from viscy.serve.config import ServeConfig, is_loopback


def read_token(config: ServeConfig) -> str | None:
    """The bearer token from ``auth_token_file`` or ``auth_token_env`` (None: auth off).

    Raises
    ------
    ConfigError
        If a token source is configured but missing or empty (never fall back to an open server).
    """
    if config.auth_token_file is not None:
        path = Path(config.auth_token_file)
        if not path.is_file():
            raise ConfigError(f"auth_token_file {path} does not exist on the server")
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"auth_token_file {path} is empty")
        return token
    if config.auth_token_env is not None:
        token = os.environ.get(config.auth_token_env, "").strip()
        if not token:
            raise ConfigError(
                f"auth_token_env is {config.auth_token_env} but that variable is unset or empty where the server runs"
            )
        return token
    return None


def _host_name(header: str) -> str:
    """The name of a ``Host`` header without its port (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class Gate:
    """What every request passes before any route runs: where it comes from, its Host, and the bearer token.

    Without a token the server answers only requests from this machine (unless the config says
    ``allow_unauthenticated_network``) and only to a ``Host`` that is an IP address, ``localhost`` or a
    configured name: a web page that reaches it through DNS rebinding sends its own domain name. With a token,
    the token protects every route but the public ones, whatever the Host. Both rules look at the request
    itself, so they hold however the application was deployed (``viscy serve``, ``serve deploy``, KubeRay).
    """

    token: str | None
    names: frozenset[str]  # Host names accepted without a token, besides IP addresses
    network_open: bool  # allow_unauthenticated_network

    @classmethod
    def for_config(cls, config: ServeConfig) -> Gate:
        names = LOOPBACK_NAMES | {_host_name(h) for h in [config.host, *config.allowed_hosts]}
        return cls(read_token(config), frozenset(names), config.allow_unauthenticated_network)

    def authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def check(self, request: Request, path: str) -> None:
        """Refuse (403) a network client or a foreign Host when there is no token, and (401) a missing token."""
        if self.token is None:
            peer = request.client.host if request.client else ""
            if not self.network_open and not is_loopback(peer):
                raise PayloadError(403, "this server has no token, so it answers only on its own machine; set "
                                        "auth_token_env or auth_token_file (or allow_unauthenticated_network: true "
                                        "on a network you trust)")
            host = _host_name(request.headers.get("host", ""))
            if host not in self.names and not _is_ip(host):
                raise PayloadError(403, "this server does not answer to that Host name; use its address (or add "
                                        "the name to allowed_hosts in the serve config)")
        if path not in PUBLIC_PATHS and not self.authorized(request):
            raise PayloadError(401, "missing or wrong bearer token; send Authorization: Bearer <token>")


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Routes that read nothing from the request and tell nothing beyond readiness: the page, the API docs, healthz.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
_installed: list[Gate] = []


def install_gate(gate: Gate) -> None:
    """Make ``gate`` the one every request of this process passes (called by the Ingress replica)."""
    _installed[:] = [gate]


def current_gate() -> Gate | None:
    """The installed gate (None until the Ingress replica has started)."""
    return _installed[0] if _installed else None


# ---------------------------------------------------------------------------------------- middleware
# Ray Serve writes this logger to the replica's own log file (logs/serve/replica_<app>_<deployment>_<id>.log).
log = logging.getLogger("ray.serve")
REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _error(status: int, detail: str, request_id: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "request_id": request_id}, status_code=status, headers=headers)


def _error_of(exc: BaseException) -> BaseException:
    """The error a deployment raised, out of Ray's wrapping (whose text carries a traceback, paths and pids)."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and exc.cause is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


async def gatekeeper(request: Request, call_next) -> Response:
    """Host check and auth before any route reads anything; every error becomes JSON with a request id.

    Input errors are 4xx naming the problem; anything else is a 500 with a fixed text and the request id,
    whose traceback goes to the replica log under that id.
    """
    # Ray Serve's proxy gives every request an id (the client's own x-request-id, if it sent one) and writes it
    # in its access logs and the answer's x-request-id header: the same id names the failure in the replica log.
    request_id = request.headers.get("x-request-id", "")
    if not REQUEST_ID.fullmatch(request_id):
        request_id = uuid.uuid4().hex
    root = request.scope.get("root_path", "")
    path = request.scope["path"]
    path = path[len(root):] if root and path.startswith(root) else path
    try:
        gate = current_gate()
        if gate is None:
            raise PayloadError(503, "the server is starting; retry in a few seconds")
        gate.check(request, path or "/")
        response = await call_next(request)
    except Exception as raised:  # noqa: BLE001 - nothing but a fixed text may reach the client
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
        from starlette.requests import ClientDisconnect

        exc = _error_of(raised)
        if isinstance(exc, PayloadError):
            return _error(exc.status, str(exc), request_id)
        if isinstance(exc, BackPressureError | DeploymentUnavailableError):
            retry = getattr(exc, "retry_after_s", None) or 5
            return _error(503, "the server is busy; retry later", request_id,
                          {"Retry-After": str(math.ceil(retry))})
        if isinstance(exc, ClientDisconnect):
            return _error(400, "the client disconnected before the body arrived", request_id)
        log.error("request %s failed", request_id, exc_info=raised)
        return _error(500, f"internal error; the server logged it as request {request_id}", request_id)
    return response
