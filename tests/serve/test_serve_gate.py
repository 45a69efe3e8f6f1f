"""The Ingress middleware on a FastAPI app of its own, through Starlette's ASGI test client (no Ray Serve).

What it must do for every route: the Host check and the token before the route runs, input errors as 4xx
naming them, Ray's wrapped errors unwrapped, and any other failure as a 500 with a fixed text and a request
id whose traceback goes to the log.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from tests.serve.conftest import LEAKS
from viscy.serve.codecs import PayloadError
from viscy.serve.config import ServeConfig
from viscy.serve.gate import Gate, current_gate, gatekeeper, install_gate


def _app(seen: list[str], tmp_path: Path) -> FastAPI:
    app = FastAPI()
    app.middleware("http")(gatekeeper)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/route")
    async def route(request: Request) -> dict:
        seen.append(request.url.path)
        kind = request.query_params.get("fail")
        if kind == "input":
            raise PayloadError(422, "the image is too small; send at least 8 x 8")
        if kind == "bug":
            raise RuntimeError(f"secret state at {tmp_path} in pid 1234")
        if kind == "replica":  # what a handle call raises when a replica raised a PayloadError
            raise RayTaskError("segment", "Traceback ...\n  File \"/work/x.py\"", PayloadError(400, "bad plane"))
        if kind == "replica-bug":
            raise RayTaskError("segment", "Traceback ...", ValueError("ip=10.0.0.1 node_id=abc"))
        if kind == "busy":
            raise BackPressureError(num_queued_requests=9, max_queued_requests=8)
        return {"ok": True}

    return app


@pytest.fixture
def gate_of():
    previous = current_gate()
    yield lambda config: install_gate(Gate.for_config(config))
    if previous is not None:
        install_gate(previous)


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gate_of):
    seen: list[str] = []
    monkeypatch.setenv("GATE_TEST_TOKEN", "tok")
    gate_of(ServeConfig(models=[tmp_path], auth_token_env="GATE_TEST_TOKEN"))
    # a client on the network (the token is what protects then)
    with TestClient(_app(seen, tmp_path), base_url="http://viscy.lab.example:8000", client=("10.0.0.7", 50000),
                    raise_server_exceptions=False) as c:
        yield c, seen


AUTH = {"Authorization": "Bearer tok"}


def test_the_token_is_checked_before_any_route_runs(client) -> None:
    c, seen = client
    assert c.post("/v1/route", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.post("/v1/route", headers={"Authorization": "Basic tok"}).status_code == 401
    assert c.post("/v1/route?fail=bug").status_code == 401
    assert c.post("/v1/nothing").status_code == 401
    assert seen == []
    assert c.get("/healthz").json() == {"status": "ok"}  # open, and tells nothing but readiness
    for host in ("viscy.lab.example", "10.0.0.2:8000", "localhost"):  # with a token, any name the cluster uses
        assert c.post("/v1/route", headers={**AUTH, "Host": host}).json() == {"ok": True}
    assert len(seen) == 3


def test_without_a_token_only_this_machine_and_plain_host_names_get_answers(tmp_path: Path, gate_of) -> None:
    seen: list[str] = []
    gate_of(ServeConfig(models=[tmp_path]))
    app = _app(seen, tmp_path)
    with TestClient(app, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 5)) as local:
        assert local.post("/v1/route").json() == {"ok": True}
        for host in ("localhost:8000", "[::1]:9", "127.0.0.1", "192.168.1.20:8000"):
            assert local.post("/v1/route", headers={"Host": host}).status_code == 200, host
        # DNS rebinding: a page of attacker.example whose name now resolves to 127.0.0.1
        for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.nip.io", ""):
            r = local.post("/v1/route", headers={"Host": host})
            assert r.status_code == 403 and "Host" in r.json()["detail"], host
    with TestClient(app, base_url="http://10.0.0.5:8000", client=("10.0.0.7", 5)) as remote:
        r = remote.post("/v1/route")
        assert r.status_code == 403 and "auth_token_env" in r.json()["detail"]
        assert remote.get("/healthz").status_code == 403
    assert len(seen) == 5
    gate_of(ServeConfig(models=[tmp_path], allow_unauthenticated_network=True, allowed_hosts=["scope.lab"]))
    with TestClient(app, base_url="http://10.0.0.5:8000", client=("10.0.0.7", 5)) as remote:
        assert remote.post("/v1/route").status_code == 200
        assert remote.post("/v1/route", headers={"Host": "scope.lab:8000"}).status_code == 200
        assert remote.post("/v1/route", headers={"Host": "attacker.example"}).status_code == 403


def test_errors_are_json_with_a_request_id_and_never_leak(client) -> None:
    c, _ = client
    r = c.post("/v1/route?fail=input", headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"].startswith("the image is too small")
    assert r.json()["request_id"]
    r = c.post("/v1/route?fail=replica", headers=AUTH)
    assert r.status_code == 400 and r.json()["detail"] == "bad plane"
    r = c.post("/v1/route?fail=busy", headers=AUTH)
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    serve_log = logging.getLogger("ray.serve")  # what Ray Serve writes to the replica's log file
    serve_log.addHandler(handler)
    try:
        for kind in ("bug", "replica-bug"):
            r = c.post(f"/v1/route?fail={kind}", headers={**AUTH, "x-request-id": f"req-{kind}"})
            assert r.status_code == 500
            assert r.json() == {"detail": f"internal error; the server logged it as request req-{kind}",
                                "request_id": f"req-{kind}"}
            assert not LEAKS.search(r.text)
    finally:
        serve_log.removeHandler(handler)
    logged = "\n".join(rec.getMessage() + str(rec.exc_info) for rec in records)
    assert "req-bug" in logged and "secret state" in logged  # the operator gets the details, under the id
    r = c.post("/v1/route?fail=bug", headers={**AUTH, "x-request-id": "<script>"})
    assert r.status_code == 500 and "<script>" not in r.text  # a client's id is echoed only when it is plain
