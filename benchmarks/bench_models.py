"""Forward time of the published presets: torch eager vs onnxruntime (CPU), optionally GPU.

Usage::

    python benchmarks/bench_models.py --sizes 256 --repeats 3
    python benchmarks/bench_models.py --presets VSCyto3D --sizes 1024 --repeats 1 --warmup 0
    python benchmarks/bench_models.py --gpu            # + torch fp32 / bf16 autocast / ORT CUDA

Weights are random (timing does not depend on them); batch size 1, input (1, C, Z, S, S).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from viscy.models import create_model, list_presets
from viscy.models.export import create_ort_session, cuda_usable, export_onnx


def timed(fn: Callable[[], object], repeats: int, warmup: int, sync: bool = False) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list_presets())
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 1024], help="YX edge lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch/ORT intra-op threads")
    parser.add_argument("--gpu", action="store_true", help="also time torch fp32/bf16 and ORT on CUDA")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.gpu and cuda_usable()
    if args.gpu and not gpu:
        print("--gpu: no usable CUDA device / CUDAExecutionProvider; GPU columns skipped")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats={args.repeats}")
    header = f"{'preset':<12} {'params':>11} {'input':>18} {'torch s':>9} {'ort s':>9} {'torch/ort':>9}"
    if gpu:
        header += f" {'cuda32 s':>9} {'bf16 s':>9} {'ortcuda s':>9}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            bench_preset(name, Path(tmp), args, gpu)


def bench_preset(name: str, tmp: Path, args: argparse.Namespace, gpu: bool) -> None:
    """Export one preset and print a row per size."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    spec = model.spec
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    onnx_path = export_onnx(model, tmp / f"{name}.onnx", example_yx=(64, 64))
    export_s = time.perf_counter() - t0
    cpu_sess = create_ort_session(onnx_path, device="cpu", threads=args.threads)
    rows = {}
    for size in args.sizes:
        y, x = spec.padded_yx(size, size)
        inp = torch.randn(1, spec.in_channels, spec.z_window_size, y, x)
        feed = {"input": inp.numpy()}
        with torch.no_grad():
            t_torch = timed(partial(model, inp), args.repeats, args.warmup)
        t_ort = timed(partial(cpu_sess.run, None, feed), args.repeats, args.warmup)
        rows[size] = (
            f"{name:<12} {params:>11,} {str(tuple(inp.shape)):>18} "
            f"{t_torch:>9.3f} {t_ort:>9.3f} {t_torch / t_ort:>9.2f}"
        )
        if not gpu:
            print(rows[size], flush=True)
    if gpu:
        model = model.cuda()
        gpu_sess = create_ort_session(onnx_path, device="cuda")
        for size in args.sizes:
            y, x = spec.padded_yx(size, size)
            g = torch.randn(1, spec.in_channels, spec.z_window_size, y, x, device="cuda")
            with torch.no_grad():
                t32 = timed(partial(model, g), args.repeats, args.warmup, sync=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    t16 = timed(partial(model, g), args.repeats, args.warmup, sync=True)
            t_oc = timed(partial(gpu_sess.run, None, {"input": g.cpu().numpy()}), args.repeats, args.warmup)
            print(rows[size] + f" {t32:>9.4f} {t16:>9.4f} {t_oc:>9.4f}", flush=True)
    print(f"{name:<12} export {export_s:.1f} s, {onnx_path.stat().st_size / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
