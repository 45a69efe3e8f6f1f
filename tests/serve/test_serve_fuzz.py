"""A fuzz campaign against the live server: generated and mutated requests, then properties of every answer.

Hypothesis generates 2,000 requests (methods, routes, query parameters, headers, shapes, dtypes and
bodies: valid images in every encoding, corrupted ones and random bytes). Every answer must come within a
time bound, be no 5xx, carry no traceback or server path, and the replicas' memory must stay bounded; a
good request succeeds afterwards. The seed is fixed (``derandomize``), so CI runs the same campaign.

Cellpose is left out of the generated methods: on CPU one 256 x 256 plane of Cellpose-SAM takes ~40 s,
which is the cost of a valid request rather than of a hostile one (its limits are tested in test_serve_http).
"""

from __future__ import annotations

import json
import random
import time

import numpy as np
import psutil
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import LEAKS, Server, phase_image, raw, serve_args
from tests.serve.hostile import bombs, encode, mutated

BODY_ROUTES = ["/v1/stain", "/v1/segment", "/v1/stain-and-segment"]
# the routes that read a body, weighted up: they are where decoding and the models' work happen
ROUTES = BODY_ROUTES * 5 + ["/v1/models", "/healthz", "/", "/docs", "/openapi.json", "/v1/../healthz",
                            "/v1/stain/", "/nothing", "/v1/" + "a" * 300]
OTHER_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
CONTENT_TYPES = ["application/octet-stream", "application/x-npy", "image/tiff", "image/png", "text/plain",
                 "application/json", "image/png; charset=utf-8", "", "multipart/form-data; boundary=x"]
QUERY_VALUES = st.one_of(
    st.sampled_from(["stain2d", "stain25d", "two_layer", "classical", "nope", "true", "false", "0", "1", "-1",
                     "1e308", "nan", "inf", "Nuclei", "Membrane", "DAPI", "", "3.5", "400", "4", "100000"]),
    st.text(max_size=12),
)
QUERY_KEYS = st.sampled_from(["model", "method", "diameter", "channel", "segment_channel", "normalize",
                              "denormalize", "foo"])
# What an HTTP header can carry (latin-1, no control characters).
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
                      max_size=40)
REQUEST_BOUND_S = 30.0
MEMORY_GROWTH_BOUND = 512 * 1024 * 1024


def _replica_rss() -> dict[int, int]:
    """Resident memory of this machine's Serve replica processes, by pid."""
    out = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ServeReplica:" in cmd:
            try:
                out[proc.info["pid"]] = proc.memory_info().rss
            except psutil.Error:
                pass
    return out


@st.composite
def http_requests(draw) -> dict:
    # Weighted choices come from a plain Random seeded by Hypothesis (so a failing case replays): Hypothesis's own
    # draws favour simple values (0, the first element), which makes a 1-in-20 choice come up far more often.
    rnd = random.Random(draw(st.integers(0, 2**64)))
    route = rnd.choice(ROUTES)
    reads_body = route in BODY_ROUTES
    method = rnd.choice(["POST"] * 20 + OTHER_METHODS) if reads_body else rnd.choice(["GET"] * 6 + OTHER_METHODS)
    query = draw(st.dictionaries(QUERY_KEYS, QUERY_VALUES, max_size=4)) if rnd.random() < 0.5 else {}
    if rnd.random() < 0.7:  # most requests name a served model
        query["model"] = rnd.choice(["stain2d", "stain25d", "two_layer"])
    kind = rnd.choice(CONTENT_TYPES)
    ndim = rnd.choice([1, 2, 2, 2, 3, 3, 4, 5])
    shape = tuple([rnd.randint(1, 4) for _ in range(ndim - 2)] + [rnd.randint(1, 40) for _ in range(min(ndim, 2))])
    dtype = rnd.choice(["float32", "uint16", "uint8", "float64", "int32"])
    arr = np.random.default_rng(rnd.randrange(2**16)).normal(10, 3, size=shape).astype(dtype)
    body = draw(mutated(encode(arr, kind.split(";")[0])))
    headers = {"Content-Type": kind}
    if rnd.random() < 0.7:
        headers["X-Dtype"] = rnd.choice([dtype] * 4 + ["float32", "complex64", "object", "<U8", "x", "V4"])
    if rnd.random() < 0.7:
        headers["X-Shape"] = draw(st.one_of(
            st.just(",".join(map(str, shape))),
            st.lists(st.integers(-1, 2**64), max_size=7).map(lambda v: ",".join(map(str, v))),
            st.text(alphabet="0123456789,x -", max_size=40),
        )) if rnd.random() < 0.3 else ",".join(map(str, shape))
    if rnd.random() < 0.15:
        headers["X-Viscy-Statistics"] = draw(st.one_of(
            st.just("[" * 2000),
            st.dictionaries(st.sampled_from(["Phase3D", "Nuclei", "x"]),
                            st.dictionaries(st.sampled_from(["median", "iqr", "mean", "std"]),
                                            st.floats(allow_nan=False, allow_infinity=False, width=32),
                                            max_size=3), max_size=2).map(json.dumps),
            HEADER_TEXT,
        ))
    if rnd.random() < 0.2:
        headers["Accept"] = rnd.choice(["application/json", "application/x-npz", "image/tiff", "*/*", "text/html",
                                        "application/octet-stream", ""])
    if rnd.random() < 0.05:
        headers["Host"] = rnd.choice(["evil.example", "127.0.0.1.nip.io", "localhost:1", "[::1]:80"])
    if rnd.random() < 0.05:
        headers["Authorization"] = rnd.choice(["Bearer x", "Basic y", "", "Bearer " + "z" * 500])
    # what an HTTP client can send at all: no leading or trailing white space in a header value
    headers = {k: v.strip() for k, v in headers.items()}
    return {"method": method, "route": route, "params": query, "headers": headers, "body": body}


