"""Benchmark stain + segment + table in one ``viscy predict`` against predict, then a separate segmentation pass.

Usage::

    .venv/bin/python benchmarks/bench_stain_segment.py [--fovs 16] [--size 512] [--z 4] [--repeats 4]
                                                        [--stain-actors 2] [--segment-actors 2] [--workdir DIR]

Both variants run on the same synthetic plate (``write_synthetic_plate``, preprocessed) with the same
train-free model (a randomly initialised 2D U-Net exported to ONNX with its metadata, so ``viscy predict``
needs nothing else), as fresh processes, so each pays its own Python and Ray start-up:

* **one pass**: ``viscy predict --segment.method classical --segment.measure_channels Phase3D``: predictions,
  NGFF label images and ``viscy_objects.parquet``/``.csv`` in one Ray Data pipeline (staining actors, then
  segmentation actors);
* **two passes** (the baseline): ``viscy predict`` without segmentation, then this script as a second command
  (``--segment-pass``) that reads the written store back and segments it with viscy's own pieces: the same
  segmenter and table code (``SegmentActor``: ``get_segmenter``, ``object_table``), the same label-image and
  table writers (``viscy.predict.masks``), on Ray Data with an actor pool of the same size over the same
  ``(FOV, t)`` units.

The order alternates over repeats. Each pair asserts that both variants wrote the same masks and the same
object table. Printed: each command's wall time, the in-actor seconds ``viscy predict`` logs per stage (and
the second pass's), the stages' throughput in FOV-planes (FOV x T x Z) per second, and the ratio
one pass / two passes (goal <= 0.75).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

UNET_KW = {"in_channels": 1, "out_channels": 2, "num_blocks": 3, "num_filters": 8}
PHASE_NORM = {"channels": ["Phase3D"], "level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"}
MEASURE = ["Phase3D"]
VISCY = str(Path(sys.executable).with_name("viscy"))
PREDICT_LINE = re.compile(
    r"viscy predict: (?P<fovs>\d+) FOV\(s\), (?P<units>\d+) unit\(s\), (?P<mpx>[\d.]+) Mpx in (?P<elapsed>[\d.]+) s "
    r"\([\d.]+ Mpx/s; (?P<stain_s>[\d.]+) s inside (?P<stain_actors>\d+) actor"
)
SEGMENT_LINE = re.compile(
    r"; (?P<segment_s>[\d.]+) s inside (?P<segment_actors>\d+) segmentation actor\(s\)\) in .*?; "
    r"(?P<objects>\d+) object\(s\)"
)


# ------------------------------------------------------------------------------------------ assets
def make_assets(work: Path, fovs: int, size: int, z: int) -> tuple[Path, Path]:
    """A preprocessed synthetic plate (``fovs`` FOVs of ``z`` x ``size``^2) and a train-free ONNX U-Net.

    Returns
    -------
    tuple[pathlib.Path, pathlib.Path]
        The plate and the ONNX file (its metadata give channels and normalisation).
    """
    import torch

    from viscy.data.config import PreprocessConfig, SynthConfig
    from viscy.data.preprocess import run_preprocess
    from viscy.data.synth import write_synthetic_plate
    from viscy.models import create_model
    from viscy.models.export import export_onnx, onnx_metadata

    plate, onnx = work / "plate.zarr", work / "unet2d.onnx"
    if not plate.exists():
        write_synthetic_plate(SynthConfig(output=plate, cols=["1"], fovs_per_well=fovs, t=1, z=z, yx=(size, size)))
        run_preprocess(PreprocessConfig(data_path=plate), progress=False)
    if not onnx.exists():
        torch.manual_seed(0)
        model = create_model("unet2d", **UNET_KW).eval()
        meta = onnx_metadata(
            model,
            source_channels=["Phase3D"],
            target_channels=["Nuclei", "Membrane"],
            normalization=[PHASE_NORM],
            kwargs=UNET_KW,
        )
        export_onnx(model, onnx, metadata=meta)
    return plate, onnx


# ------------------------------------------------------------------------------ second pass (child)
class StoreSegmentActor:
    """Ray Data callable class of the baseline's second pass: reads a unit's predictions back from the store
    (and the measured input channels from the plate), then runs viscy's own :class:`SegmentActor` on them."""

    def __init__(self, store: str, plate: str, measure: list[str], segment_kwargs: dict[str, Any]) -> None:
        from viscy.data.plate import Plate
        from viscy.predict.segmentation import SegmentActor

        self.inner = SegmentActor(**segment_kwargs)
        self.store, self.plate, self.measure = Plate(store), Plate(plate), measure

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Read each unit's ``(C, Z, Y, X)`` prediction and measured channels, then segment, write and measure."""
        predictions, measured, seconds = [], [], []
        for i in range(len(batch["fov"])):
            t0 = time.perf_counter()
            fov, t = str(batch["fov"][i]), int(batch["t"][i])
            predictions.append(self.store.read(fov, t))
            if self.measure:
                measured.append(self.plate.read(fov, t, self.plate.channel_indices(self.measure)))
            seconds.append(time.perf_counter() - t0)
        rows = {
            "plate": batch["plate"],
            "fov": batch["fov"],
            "t": batch["t"],
            "seconds": np.asarray(seconds),
            "prediction": np.stack(predictions),
        }
        if measured:
            rows["measured"] = np.stack(measured)
        return self.inner(rows)


