"""Who may talk to the server: the Host check (against DNS rebinding) and the bearer token.

The gate lives in this module rather than in :mod:`viscy.serve.app` because Ray Serve ships the FastAPI
app (and its middleware) to the replica by value: the Ingress replica installs its gate here, where the
middleware's copy finds it.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from viscy.config import ConfigError, ServeConfig, is_loopback
from viscy.serve.codecs import PayloadError


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


@dataclass(frozen=True)
class Gate:
    """What every request passes before any route runs: the Host check and the bearer token."""

    token: str | None
    hosts: frozenset[str] | None  # None: any Host (a non-loopback bind, where the token protects)

    @classmethod
    def for_config(cls, config: ServeConfig) -> Gate:
        if not is_loopback(config.host):  # reached by addresses and names viscy cannot know: the token protects
            return cls(read_token(config), None)
        names = {_host_name(h) for h in [config.host, *config.allowed_hosts]}
        return cls(read_token(config), LOOPBACK_NAMES | names)

    def authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def check(self, request: Request, path: str) -> None:
        """Refuse a foreign Host (403) or, on every route but the public ones, a missing token (401)."""
        if self.hosts is not None and _host_name(request.headers.get("host", "")) not in self.hosts:
            raise PayloadError(403, "this server does not answer to that Host name; use the address it printed "
                                    "(or add the name to allowed_hosts in the serve config)")
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
