"""Soak of ``viscy serve`` under a hostile mix: good and hostile requests at concurrency 8 for minutes.

Usage::

    python benchmarks/bench_serve_soak.py                      # 3 minutes, concurrency 8, half hostile
    python benchmarks/bench_serve_soak.py --minutes 10 --json soak.json
    python benchmarks/bench_serve_soak.py --quick              # 30 s smoke

A local Ray cluster is started and the application deployed through ``viscy.api.serve`` with its default
limits, except ``max_image_pixels`` (``--max-pixels``, so that a bomb is many times the limit while staying a
small request). The baseline is the same good requests alone at the same concurrency, measured first in the
same run; then the mix runs for ``--minutes``. Hostile requests are small (under 1 MB each): compressed
TIFFs whose tiles all point at one block, a tile far larger than its image, a PNG over the limit, ``.npy``
and raw headers claiming huge shapes, shape products that overflow, many tiny planes, out-of-range
diameters, deeply nested statistics headers, unknown models and a foreign ``Host``.

Printed: good-request latency p50/p95 alone and under the mix (and their ratio), the statuses of the hostile
requests (all must be 4xx), failed good requests (must be 0), and the replicas' summed resident memory at
the start and end of the mix (must end within 10 %) and its peak.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from viscy import api  # first: sets Ray's auth mode before ray is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_serve import export_model, free_port, phase_image  # noqa: E402

from tests.serve.hostile import bombs  # noqa: E402  (the decoder bombs of the suite's fuzz campaign)


def replica_rss(deployment: str = "") -> int:
    """Summed resident memory of this machine's Serve replica processes (of one deployment, if named)."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        if f"ServeReplica:soak:{deployment}" in " ".join(proc.info["cmdline"] or []):
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
    return total


DEPLOYMENTS = ("Ingress", "VirtualStainer", "Segmenter")


def hostile_requests(max_pixels: int) -> list[tuple[str, str, dict[str, str], bytes]]:
    """(name, path and query, headers, body) of small requests built to cost the server as much as possible."""
    raw = {"Content-Type": "application/octet-stream", "X-Dtype": "float32"}
    small = phase_image(64)
    routes = ["/v1/stain", "/v1/segment", "/v1/stain-and-segment"]
    cases = []
    for i, (name, (make, kind, x_dtype, x_shape)) in enumerate(bombs(max_pixels).items()):
        headers = {"Content-Type": kind, **({"X-Dtype": x_dtype} if x_dtype else {}),
                   **({"X-Shape": x_shape} if x_shape else {})}
        cases.append((name, routes[i % 3], headers, make()))
    cases += [
        ("4000 planes of 8x8", "/v1/segment", {**raw, "X-Shape": "4000,8,8"},
         np.zeros((4000, 8, 8), np.float32).tobytes()),
        ("diameter 1e5", "/v1/segment?diameter=100000", {**raw, "X-Shape": "64,64"}, small.tobytes()),
        ("diameter 0.01", "/v1/segment?diameter=0.01&method=cellpose", {**raw, "X-Shape": "64,64"}, small.tobytes()),
        ("nested statistics", "/v1/stain", {**raw, "X-Shape": "64,64", "X-Viscy-Statistics": "[" * 5000},
         small.tobytes()),
        ("unknown model", "/v1/stain?model=" + "x" * 200, {**raw, "X-Shape": "64,64"}, small.tobytes()),
        ("foreign Host", "/v1/models", {"Host": "attacker.example"}, b""),
        ("random bytes as TIFF", "/v1/stain", {"Content-Type": "image/tiff"}, random.Random(0).randbytes(50_000)),
    ]
    for name, _, _, body in cases:
        assert len(body) < 1 << 20, f"{name} is {len(body)} bytes, not a small request"
    return cases