def segment_pass(store: Path, plate: Path, actors: int, cpus_per_actor: float) -> dict[str, Any]:
    """Segment every FOV of a prediction store and write its masks and object table as ``viscy predict`` does.

    Returns
    -------
    dict
        ``elapsed`` (s, from the start of this function), ``read_s`` and ``segment_s`` (summed in-actor
        seconds), ``units`` and ``objects``.
    """
    t_start = time.perf_counter()
    import ray

    from viscy.data.plate import Plate
    from viscy.predict.config import PredictSegmentConfig
    from viscy.predict.masks import prepare_masks, write_object_table
    from viscy.predict.segmentation import finish_fov, plan_segmentation, table_from_bytes
    from viscy.predict.writer import SUFFIX, ZARR_FORMAT, OutputTarget
    from viscy.ray_utils import ensure_ray

    pred = Plate(store)
    targets = [c.removesuffix(SUFFIX) for c in pred.channel_names]
    seg = plan_segmentation(
        PredictSegmentConfig(
            method="classical", measure_channels=MEASURE, num_actors=actors, num_cpus_per_actor=cpus_per_actor
        ),
        targets,
    )
    target = OutputTarget(pred.root, pred.kind, 0, False, zarr_format=ZARR_FORMAT[pred.version])
    fovs = pred.positions
    prepare_masks(target, pred, fovs, seg.masks, seg.record())
    units = [{"plate": str(store), "fov": f, "t": t} for f in fovs for t in range(pred.info(f).shape[0])]
    remaining = {f: pred.info(f).shape[0] for f in fovs}

    ensure_ray()  # as viscy predict: a private local cluster, Ray Data without progress bars or reservation
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.op_resource_reservation_enabled = False
    ctx.raise_original_map_exception = True
    cpus = cpus_per_actor * min(1.0, ray.cluster_resources().get("CPU", 1) / (actors * cpus_per_actor))
    segment_kwargs = {
        "segment": seg.config.model_dump(mode="json"),
        "targets": targets,
        "chosen": seg.chosen,
        "outputs": {str(store): target},
        "plate_names": {str(store): Plate(plate).root.name},
        "threads": max(1, int(cpus)),
    }
    ds = ray.data.from_items(units, override_num_blocks=min(len(units), 2000))
    ds = ds.map_batches(
        StoreSegmentActor,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        fn_constructor_kwargs={
            "store": str(store),
            "plate": str(plate),
            "measure": MEASURE,
            "segment_kwargs": segment_kwargs,
        },
    )
    read_s = segment_s = 0.0
    rows: dict[str, list[Any]] = {f: [] for f in fovs}
    for row in ds.iter_rows():
        fov = str(row["fov"])
        read_s += float(row["seconds"])
        segment_s += float(row["segment_seconds"])
        rows[fov].append(table_from_bytes(row["objects"]))
        remaining[fov] -= 1
        if remaining[fov] == 0:
            finish_fov(target, fov, list(seg.masks), rows.pop(fov))
    _, objects = write_object_table(target, fovs, seg.columns(targets))
    return {
        "elapsed": time.perf_counter() - t_start,
        "read_s": read_s,
        "segment_s": segment_s,
        "units": len(units),
        "objects": objects,
    }


def _exit_like_viscy(code: int) -> None:
    """Leave as the ``viscy`` command does: every ``atexit`` handler (Ray's shutdown), no module teardown."""
    import atexit

    getattr(atexit, "_run_exitfuncs", lambda: None)()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ------------------------------------------------------------------------------------------ driver
