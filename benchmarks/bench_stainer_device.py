"""The VirtualStainer's compute path on CPU and on a GPU: onnxruntime through the shared tiling engine.

Usage::

    python benchmarks/bench_stainer_device.py --onnx model.onnx            # CPU, and CUDA when usable
    python benchmarks/bench_stainer_device.py --onnx model.onnx --sizes 256 1024 2048 --repeats 5

What a Serve replica does per request, without Ray: ``predict_plane_stack`` (tiles of 512, overlap 0.25,
Gaussian blending) with an onnxruntime session, batch 1 and batch 8 (the ``@serve.batch`` size). It imports
only numpy, onnxruntime and ``viscy.predict.tiling``, so it runs on a GPU machine without Ray. Prints p50 per
size and the CUDA / CPU ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from viscy.predict.tiling import TilingOptions, predict_plane_stack


def session(path: Path, provider: str, threads: int | None, search: str = "EXHAUSTIVE") -> ort.InferenceSession:
    """An onnxruntime session on one provider (CPU falls back nowhere; CUDA keeps CPU for unsupported ops)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers = (["CPUExecutionProvider"] if provider == "CPUExecutionProvider"
                 else [(provider, {"cudnn_conv_algo_search": search}), "CPUExecutionProvider"])
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def p50_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, required=True, help="an ONNX file exported by viscy export")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: onnxruntime's)")
    parser.add_argument("--yx-multiple", type=int, default=8)
    parser.add_argument("--cudnn-search", default="EXHAUSTIVE", choices=["EXHAUSTIVE", "HEURISTIC", "DEFAULT"],
                        help="cuDNN convolution algorithm search of the CUDA provider")
    args = parser.parse_args()

    providers = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}, providers {providers}")
    runs = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in providers else [])
    if len(runs) == 1:
        print("no CUDAExecutionProvider in this onnxruntime build: CPU figures only (install onnxruntime-gpu)")
    sessions = {p: session(args.onnx, p, args.threads if p.startswith("CPU") else None, args.cudnn_search)
                for p in runs}
    if "CUDAExecutionProvider" in sessions and sessions["CUDAExecutionProvider"].get_providers()[0] != runs[1]:
        print("the CUDA provider is listed but failed to load (CUDA/cuDNN libraries): CPU figures only")
        del sessions["CUDAExecutionProvider"]
        runs = runs[:1]
    name = sessions[runs[0]].get_inputs()[0].name
    rng = np.random.default_rng(0)
    print(f"{'size':>6} {'batch':>5} " + " ".join(f"{p.replace('ExecutionProvider', ''):>10}" for p in runs)
          + ("   cuda/cpu" if len(runs) == 2 else ""))
    for size in args.sizes:
        image = rng.normal(size=(1, 1, size, size)).astype(np.float32)
        for batch in (1, 8):
            opts = TilingOptions(tile_yx=(512, 512), overlap=0.25, yx_multiple=args.yx_multiple, batch_size=batch)
            row = {}
            for p, sess in sessions.items():
                def run(sess=sess, image=image, opts=opts) -> np.ndarray:
                    return predict_plane_stack(image, lambda x: sess.run(None, {name: x})[0], opts)

                row[p] = p50_ms(run, args.repeats)
            ratio = f"   {row[runs[1]] / row[runs[0]]:.3f}" if len(runs) == 2 else ""
            print(f"{size:>5}² {batch:>5} " + " ".join(f"{row[p]:>8.1f}ms" for p in runs) + ratio)


if __name__ == "__main__":
    main()
