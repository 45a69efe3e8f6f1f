"""Latency and throughput of ``viscy serve`` (``POST /v1/stain``) against in-process onnxruntime.

Usage::

    python benchmarks/bench_serve.py --quick                     # smoke: 256² only, few requests, no replicas
    python benchmarks/bench_serve.py                             # 256², 1024², 2048²; 1 vs 2 replicas; encodings
    python benchmarks/bench_serve.py --sizes 256 1024 --requests 40 16 --stainer-cpus 0.8
    python benchmarks/bench_serve.py --onnx model.onnx --gpu --json serve.json

A local Ray cluster is started (or the one at ``RAY_ADDRESS`` joined) and the application deployed through
``viscy.api.serve`` with the given CPU shares. Without ``--onnx`` a randomly initialised 2D U-Net
(Phase3D -> Nuclei, Membrane) is exported to a temporary directory (timing does not depend on weights).

Every request is timed on the client: encoding the image, ``POST /v1/stain``, and decoding the answer.
Concurrency ``c`` runs ``c`` threads, each with its own ``requests.Session``; each cell is warmed up first.
The baseline is the same model on the same (normalised) image through the same tiling engine in this
process (``predict_plane_stack`` + ``OnnxBackend`` with the server's tile, overlap, batch and thread count);
"overhead" is the Serve p50 minus that p50. "norm" is the normalisation the server does per request
(statistics of the image), shown apart because the direct baseline gets an already normalised image.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from viscy import api  # first: sets Ray's auth mode before ray is imported
from viscy.ray_utils import free_port
from viscy.serve.client import parse_server_timing
from viscy.serve.codecs import NPY, RAW, TIFF, decode_image

ENCODINGS = {"raw": RAW, "npy": NPY, "tiff": TIFF}
OVERHEAD_TARGET_MS = 5.0
SOURCES, TARGETS = ["Phase3D"], ["Nuclei", "Membrane"]


# ------------------------------------------------------------------------------------------ helpers
def phase_image(size: int, seed: int = 0) -> np.ndarray:
    """A smooth random float32 ``(size, size)`` image (blobs), like a phase image."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    return (ndi.gaussian_filter(rng.normal(size=(size, size)), sigma=3) * 10 + 5).astype(np.float32)


def export_model(path: Path, num_blocks: int, num_filters: int) -> Path:
    """A randomly initialised 2D U-Net exported to ONNX with its channels and normalisation."""
    import torch

    from viscy.models import create_model
    from viscy.models.export import export_onnx, onnx_metadata

    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "out_channels": len(TARGETS), "num_blocks": num_blocks, "num_filters": num_filters}
    model = create_model("unet2d", **kwargs).eval()
    norm = [{"channels": SOURCES, "level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"}]
    meta = onnx_metadata(model, name="bench-unet2d", source_channels=SOURCES, target_channels=TARGETS,
                         normalization=norm, kwargs=kwargs)
    return export_onnx(model, path, metadata=meta)


def summarize(latencies: list[float], wall: float | None = None, **extra: Any) -> dict[str, Any]:
    """p50/p95 in ms (and requests/s over ``wall`` seconds) of a list of latencies in seconds."""
    out: dict[str, Any] = {"n": len(latencies), **extra}
    if latencies:
        ms = np.asarray(latencies) * 1000
        out |= {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                "mean_ms": float(ms.mean())}
    if wall:
        out["rps"] = len(latencies) / wall
    return out


def timed(fn: Callable[[], object], repeats: int, warmup: int) -> dict[str, Any]:
    """Latencies of ``fn`` run ``repeats`` times in a row after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summarize(times, sum(times))


def fmt(value: float | None, spec: str = ".1f") -> str:
    """A figure, or ``-`` when missing."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def machine() -> dict[str, Any]:
    """CPU count, GPU name and the versions that matter."""
    import onnxruntime as ort
    import ray

    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA install just means no GPU here
        gpu = None
    return {
        "cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "numpy": np.__version__,
    }