def run_command(cmd: list[str]) -> tuple[float, str]:
    """Run a command; its wall time and stdout (raises with its output if it fails)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return wall, proc.stdout


def predict_command(plate: Path, onnx: Path, out: Path, args: argparse.Namespace, segment: bool) -> list[str]:
    """The ``viscy predict`` command line of one variant."""
    cmd = [
        VISCY,
        "predict",
        "--data_path",
        str(plate),
        "--onnx",
        str(onnx),
        "--output",
        str(out),
        "--num_actors",
        str(args.stain_actors),
        "--progress",
        "false",
    ]
    if segment:
        cmd += [
            "--segment.method",
            "classical",
            "--segment.measure_channels",
            json.dumps(MEASURE),
            "--segment.num_actors",
            str(args.segment_actors),
        ]
    return cmd


def parse_predict(stdout: str, segment: bool) -> dict[str, float]:
    """The figures ``viscy predict`` prints: internal elapsed time and in-actor seconds per stage."""
    m = PREDICT_LINE.search(stdout)
    if m is None:
        raise RuntimeError(f"no summary line in viscy predict's output:\n{stdout}")
    out = {"elapsed": float(m["elapsed"]), "stain_s": float(m["stain_s"]), "units": int(m["units"])}
    if segment:
        s = SEGMENT_LINE.search(stdout)
        if s is None:
            raise RuntimeError(f"no segmentation line in viscy predict's output:\n{stdout}")
        out.update(segment_s=float(s["segment_s"]), objects=int(s["objects"]))
    return out


def one_pass(plate: Path, onnx: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``viscy predict`` with segmentation: one command."""
    wall, stdout = run_command(predict_command(plate, onnx, out, args, segment=True))
    return {"wall": wall, **parse_predict(stdout, segment=True)}