def _check_answer(r: requests.Response, seconds: float, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    assert not 300 <= r.status_code < 400, f"{what}: redirected to {r.headers.get('location')}"
    assert seconds < REQUEST_BOUND_S, f"{what}: answered in {seconds:.1f} s"
    text = r.content[:65536].decode("latin-1")
    assert not LEAKS.search(text), f"{what}: leaked {LEAKS.search(text).group(0)!r} in {text[:300]}"
    if r.status_code >= 400 and r.headers.get("content-type") == "application/json" and r.content:  # HEAD: no body
        answer = r.json()
        assert answer["detail"], what
        if r.status_code not in (404, 405):  # FastAPI's own routing answers carry no request id
            assert answer["request_id"], what


def test_2000_generated_requests_get_bounded_4xx_or_good_answers(server: Server) -> None:
    session = requests.Session()
    good_body, good_headers = raw(phase_image((48, 48)))

    def good() -> None:
        r = session.post(f"{server.url}/v1/stain?model=stain2d", data=good_body, headers=good_headers, timeout=60)
        assert r.status_code == 200, r.text

    good()
    before = _replica_rss()
    # the bombs of test_serve_limits, sent to every route that reads a body
    for name, (make, kind, x_dtype, x_shape) in bombs(serve_args(server.models_dir, None)["max_image_pixels"]).items():
        headers = {"Content-Type": kind, **({"X-Dtype": x_dtype} if x_dtype else {}),
                   **({"X-Shape": x_shape} if x_shape else {})}
        for route in ("/v1/stain?model=stain2d", "/v1/stain?model=two_layer", "/v1/segment",
                      "/v1/stain-and-segment?model=stain2d"):
            t0 = time.monotonic()
            r = session.post(f"{server.url}{route}", data=make(), headers=headers, timeout=60)
            _check_answer(r, time.monotonic() - t0, f"{name} -> {route}")
            assert r.status_code in (413, 422), f"{name} -> {route}: {r.status_code} {r.text[:200]}"
    statuses: dict[int, int] = {}

    @settings(max_examples=2000, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(req=http_requests())
    def campaign(req: dict) -> None:
        t0 = time.monotonic()
        r = session.request(req["method"], f"{server.url}{req['route']}", params=req["params"],
                            headers=req["headers"], data=req["body"], timeout=60, allow_redirects=False)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        _check_answer(r, time.monotonic() - t0, f"{req['method']} {req['route']} {req['params']} "
                                               f"{ {k: v[:40] for k, v in req['headers'].items()} }")

    t0 = time.monotonic()
    campaign()
    seconds = time.monotonic() - t0
    good()
    after = _replica_rss()
    growth = sum(after.get(pid, 0) - rss for pid, rss in before.items())
    print(f"fuzz: {sum(statuses.values())} requests in {seconds:.0f} s, statuses {dict(sorted(statuses.items()))}, "
          f"replica RSS {sum(before.values()) / 2**20:.0f} -> {sum(after.values()) / 2**20:.0f} MiB")
    assert sum(statuses.values()) >= 2000
    assert statuses.get(200, 0) >= 200, statuses  # the campaign reached the models, not only the refusals
    assert growth < MEMORY_GROWTH_BOUND, f"replica memory grew by {growth / 2**20:.0f} MiB"