# ------------------------------------------------------------------------------------------- direct
def direct_figures(onnx: Path, image: np.ndarray, args: argparse.Namespace, device: str, repeats: int,
                   plain: bool) -> dict[str, Any]:
    """In-process baseline: normalisation, plain ``session.run`` (no tiling) and the tiling engine.

    Parameters
    ----------
    onnx
        The served model file.
    image
        ``(Y, X)`` float32 image, as sent to the server.
    device
        ``"cpu"`` or ``"cuda"`` (onnxruntime provider).
    repeats
        Timed runs of each.
    plain
        Also time one ``session.run`` on the whole (padded) image.
    """
    from viscy.predict.backends import OnnxBackend
    from viscy.predict.tiling import TilingOptions, pad_yx, predict_plane_stack, tile_grid
    from viscy.serve.models import ServedModel

    served = ServedModel.load(onnx)
    x, _ = served.normalize(served.as_czyx(image), None)
    opts = TilingOptions.for_model(served.card.spec, (args.tile, args.tile), overlap=args.overlap, blend="gaussian",
                                   batch_size=args.max_batch_size)
    threads = args.ort_threads if device == "cpu" else None
    backend = OnnxBackend(onnx, device=device, threads=threads)
    out: dict[str, Any] = {"size": image.shape[-1], "device": device, "threads": threads,
                           "tiles": len(tile_grid(image.shape, opts))}
    out["norm"] = timed(lambda: served.normalize(served.as_czyx(image), None), repeats, 1)
    out["tiled"] = timed(lambda: predict_plane_stack(x, backend, opts), repeats, args.warmup)
    if plain:
        padded, _ = pad_yx(x[None], served.spec.yx_multiple)
        feed = {backend.input: np.ascontiguousarray(padded, dtype=np.float32)}
        out["plain"] = timed(lambda: backend.session.run(None, feed), repeats, args.warmup)
    return out


# --------------------------------------------------------------------------------------------- HTTP
def encode(image: np.ndarray, kind: str) -> tuple[bytes, dict[str, str]]:
    """Request body and headers of ``image`` in one encoding; the answer is asked for in the same one."""
    headers = {"Content-Type": kind, "Accept": kind}
    if kind == RAW:
        image = np.ascontiguousarray(image)
        headers |= {"X-Dtype": image.dtype.name, "X-Shape": ",".join(map(str, image.shape))}
        return image.tobytes(), headers
    buf = io.BytesIO()
    if kind == NPY:
        np.save(buf, image, allow_pickle=False)
    else:
        import tifffile

        tifffile.imwrite(buf, image, photometric="minisblack")
    return buf.getvalue(), headers


def snapshot(batches: Callable[[], tuple[int, float]] | None) -> tuple[int, float] | None:
    """``batches()``, or None when absent or failing (the figure is left out, the cell goes on)."""
    if batches is None:
        return None
    try:
        return batches()
    except Exception as exc:  # noqa: BLE001
        print(f"  note: VirtualStainer.info() failed ({type(exc).__name__}: {exc}); batch size not measured")
        return None


class CellFailed(RuntimeError):
    """A request of a cell failed (error status, timeout or a wrong answer)."""




def stain_once(session: Any, url: str, image: np.ndarray, kind: str,
               timeout: float) -> tuple[int, int, dict[str, float]]:
    """Encode, ``POST /v1/stain`` and decode the answer; returns request/answer bytes and the server's timing."""
    body, headers = encode(image, kind)
    r = session.post(f"{url}/v1/stain", data=body, headers=headers, timeout=timeout)
    if r.status_code != 200:
        raise CellFailed(f"HTTP {r.status_code}: {r.text[:300]}")
    pred = decode_image(r.content, r.headers.get("content-type"), r.headers.get("x-dtype"), r.headers.get("x-shape"))
    if pred.shape[-2:] != image.shape[-2:]:
        raise CellFailed(f"answer of shape {pred.shape} for an image of shape {image.shape}")
    return len(body), len(r.content), parse_server_timing(r.headers.get("server-timing"))