def two_passes(plate: Path, onnx: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``viscy predict`` without segmentation, then the segmentation pass over its store: two commands."""
    wall_p, stdout = run_command(predict_command(plate, onnx, out, args, segment=False))
    child = [
        sys.executable,
        __file__,
        "--segment-pass",
        "--store",
        str(out),
        "--plate",
        str(plate),
        "--segment-actors",
        str(args.segment_actors),
    ]
    wall_s, seg_out = run_command(child)
    seg = json.loads(seg_out.strip().splitlines()[-1])
    return {
        "wall": wall_p + wall_s,
        "predict_wall": wall_p,
        "segment_wall": wall_s,
        **parse_predict(stdout, segment=False),
        "segment_elapsed": seg["elapsed"],
        "read_s": seg["read_s"],
        "segment_s": seg["segment_s"],
        "objects": seg["objects"],
    }


def assert_same(one: Path, two: Path) -> tuple[int, int]:
    """Assert that both stores hold the same masks and object table; the number of label planes and objects."""
    import pandas as pd

    from viscy.data.plate import Plate

    a, b = Plate(one), Plate(two)
    assert a.positions == b.positions, (a.positions, b.positions)
    planes = 0
    for fov in a.positions:
        names = a.labels(fov)
        assert names == b.labels(fov) and names, (fov, names, b.labels(fov))
        for name in names:
            for t in range(a.info(fov).shape[0]):
                la = a.read(fov, t, array=a.label_key(fov, name))
                lb = b.read(fov, t, array=b.label_key(fov, name))
                assert la.dtype == lb.dtype and np.array_equal(la, lb), f"masks differ: {fov} {name} t={t}"
                planes += la.shape[1]
    keys = ["fov", "t", "channel", "label"]
    ta = pd.read_parquet(one / "viscy_objects.parquet").sort_values(keys, ignore_index=True)
    tb = pd.read_parquet(two / "viscy_objects.parquet").sort_values(keys, ignore_index=True)
    pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    csv_a, csv_b = (pd.read_csv(p / "viscy_objects.csv").sort_values(keys, ignore_index=True) for p in (one, two))
    pd.testing.assert_frame_equal(csv_a, csv_b)
    return planes, len(ta)


def _rate(planes: int, seconds: float) -> float:
    """FOV-planes per second (NaN for no time)."""
    return planes / seconds if seconds > 0 else float("nan")


def report(planes: int, pairs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Print each pair's figures and the ratio one pass / two passes."""
    a, b = args.stain_actors, args.segment_actors
    for i, p in enumerate(pairs):
        o, t = p["one"], p["two"]
        print(
            f"pair {i + 1} ({p['first']} first): one pass {o['wall']:.1f} s | two passes {t['wall']:.1f} s "
            f"(predict {t['predict_wall']:.1f} + segment {t['segment_wall']:.1f}) | ratio {p['ratio']:.3f}",
            flush=True,
        )
        print(
            f"  one pass : predict's own time {o['elapsed']:.1f} s; staining {o['stain_s']:.1f} actor-s "
            f"({_rate(planes, o['stain_s'] / a):.2f} FOV-planes/s over {a} actor(s)), segmentation "
            f"{o['segment_s']:.1f} actor-s ({_rate(planes, o['segment_s'] / b):.2f} over {b}); "
            f"{_rate(planes, o['wall']):.2f} FOV-planes/s stained+segmented per command second",
            flush=True,
        )
        print(
            f"  two passes: predict's own time {t['elapsed']:.1f} s; staining {t['stain_s']:.1f} actor-s "
            f"({_rate(planes, t['stain_s'] / a):.2f} FOV-planes/s over {a} actor(s); "
            f"{_rate(planes, t['predict_wall']):.2f} per command second); segmentation pass's own time "
            f"{t['segment_elapsed']:.1f} s, read-back {t['read_s']:.1f} + segment/measure/write "
            f"{t['segment_s']:.1f} actor-s ({_rate(planes, (t['read_s'] + t['segment_s']) / b):.2f} FOV-planes/s "
            f"over {b} actor(s); {_rate(planes, t['segment_wall']):.2f} per command second)",
            flush=True,
        )
    ratios = [p["ratio"] for p in pairs]
    print(
        f"one pass / two passes: median {statistics.median(ratios):.3f} over {len(ratios)} pair(s) "
        f"({', '.join(f'{r:.3f}' for r in ratios)}); goal <= 0.75",
        flush=True,
    )


def main() -> None:
    """Build the assets, run the pairs, check that they agree, print the figures (and one JSON line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fovs", type=int, default=16, help="FOVs of the synthetic plate")
    parser.add_argument("--size", type=int, default=512, help="FOV edge in pixels (Y = X)")
    parser.add_argument("--z", type=int, default=4, help="Z slices per FOV")
    parser.add_argument("--repeats", type=int, default=4, help="pairs of runs, order alternating")
    parser.add_argument("--stain-actors", type=int, default=2, help="staining actors (both variants)")
    parser.add_argument("--segment-actors", type=int, default=2, help="segmentation actors (both variants)")
    parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the last pair's stores")
    parser.add_argument("--segment-pass", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plate", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.segment_pass:
        print(json.dumps(segment_pass(Path(args.store), Path(args.plate), args.segment_actors, 1.0)), flush=True)
        _exit_like_viscy(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_stain_segment_"))
    marker = work / ".bench_stain_segment"
    # The benchmark replaces its own stores between runs: never in a directory it did not make.
    if work.is_symlink() or (work.exists() and any(work.iterdir()) and not marker.is_file()):
        sys.exit(f"--workdir {work} holds files this benchmark did not write; give a new or empty directory")
    work.mkdir(parents=True, exist_ok=True)
    marker.touch()
    plate, onnx = make_assets(work / f"assets_{args.fovs}x{args.z}x{args.size}", args.fovs, args.size, args.z)
    print(
        f"plate {plate}: {args.fovs} FOV(s) of {args.z} x {args.size}^2; {args.stain_actors} staining and "
        f"{args.segment_actors} segmentation actor(s); {os.cpu_count()} CPU(s)",
        flush=True,
    )
    pairs, planes, objects = [], 0, 0
    for i in range(args.repeats):
        order = ["one", "two"] if i % 2 == 0 else ["two", "one"]
        outs = {k: work / f"{k}_pass.zarr" for k in order}
        res = {}
        for kind in order:
            shutil.rmtree(outs[kind], ignore_errors=True)
            res[kind] = (one_pass if kind == "one" else two_passes)(plate, onnx, outs[kind], args)
        planes, objects = assert_same(outs["one"], outs["two"])
        assert res["one"]["objects"] == res["two"]["objects"] == objects, (res, objects)
        pairs.append({"first": order[0], **res, "ratio": res["one"]["wall"] / res["two"]["wall"]})
        if not args.keep or i < args.repeats - 1:
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
    print(f"both variants wrote the same masks ({planes} FOV-planes) and object table ({objects} objects)", flush=True)
    report(planes, pairs, args)
    print(
        json.dumps(
            {
                "workdir": str(work),
                "fovs": args.fovs,
                "size": args.size,
                "z": args.z,
                "planes": planes,
                "objects": objects,
                "stain_actors": args.stain_actors,
                "segment_actors": args.segment_actors,
                "pairs": pairs,
                "ratio_median": statistics.median(p["ratio"] for p in pairs),
            }
        )
    )


if __name__ == "__main__":
    main()