def run_clients(url: str, duration: float, concurrency: int, hostile_fraction: float,
                hostile: list[tuple[str, str, dict[str, str], bytes]], good: tuple[dict[str, str], bytes],
                on_tick: Any = None) -> dict[str, Any]:
    """``concurrency`` threads sending good (and hostile) requests until ``duration`` has passed."""
    import requests

    lock = threading.Lock()
    good_latencies: list[float] = []
    good_failures: list[str] = []
    hostile_statuses: dict[str, dict[int, int]] = {}
    stop = time.monotonic() + duration

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        while time.monotonic() < stop:
            if hostile and rng.random() < hostile_fraction:
                name, path, headers, body = rng.choice(hostile)
                method = "GET" if path == "/v1/models" else "POST"
                r = session.request(method, url + path, headers=headers, data=body, timeout=120)
                with lock:
                    counts = hostile_statuses.setdefault(name, {})
                    counts[r.status_code] = counts.get(r.status_code, 0) + 1
            else:
                t0 = time.perf_counter()
                try:
                    r = session.post(url + "/v1/stain", headers=good[0], data=good[1], timeout=120)
                    ok = r.status_code == 200
                    detail = f"{r.status_code} {r.text[:100]}"
                except requests.RequestException as exc:
                    ok, detail = False, type(exc).__name__
                with lock:
                    (good_latencies.append(time.perf_counter() - t0) if ok else good_failures.append(detail))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        if on_tick:
            on_tick()
    lat = np.array(good_latencies) * 1000
    return {
        "good": len(good_latencies), "good_failed": len(good_failures), "good_failures": good_failures[:5],
        "good_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "good_p95_ms": float(np.percentile(lat, 95)) if lat.size else None,
        "hostile": hostile_statuses,
    }


