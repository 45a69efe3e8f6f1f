"""Benchmark ``viscy predict``: megapixels/s for torch vs ONNX with 1 and 2 actors, and peak RSS on a 2048^2 FOV.

Usage::

    RAY_AUTH_MODE=token .venv/bin/python benchmarks/bench_predict.py [--fovs 4] [--yx 512] [--workdir DIR]

Throughput is the wall time of ``run_predict`` (actor start-up included, as a user sees it) over the pixels
predicted. The memory part runs one (FOV, t) unit of a 2048 x 2048 FOV in a fresh child process (no Ray),
tiled and untiled, and reports the process's peak RSS (VmHWM) against its RSS after loading the model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UNET_KW = {"in_channels": 1, "out_channels": 2, "num_blocks": 3, "num_filters": 8}


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(args: argparse.Namespace) -> None:
    """One 2048^2 unit through the real read/predict/write path; prints JSON with RSS figures."""
    import numpy as np
    from iohub.ngff import open_ome_zarr

    from viscy.data.plate import Plate
    from viscy.models.config import ModelConfig
    from viscy.predict.backends import TorchBackend, describe_model
    from viscy.predict.run import predict_unit
    from viscy.predict.tiling import TilingOptions
    from viscy.predict.writer import OutputTarget

    work = Path(args.workdir)
    size = args.big
    src, dst = work / f"big_{size}.zarr", work / f"big_{size}_pred.zarr"
    if not src.exists():
        with open_ome_zarr(src, layout="hcs", mode="w-", channel_names=["Phase3D"]) as p:
            data = np.random.default_rng(0).normal(size=(1, 1, 1, size, size)).astype(np.float32)
            p.create_position("A", "1", "0").create_image("0", data, chunks=(1, 1, 1, size, size))
        with open_ome_zarr(dst, layout="hcs", mode="w-", channel_names=["a", "b"]) as p:
            p.create_position("A", "1", "0").create_zeros("0", (1, 2, 1, size, size), np.float32, (1, 1, 1, size, size))
    backend = TorchBackend(describe_model(ModelConfig(name="unet2d", kwargs=UNET_KW)), threads=1)
    plate = Plate(src)
    base = _rss_mib("VmRSS")
    opts = TilingOptions(yx_multiple=8, tile_yx=tuple(args.tile) if args.tile else None, overlap=0.25, batch_size=4)
    t0 = time.perf_counter()
    predict_unit(plate, "A/1/0", 0, (0, 1), backend, opts, ["Phase3D"], ["a", "b"], [], False,
                 OutputTarget(dst, "hcs", 0, False))
    print(json.dumps({"tile": args.tile, "base_mib": base, "peak_mib": _rss_mib("VmHWM"),
                      "seconds": time.perf_counter() - t0}))


def throughput(args: argparse.Namespace) -> list[dict]:
    """Plate prediction with each backend and actor count."""
    import torch

    from viscy.data.config import PreprocessConfig, SynthConfig
    from viscy.data.preprocess import run_preprocess
    from viscy.data.synth import write_synthetic_plate
    from viscy.models import create_model
    from viscy.models.config import ModelConfig
    from viscy.models.export import export_onnx, onnx_metadata
    from viscy.predict.config import PredictConfig
    from viscy.predict.run import run_predict
    from viscy.ray_utils import ensure_ray

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.helpers
    from tests.helpers import save_lightning_checkpoint

    ensure_ray()
    work = Path(args.workdir)
    plate = work / "bench.zarr"
    if not plate.exists():
        write_synthetic_plate(SynthConfig(output=plate, cols=["1"], fovs_per_well=args.fovs, t=1, z=1,
                                          yx=(args.yx, args.yx)))
        run_preprocess(PreprocessConfig(data_path=plate), progress=False)
    torch.manual_seed(0)
    model = create_model("unet2d", **UNET_KW).eval()
    ckpt = save_lightning_checkpoint(model, work / "bench.ckpt")
    meta = onnx_metadata(model, source_channels=["Phase3D"], target_channels=["Nuclei", "Membrane"],
                         normalization={"Phase3D": {"level": "fov_statistics", "subtrahend": "median",
                                                    "divisor": "iqr"}})
    onnx = export_onnx(model, work / "bench.onnx", metadata=meta)
    mpx = args.fovs * args.yx * args.yx / 1e6
    rows = []
    for backend in ("torch", "onnx"):
        for actors in (1, 2):
            out = work / f"out_{backend}_{actors}.zarr"
            kw = {"model": ModelConfig(name="unet2d", kwargs=UNET_KW, checkpoint=ckpt)} if backend == "torch" else {
                "onnx": onnx}
            cfg = PredictConfig(data_path=[plate], output=out, overwrite=True, progress=False, num_actors=actors,
                                tile_yx=(256, 256), **kw)
            st = run_predict(cfg)
            rows.append({"backend": backend, "actors": actors, "mpx": mpx, "seconds": st.seconds,
                         "mpx_per_s": mpx / st.seconds, "unit_seconds": st.unit_seconds,
                         # summed in-actor time: read + predict + write, without actor start-up
                         "mpx_per_actor_s": mpx / max(st.unit_seconds, 1e-9)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fovs", type=int, default=4)
    parser.add_argument("--yx", type=int, default=512)
    parser.add_argument("--big", type=int, default=2048)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--tile", type=int, nargs=2, default=None)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="bench_predict_")
    if args.memory_child:
        memory_child(args)
        return
    results: dict = {"workdir": args.workdir}
    mem = []
    for tile in (None, (512, 512)):
        cmd = [sys.executable, __file__, "--memory-child", "--workdir", args.workdir, "--big", str(args.big)]
        if tile:
            cmd += ["--tile", *map(str, tile)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        mem.append(json.loads(out))
        print(f"{args.big}^2 FOV, tile {tile}: peak RSS {mem[-1]['peak_mib']:.0f} MiB "
              f"(after model load {mem[-1]['base_mib']:.0f} MiB), {mem[-1]['seconds']:.1f} s", flush=True)
    results["memory"] = mem
    if not args.skip_throughput:
        results["throughput"] = throughput(args)
        for r in results["throughput"]:
            print(f"{r['backend']:>5} x{r['actors']} actor(s): {r['mpx']:.2f} Mpx in {r['seconds']:.1f} s = "
                  f"{r['mpx_per_s']:.3f} Mpx/s wall; {r['mpx_per_actor_s']:.3f} Mpx per actor-second", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