def http_cell(url: str, image: np.ndarray, kind: str, concurrency: int, requests_n: int, warmup: int,
              timeout: float, batches: Callable[[], tuple[int, float]] | None = None) -> dict[str, Any]:
    """Time ``requests_n`` requests from ``concurrency`` threads (own sessions) after a warm-up per thread.

    Raises
    ------
    CellFailed
        If any request fails; the message is the first error.
    """
    import requests

    sessions = [requests.Session() for _ in range(concurrency)]
    counts = [requests_n // concurrency + (i < requests_n % concurrency) for i in range(concurrency)]
    warm = max(1, math.ceil(warmup / concurrency))
    ready, go = threading.Barrier(concurrency + 1), threading.Barrier(concurrency + 1)
    latencies: list[float] = []
    errors: list[str] = []
    sizes: list[tuple[int, int, dict[str, float]]] = []
    timings: list[dict[str, float]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            for _ in range(warm):
                sizes.append(stain_once(sessions[i], url, image, kind, timeout))
            ready.wait()
            go.wait()
            for _ in range(counts[i]):
                if errors:
                    return
                t0 = time.perf_counter()
                _, _, timing = stain_once(sessions[i], url, image, kind, timeout)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    timings.append(timing)
        except threading.BrokenBarrierError:
            return
        except Exception as exc:  # noqa: BLE001 - reported as the cell's failure
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
            ready.abort()
            go.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    before = after = None
    try:
        ready.wait()
        before = snapshot(batches)
        go.wait()
        t0 = time.perf_counter()
    except threading.BrokenBarrierError:
        t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for s in sessions:
        s.close()
    if errors:
        raise CellFailed(errors[0])
    if before is not None:
        after = snapshot(batches)
    out = summarize(latencies, wall, concurrency=concurrency, encoding=kind, size=image.shape[-1])
    out["request_bytes"], out["answer_bytes"] = sizes[0][:2]
    keys = sorted({k for t in timings for k in t})
    out["server_ms"] = {k: float(np.median([t[k] for t in timings if k in t])) for k in keys}
    if before is not None and after is not None and after[0] > before[0]:
        out["mean_batch"] = (after[1] - before[1]) / (after[0] - before[0])
        out["batches"] = after[0] - before[0]
    return out


# -------------------------------------------------------------------------------------------- serve
class App:
    """One deployed application and its ``VirtualStainer`` handle."""

    def __init__(self, models: Path, port: int, name: str, args: argparse.Namespace, replicas: int,
                 device: str = "cpu", gpus: float = 0.0) -> None:
        t0 = time.perf_counter()
        stainer = {
            "num_cpus": args.stainer_cpus, "num_gpus": gpus, "device": device,
            "max_batch_size": args.max_batch_size, "tile_yx": [args.tile, args.tile], "tile_overlap": args.overlap,
            "autoscaling": {"min_replicas": replicas, "max_replicas": replicas},
        }
        if args.stainer_max_ongoing:
            stainer["max_ongoing_requests"] = args.stainer_max_ongoing
        self.result = api.serve(models=[str(models)], port=port, app_name=name, stainer=stainer,
                                segmenter={"num_cpus": args.segmenter_cpus}, ingress={"num_cpus": args.ingress_cpus})
        self.name, self.replicas, self.url = name, replicas, self.result.url
        self._wait_replicas(replicas, timeout=120)
        self.seconds = time.perf_counter() - t0
        self.health = self.result.health

    def _wait_replicas(self, n: int, timeout: float) -> None:
        from ray import serve

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = serve.status().applications[self.name].deployments["VirtualStainer"].replica_states
            if sum(v for k, v in states.items() if getattr(k, "value", k) == "RUNNING") >= n:
                return
            time.sleep(0.5)
        print(f"  note: {n} VirtualStainer replicas were not all RUNNING after {timeout:.0f} s", flush=True)

    def batches(self) -> tuple[int, float]:
        """Batches and tiles the stainer replicas ran so far (summed over the replicas that answered)."""
        from ray import serve

        handle = serve.get_deployment_handle("VirtualStainer", app_name=self.name)
        seen: dict[int, tuple[int, float]] = {}
        for _ in range(1 if self.replicas == 1 else 4 * self.replicas):
            info = handle.info.remote().result(timeout_s=15)
            seen[info["pid"]] = (info["batches"], info["mean_batch_size"] * info["batches"])
            if len(seen) == self.replicas:
                break
        return sum(b for b, _ in seen.values()), sum(t for _, t in seen.values())

    def info(self) -> dict[str, Any]:
        """``VirtualStainer.info()`` of one replica."""
        from ray import serve

        return serve.get_deployment_handle("VirtualStainer", app_name=self.name).info.remote().result(timeout_s=15)

    def stop(self) -> None:
        """Delete the application."""
        self.result.stop()


def run_cells(app: App, images: dict[int, np.ndarray], cells: list[tuple[int, str, int]], counts: dict[int, int],
              args: argparse.Namespace, label: str) -> list[dict[str, Any]]:
    """Run ``(size, encoding, concurrency)`` cells in order; stop at the first failure (the app may be stuck)."""
    rows = []
    for size, kind, conc in cells:
        try:
            row = http_cell(app.url, images[size], ENCODINGS[kind], conc, counts[size], args.warmup, args.timeout,
                            app.batches)
        except CellFailed as exc:
            print(f"  {label}: {size}² {kind} c={conc} FAILED: {exc}; skipping this application's other cells",
                  flush=True)
            rows.append({"size": size, "encoding": ENCODINGS[kind], "concurrency": conc, "error": str(exc),
                         "app": label})
            hint = threadpool_hint(conc, args)
            if hint:
                print(f"  {hint}", flush=True)
            break
        row |= {"app": label, "encoding_name": kind}
        rows.append(row)
        print(f"  {label}: {size}² {kind:<4} c={conc}  p50 {fmt(row.get('p50_ms'))} ms  p95 {fmt(row.get('p95_ms'))}"
              f" ms  {fmt(row.get('rps'), '.2f')} req/s  batch {fmt(row.get('mean_batch'), '.2f')}  server "
              + ", ".join(f"{k} {v:.1f}" for k, v in row.get("server_ms", {}).items()) + " ms", flush=True)
    return rows


def threadpool_hint(concurrency: int, args: argparse.Namespace) -> str | None:
    """Why a concurrent cell may hang: Ray's user-code thread pool of a replica is ceil(num_cpus) + 4 threads.

    ``VirtualStainer.predict`` holds one of them per request (``asyncio.to_thread(predict_plane_stack)``,
    blocked on its tiles) while ``_run_tiles`` needs another one to run onnxruntime.
    """
    from viscy.serve.config import StainerSettings

    workers = min(32, max(1, math.ceil(args.stainer_cpus)) + 4)
    ongoing = args.stainer_max_ongoing or StainerSettings().max_ongoing_requests
    if concurrency >= workers and ongoing >= workers:
        return (f"hint: {min(concurrency, ongoing)} requests in flight >= the stainer replica's {workers} user-code "
                f"threads (ceil(num_cpus) + 4): every thread may block in predict_plane_stack waiting for tiles that "
                f"need a free thread; --stainer-max-ongoing {workers - 1} avoids it")
    return None


def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The first successful row whose keys equal ``match``."""
    for r in rows:
        if "error" not in r and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments (``--quick`` fills in the smoke settings)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="YX edges (default 256 1024 2048)")
    p.add_argument("--requests", nargs="+", type=int, default=None,
                   help="timed requests per cell, one per size (the last repeats; default 40 16 8)")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8], help="client threads per cell")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per cell (at least one per thread)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per HTTP request before a cell fails (default 120; 60 with --quick)")
    p.add_argument("--onnx", type=Path, default=None, help="benchmark this exported file instead of a random U-Net")
    p.add_argument("--num-blocks", type=int, default=4, help="U-Net down-samplings of the generated model")
    p.add_argument("--num-filters", type=int, default=16, help="first-level channels of the generated model")
    p.add_argument("--stainer-cpus", type=float, default=0.8, help="VirtualStainer num_cpus per replica")
    p.add_argument("--segmenter-cpus", type=float, default=0.1, help="Segmenter num_cpus")
    p.add_argument("--ingress-cpus", type=float, default=0.25, help="Ingress num_cpus")
    p.add_argument("--stainer-max-ongoing", type=int, default=None,
                   help="stainer.max_ongoing_requests per replica (default: the server's default)")
    p.add_argument("--ort-threads", type=int, default=None,
                   help="threads of the in-process baseline (default: the server's, max(1, round(stainer-cpus)))")
    p.add_argument("--max-batch-size", type=int, default=8, help="stainer.max_batch_size and tiling batch")
    p.add_argument("--tile", type=int, default=512, help="tile edge (stainer.tile_yx)")
    p.add_argument("--overlap", type=float, default=0.25, help="tile overlap (stainer.tile_overlap)")
    p.add_argument("--encoding-sizes", nargs="+", type=int, default=[256, 1024],
                   help="sizes of the raw/npy/tiff comparison (those also in --sizes)")
    p.add_argument("--replica-sizes", nargs="+", type=int, default=[256, 1024],
                   help="sizes of the 1 vs 2 replicas comparison at the highest concurrency")
    p.add_argument("--no-replicas", action="store_true", help="skip the 1 vs 2 replicas comparison")
    p.add_argument("--gpu", action="store_true", help="also ORT CUDA in-process and Serve with num_gpus=1")
    p.add_argument("--quick", action="store_true", help="smoke run: 256² only, few requests, no replicas")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [256]
        args.requests = args.requests or [10]
        args.no_replicas = True
        args.timeout = args.timeout or 60.0
    args.timeout = args.timeout or 120.0
    args.sizes = args.sizes or [256, 1024, 2048]
    args.requests = args.requests or [40, 16, 8]
    if any(s < 8 for s in args.sizes) or min(args.requests) < 1 or min(args.concurrency) < 1:
        p.error("sizes must be >= 8 and requests and concurrency >= 1")
    args.ort_threads = args.ort_threads or max(1, round(args.stainer_cpus))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables, return (and optionally write) every figure."""
    args = parse_args(argv)
    from viscy.models.export import cuda_usable

    info = machine()
    print(f"machine: {info['cpus']} CPUs ({info['affinity_cpus']} usable), GPU: {info['gpu'] or 'none'}; "
          f"{info['platform']}")
    print(f"python {info['python']}, ray {info['ray']}, onnxruntime {info['onnxruntime']} "
          f"({', '.join(info['ort_providers'])}), numpy {info['numpy']}")
    gpu = args.gpu and cuda_usable()
    if args.gpu and not gpu:
        print("--gpu: no usable GPU / CUDAExecutionProvider (viscy.models.export.cuda_usable() is False); "
              "GPU figures skipped")
    counts = {s: args.requests[min(i, len(args.requests) - 1)] for i, s in enumerate(args.sizes)}
    results: dict[str, Any] = {"machine": info, "args": {k: str(v) if isinstance(v, Path) else v
                                                         for k, v in vars(args).items()}}
    images = {s: phase_image(s, seed=s) for s in args.sizes}
    enc_sizes = [s for s in args.encoding_sizes if s in images]
    conc_max = max(args.concurrency)

    import ray
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        if args.onnx is not None:
            onnx = args.onnx.resolve()
            models = Path(tmp) / "models"
            models.mkdir()
            (models / onnx.name).symlink_to(onnx)
        else:
            models = Path(tmp) / "models"
            models.mkdir()
            t0 = time.perf_counter()
            onnx = export_model(models / "bench-unet2d.onnx", args.num_blocks, args.num_filters)
            print(f"model: unet2d num_blocks={args.num_blocks} num_filters={args.num_filters} exported in "
                  f"{time.perf_counter() - t0:.1f} s ({onnx.stat().st_size / 2**20:.1f} MiB)")
        print(f"server: stainer num_cpus {args.stainer_cpus} (ORT threads {max(1, round(args.stainer_cpus))}), "
              f"ingress {args.ingress_cpus}, segmenter {args.segmenter_cpus}; tile {args.tile}, overlap "
              f"{args.overlap}, max_batch_size {args.max_batch_size}, max_ongoing_requests "
              f"{args.stainer_max_ongoing or 'default'}; baseline ORT threads {args.ort_threads}")
        print(f"requests per cell: {', '.join(f'{s}²: {n}' for s, n in counts.items())}; warm-up {args.warmup}; "
              f"concurrency {args.concurrency}", flush=True)
        port = free_port()
        try:
            results |= bench_cpu(models, onnx, port, images, counts, enc_sizes, conc_max, args)
            if gpu:
                results["gpu"] = bench_gpu(models, onnx, port, images, counts, args)
        finally:
            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - best effort; Ray goes down next
                pass
            if ray.is_initialized():
                ray.shutdown()
    report(results, args, gpu)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"figures written to {args.json}")
    return results


def bench_cpu(models: Path, onnx: Path, port: int, images: dict[int, np.ndarray], counts: dict[int, int],
              enc_sizes: list[int], conc_max: int, args: argparse.Namespace) -> dict[str, Any]:
    """One replica: latency cells, encodings, the in-process baseline; then two replicas."""
    out: dict[str, Any] = {"direct": [], "serve": [], "replicas": []}
    print("\ndeploying 1 VirtualStainer replica ...", flush=True)
    app = App(models, port, "bench-1r", args, replicas=1)
    print(f"  healthy in {app.seconds:.1f} s; providers {app.health.get('providers')}", flush=True)
    out["deploy_s"] = {"1 replica": app.seconds}
    try:
        # in-process baseline while the (idle) application runs, so both see the same background load
        for size, image in images.items():
            row = direct_figures(onnx, image, args, "cpu", counts[size], plain=size <= args.tile)
            out["direct"].append(row)
            print(f"  direct {size}²: tiled p50 {fmt(row['tiled']['p50_ms'])} ms ({row['tiles']} tiles), "
                  f"plain {fmt(row.get('plain', {}).get('p50_ms'))} ms, norm {fmt(row['norm']['p50_ms'])} ms",
                  flush=True)
        # single-client cells first and the concurrent ones last: a wedged replica then costs the fewest figures
        cells = [(s, "raw", 1) for s in images] if 1 in args.concurrency else []
        cells += [(s, k, 1) for s in enc_sizes for k in ("npy", "tiff")]
        cells += [(s, "raw", c) for c in sorted(set(args.concurrency) - {1}) for s in images]
        out["serve"] = run_cells(app, images, cells, counts, args, "1 replica")
        info = app.info()
        out["stainer_info"] = info
        print(f"  VirtualStainer.info(): {info['batches']} batches, mean batch size {info['mean_batch_size']:.2f}",
              flush=True)
    finally:
        app.stop()
    sizes = [s for s in args.replica_sizes if s in images]
    if args.no_replicas or not sizes:
        return out
    print("\ndeploying 2 VirtualStainer replicas ...", flush=True)
    try:
        app2 = App(models, port, "bench-2r", args, replicas=2)
    except Exception as exc:  # noqa: BLE001 - e.g. the CPU shares do not fit twice
        print(f"  two replicas skipped: {type(exc).__name__}: {exc}", flush=True)
        out["replicas_error"] = str(exc)
        return out
    out["deploy_s"]["2 replicas"] = app2.seconds
    try:
        out["replicas"] = run_cells(app2, images, [(s, "raw", conc_max) for s in sizes], counts, args, "2 replicas")
    finally:
        app2.stop()
    return out


def bench_gpu(models: Path, onnx: Path, port: int, images: dict[int, np.ndarray], counts: dict[int, int],
              args: argparse.Namespace) -> dict[str, Any]:
    """ORT CUDA in-process per size, then Serve with ``stainer.num_gpus=1, device=cuda``."""
    out: dict[str, Any] = {"direct": [], "serve": []}
    print("\nGPU: in-process ORT CUDA ...", flush=True)
    for size, image in images.items():
        row = direct_figures(onnx, image, args, "cuda", counts[size], plain=size <= args.tile)
        out["direct"].append(row)
        print(f"  direct cuda {size}²: tiled p50 {fmt(row['tiled']['p50_ms'])} ms", flush=True)
    print("deploying 1 VirtualStainer replica on the GPU ...", flush=True)
    try:
        app = App(models, port, "bench-gpu", args, replicas=1, device="cuda", gpus=1.0)
    except Exception as exc:  # noqa: BLE001
        print(f"  Serve on the GPU skipped: {type(exc).__name__}: {exc}", flush=True)
        out["serve_error"] = str(exc)
        return out
    print(f"  healthy in {app.seconds:.1f} s; providers {app.health.get('providers')}", flush=True)
    try:
        cells = [(s, "raw", c) for c in sorted(set(args.concurrency)) for s in images]
        out["serve"] = run_cells(app, images, cells, counts, args, "gpu")
        out["stainer_info"] = app.info()
    finally:
        app.stop()
    return out


# ------------------------------------------------------------------------------------------- report
def report(results: dict[str, Any], args: argparse.Namespace, gpu: bool) -> None:
    """Print the tables: latency vs baseline, encodings, replicas, GPU."""
    direct = {r["size"]: r for r in results.get("direct", [])}
    serve_rows = results.get("serve", [])
    print(f"\n== POST /v1/stain, 1 replica (CPU), raw float32 (Y, X); direct = in-process ORT, {args.ort_threads} "
          "thread(s), same tiling")
    print(f"{'size':>6} {'conc':>4} {'n':>4} {'p50 ms':>9} {'p95 ms':>9} {'req/s':>8} {'batch':>6} "
          f"{'direct p50':>10} {'plain p50':>9} {'norm p50':>8} {'overhead ms':>11} {'serve/direct':>12}")
    for size in args.sizes:
        d = direct.get(size, {})
        dp50 = d.get("tiled", {}).get("p50_ms")
        for conc in args.concurrency:
            r = find(serve_rows, size=size, concurrency=conc, encoding=RAW) or {}
            p50 = r.get("p50_ms")
            over = p50 - dp50 if p50 is not None and dp50 is not None and conc == 1 else None
            ratio = p50 / dp50 if p50 is not None and dp50 else None
            if r:
                r["direct_p50_ms"], r["overhead_ms"] = dp50, over
            print(f"{size:>5}² {conc:>4} {r.get('n', 0):>4} {fmt(p50):>9} {fmt(r.get('p95_ms')):>9} "
                  f"{fmt(r.get('rps'), '.2f'):>8} {fmt(r.get('mean_batch'), '.2f'):>6} {fmt(dp50):>10} "
                  f"{fmt(d.get('plain', {}).get('p50_ms')):>9} {fmt(d.get('norm', {}).get('p50_ms')):>8} "
                  f"{fmt(over):>11} {fmt(ratio, '.2f'):>12}")
    failed = [r for r in serve_rows + results.get("replicas", []) if "error" in r]
    for r in failed:
        print(f"  FAILED {r['app']} {r['size']}² c={r['concurrency']}: {r['error']}")
    print("overhead = Serve p50 - direct tiled p50 at concurrency 1 (client encode + HTTP + ingress decode/normalise "
          "+ handle + encode + client decode)")
    small = min(args.sizes)
    r = find(serve_rows, size=small, concurrency=1, encoding=RAW)
    if r and r.get("overhead_ms") is not None:
        met = "met" if r["overhead_ms"] <= OVERHEAD_TARGET_MS else "NOT met"
        print(f"target overhead p50 <= {OVERHEAD_TARGET_MS:g} ms at {small}²: {r['overhead_ms']:.1f} ms -> {met}")
        results["overhead_target"] = {"size": small, "overhead_ms": r["overhead_ms"],
                                      "target_ms": OVERHEAD_TARGET_MS, "met": r["overhead_ms"] <= OVERHEAD_TARGET_MS}
    print("\nwhere the concurrency-1 time goes (medians, ms): server decode/stain/encode from Server-Timing; "
          "stainer side = stain - direct; HTTP+proxy+client = p50 - server total")
    print(f"{'size':>6} {'p50':>8} {'decode':>7} {'stain':>8} {'encode':>7} {'direct':>8} {'stainer side':>12} "
          f"{'HTTP+proxy+client':>17}")
    for size in args.sizes:
        r = find(serve_rows, size=size, concurrency=1, encoding=RAW)
        if not r or not r.get("server_ms"):
            continue
        t = r["server_ms"]
        dp50 = direct.get(size, {}).get("tiled", {}).get("p50_ms")
        side = t.get("stain", 0.0) - dp50 if dp50 is not None else None
        rest = r["p50_ms"] - sum(t.values())
        print(f"{size:>5}² {r['p50_ms']:>8.1f} {t.get('decode', 0):>7.1f} {t.get('stain', 0):>8.1f} "
              f"{t.get('encode', 0):>7.1f} {fmt(dp50):>8} {fmt(side):>12} {rest:>17.1f}")
    info = results.get("stainer_info")
    if info:
        print(f"VirtualStainer.info() after the run: {info['batches']} batches, mean @serve.batch size "
              f"{info['mean_batch_size']:.2f} (per cell: 'batch' column)")

    enc_rows = [r for r in serve_rows if r.get("concurrency") == 1 and "error" not in r]
    enc_sizes = sorted({r["size"] for r in enc_rows if r["encoding"] != RAW})
    if enc_sizes:
        print("\n== encodings at concurrency 1 (request and answer in the same encoding)")
        print(f"{'size':>6} {'encoding':<26} {'p50 ms':>9} {'p95 ms':>9} {'vs raw':>7} {'req KiB':>9} {'ans KiB':>9}")
        for size in enc_sizes:
            base = find(enc_rows, size=size, encoding=RAW)
            for kind in ENCODINGS.values():
                r = find(enc_rows, size=size, encoding=kind)
                if r is None:
                    continue
                ratio = r["p50_ms"] / base["p50_ms"] if base else None
                r["vs_raw"] = ratio
                print(f"{size:>5}² {kind:<26} {fmt(r['p50_ms']):>9} {fmt(r['p95_ms']):>9} {fmt(ratio, '.2f'):>7} "
                      f"{r['request_bytes'] / 1024:>9.0f} {r['answer_bytes'] / 1024:>9.0f}")

    rep = results.get("replicas", [])
    if rep or results.get("replicas_error"):
        conc = max(args.concurrency)
        print(f"\n== 1 vs 2 VirtualStainer replicas at concurrency {conc} (raw; {args.stainer_cpus} CPU each)")
        print(f"{'size':>6} {'1r req/s':>9} {'2r req/s':>9} {'2r/1r':>6} {'1r p50':>9} {'2r p50':>9} "
              f"{'1r batch':>8} {'2r batch':>8}")
        for size in args.replica_sizes:
            one = find(serve_rows, size=size, concurrency=conc, encoding=RAW) or {}
            two = find(rep, size=size) or {}
            ratio = two["rps"] / one["rps"] if one.get("rps") and two.get("rps") else None
            if two:
                two["vs_1_replica"] = ratio
            if one or two:
                print(f"{size:>5}² {fmt(one.get('rps'), '.2f'):>9} {fmt(two.get('rps'), '.2f'):>9} "
                      f"{fmt(ratio, '.2f'):>6} {fmt(one.get('p50_ms')):>9} {fmt(two.get('p50_ms')):>9} "
                      f"{fmt(one.get('mean_batch'), '.2f'):>8} {fmt(two.get('mean_batch'), '.2f'):>8}")
        if results.get("replicas_error"):
            print(f"  two replicas not measured: {results['replicas_error']}")
        print("  (1-replica figures are the concurrency cells of the first table, same settings)")

    if gpu and "gpu" in results:
        g, conc_max = results["gpu"], max(args.concurrency)
        gdirect = {r["size"]: r for r in g.get("direct", [])}
        print("\n== GPU: ORT CUDA vs CPU in-process (same tiling), Serve with stainer.num_gpus=1, device=cuda")
        print(f"{'size':>6} {'cpu p50':>9} {'cuda p50':>9} {'cpu/cuda':>8} {'serve c1 p50':>12} {'overhead':>9} "
              f"{f'c{conc_max} req/s':>10} {'batch':>6}")
        for size in args.sizes:
            cpu_p50 = direct.get(size, {}).get("tiled", {}).get("p50_ms")
            cuda_p50 = gdirect.get(size, {}).get("tiled", {}).get("p50_ms")
            c1 = find(g.get("serve", []), size=size, concurrency=1) or {}
            cn = find(g.get("serve", []), size=size, concurrency=conc_max) or {}
            ratio = cpu_p50 / cuda_p50 if cpu_p50 and cuda_p50 else None
            over = c1["p50_ms"] - cuda_p50 if c1.get("p50_ms") is not None and cuda_p50 is not None else None
            print(f"{size:>5}² {fmt(cpu_p50):>9} {fmt(cuda_p50):>9} {fmt(ratio, '.1f'):>8} "
                  f"{fmt(c1.get('p50_ms')):>12} {fmt(over):>9} {fmt(cn.get('rps'), '.2f'):>10} "
                  f"{fmt(cn.get('mean_batch'), '.2f'):>6}")
        if g.get("serve_error"):
            print(f"  Serve on the GPU not measured: {g['serve_error']}")
        for r in g.get("serve", []):
            if "error" in r:
                print(f"  FAILED gpu {r['size']}² c={r['concurrency']}: {r['error']}")
    deploy = results.get("deploy_s", {})
    if deploy:
        print("\ndeploy to healthy: " + ", ".join(f"{k} {v:.1f} s" for k, v in deploy.items()))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