def max_size_phase(url: str, max_pixels: int, requests_n: int, concurrency: int) -> dict[str, Any]:
    """Requests of exactly ``max_pixels`` float32 values, ``concurrency`` at once: the replicas' peak memory."""
    import requests

    edge = int(np.sqrt(max_pixels))
    image = np.random.default_rng(0).normal(10, 3, size=(max_pixels // edge, edge)).astype(np.float32)
    headers = {"Content-Type": "application/octet-stream", "X-Dtype": "float32",
               "X-Shape": f"{image.shape[0]},{image.shape[1]}", "Accept": "application/octet-stream"}
    start = {d: replica_rss(d) for d in DEPLOYMENTS}
    peak = dict(start)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for d in DEPLOYMENTS:
                peak[d] = max(peak[d], replica_rss(d))
            time.sleep(0.2)

    def one(_: int) -> int:
        return requests.post(url + "/v1/stain", headers=headers, data=image.tobytes(), timeout=600).status_code

    from concurrent.futures import ThreadPoolExecutor

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        statuses = list(pool.map(one, range(requests_n)))
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    image_bytes = image.nbytes
    growth = {d: (peak[d] - start[d]) / 2**20 for d in DEPLOYMENTS}
    return {"requests": requests_n, "concurrency": concurrency, "statuses": statuses, "seconds": seconds,
            "image_mib": image_bytes / 2**20, "rss_start_mib": {d: v / 2**20 for d, v in start.items()},
            "peak_growth_mib": growth,
            "ingress_growth_per_request_in_images": growth["Ingress"] * 2**20 / image_bytes / concurrency}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3.0, help="length of the hostile mix")
    p.add_argument("--baseline-seconds", type=float, default=30.0, help="length of the good-only baseline")
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--hostile-fraction", type=float, default=0.5, help="share of hostile requests in the mix")
    p.add_argument("--size", type=int, default=256, help="YX edge of the good requests' image")
    p.add_argument("--max-pixels", type=int, default=2048 * 2048, help="the server's max_image_pixels")
    p.add_argument("--max-size-requests", type=int, default=8,
                   help="requests of exactly --max-pixels values after the mix, 4 at once (0: skip)")
    p.add_argument("--quick", action="store_true", help="30 s mix, 10 s baseline")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.baseline_seconds = 0.5, 10.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        export_model(models / "soak_unet2d.onnx", num_blocks=4, num_filters=16)
        result = api.serve(models=[str(models)], port=free_port(), app_name="soak", max_image_pixels=args.max_pixels,
                           stainer={"num_cpus": 0.8}, segmenter={"num_cpus": 0.1}, ingress={"num_cpus": 0.25})
        try:
            image = phase_image(args.size)
            good = ({"Content-Type": "application/octet-stream", "X-Dtype": "float32",
                     "X-Shape": f"{args.size},{args.size}"}, image.tobytes())
            hostile = hostile_requests(args.max_pixels)
            run_clients(result.url, 5.0, args.concurrency, 0.0, [], good)  # warm-up
            print(f"baseline: good requests alone, {args.baseline_seconds:.0f} s at concurrency {args.concurrency}",
                  flush=True)
            alone = run_clients(result.url, args.baseline_seconds, args.concurrency, 0.0, [], good)
            start_rss = replica_rss()
            samples = [start_rss]
            print(f"mix: {args.hostile_fraction:.0%} hostile, {args.minutes:g} min; replica RSS at start "
                  f"{start_rss / 2**20:.0f} MiB", flush=True)
            mixed = run_clients(result.url, args.minutes * 60, args.concurrency, args.hostile_fraction, hostile,
                                good, on_tick=lambda: samples.append(replica_rss()))
            time.sleep(2.0)
            end_rss = replica_rss()
            largest = (max_size_phase(result.url, args.max_pixels, args.max_size_requests, 4)
                       if args.max_size_requests else None)
        finally:
            result.stop()
    hostile_total = sum(sum(c.values()) for c in mixed["hostile"].values())
    non_4xx = {name: c for name, c in mixed["hostile"].items() if any(not 400 <= s < 500 for s in c)}
    figures = {
        "good_alone": alone, "mix": mixed, "hostile_requests": hostile_total, "hostile_not_4xx": non_4xx,
        "rss_start_mib": start_rss / 2**20, "rss_end_mib": end_rss / 2**20, "rss_peak_mib": max(samples) / 2**20,
        "rss_end_over_start": end_rss / start_rss,
        "p50_mix_over_alone": (mixed["good_p50_ms"] or 0) / (alone["good_p50_ms"] or 1),
        "max_size": largest,
    }
    for label, run in (("good alone: ", alone), ("good in mix:", mixed)):
        print(f"{label} {run['good']} requests, p50 {run['good_p50_ms']:.1f} ms, p95 {run['good_p95_ms']:.1f} ms, "
              f"failed {run['good_failed']}")
    print(f"good p50 under the mix: {figures['p50_mix_over_alone']:.2f}x the baseline")
    print(f"hostile:     {hostile_total} requests; statuses per kind:")
    for name, counts in sorted(mixed["hostile"].items()):
        print(f"  {name:28s} {dict(sorted(counts.items()))}")
    print(f"replica RSS: start {figures['rss_start_mib']:.0f} MiB, peak {figures['rss_peak_mib']:.0f} MiB, "
          f"end {figures['rss_end_mib']:.0f} MiB ({figures['rss_end_over_start']:.3f}x the start)")
    if largest:
        print(f"max-size requests: {largest['requests']} of {largest['image_mib']:.0f} MiB float32, "
              f"{largest['concurrency']} at once, statuses {sorted(set(largest['statuses']))}, "
              f"{largest['seconds']:.0f} s; peak RSS growth " + ", ".join(
                  f"{d} {v:.0f} MiB" for d, v in largest["peak_growth_mib"].items())
              + f"; Ingress {largest['ingress_growth_per_request_in_images']:.1f} images per request in flight")
    verdict = mixed["good_failed"] == 0 and not non_4xx and figures["rss_end_over_start"] <= 1.10
    print("verdict: " + ("PASS" if verdict else "FAIL") + " (0 failed good requests, every hostile one 4xx, "
          "memory ends within 10 % of the start)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if verdict else 1


if __name__ == "__main__":
    raise SystemExit(main())
