"""The stainer scales from 1 to 2 replicas under load and back to 1 when idle (CPU replicas)."""

from __future__ import annotations

import threading
import time

import requests

from tests.serve.conftest import Server, phase_image, raw


def _running_replicas() -> int:
    from ray import serve

    from viscy.ray_utils import ensure_ray

    ensure_ray()
    status = serve.status().applications["viscy"].deployments["VirtualStainer"]
    return status.replica_states.get("RUNNING", 0)


def test_stainer_scales_up_under_load_and_back_down(server: Server) -> None:
    assert _running_replicas() == 1
    body, headers = raw(phase_image((512, 512)))
    stop = threading.Event()
    errors: list[str] = []

    def load() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(f"{server.url}/v1/stain?model=stain2d", data=body, headers=headers, timeout=120)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    try:
        peak = 1
        while time.monotonic() - t0 < 120 and peak < 2:
            peak = max(peak, _running_replicas())
            time.sleep(1)
        up_s = time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert peak == 2, "the stainer did not scale to 2 replicas within 120 s of load"
    t1 = time.monotonic()
    while time.monotonic() - t1 < 120 and _running_replicas() != 1:
        time.sleep(1)
    assert _running_replicas() == 1, "the stainer did not scale back to 1 replica within 120 s"
    print(f"1 -> 2 replicas after {up_s:.0f} s of load, back to 1 after {time.monotonic() - t1:.0f} s idle")
    ok = requests.post(f"{server.url}/v1/stain?model=stain2d", data=body, headers=headers, timeout=120)
    assert ok.status_code == 200
