"""Raw read+decode of training patches: zarr-python 2 vs tensorstore, on the same plate, in the same run.

Writes a synthetic NGFF 0.4 plate with iohub (zarr v2, VisCy's ``(1, 1, 1, Y, X)`` chunks, Blosc zstd), copies
its images to NGFF 0.5 (zarr v3, zstd; once with the same chunks, once sharded: ``(1, 1, Z, Y, X)`` shards of
``(1, 1, 1, 256, 256)`` chunks), then reads the same seeded list of ``(C=3, Z=5, 256, 256)`` patches through
``Plate.read`` with each engine, interleaving the engines round by round so that load on a shared machine
hits all of them alike. Prints patches/s, decoded MB/s and the ratio tensorstore / zarr-python 2 for zarr v2.
``tensorstore x1`` limits tensorstore to one decode thread (zarr-python 2 decodes in the calling thread).

Run: ``.venv/bin/python benchmarks/bench_read_engine.py [--yx 512] [--z 8] [--patches 40] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from viscy.data import engine as engine_mod
from viscy.data.config import SynthConfig
from viscy.data.plate import Plate
from viscy.data.synth import write_synthetic_plate

PATCH = (3, 5, 256, 256)


def _write_json(path: Path, obj: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "zarr.json").write_text(json.dumps(obj))


def copy_to_ngff05(src: Plate, dest: Path, inner_yx: int | None) -> Path:
    """The plate's images as an NGFF 0.5 plate (zarr v3, zstd), sharded when ``inner_yx`` is given."""
    import tensorstore as ts

    wells = sorted({n.rsplit("/", 1)[0] for n in src.positions})
    rows = sorted({w.split("/")[0] for w in wells})
    cols = sorted({w.split("/")[1] for w in wells})
    plate = {
        "version": "0.5",
        "rows": [{"name": r} for r in rows],
        "columns": [{"name": c} for c in cols],
        "wells": [{"path": w, "rowIndex": rows.index(w.split("/")[0]), "columnIndex": cols.index(w.split("/")[1])}
                  for w in wells],
    }
    group = {"zarr_format": 3, "node_type": "group"}
    _write_json(dest, {**group, "attributes": {"ome": {"version": "0.5", "plate": plate}}})
    for w in wells:
        images = [{"path": n.rsplit("/", 1)[1]} for n in src.positions if n.startswith(w + "/")]
        _write_json(dest / w, {**group, "attributes": {"ome": {"version": "0.5", "well": {"images": images}}}})
    for name in src.positions:
        data = np.stack([src.read(name, t) for t in range(src.info(name).shape[0])])
        t, c, z, y, x = data.shape
        axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
            {"name": a, "type": "space"} for a in "zyx"
        ]
        ms = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": list(src.info(name).scale)}]}]}
        omero = {"channels": [{"label": n} for n in src.channel_names]}
        _write_json(dest / name, {**group, "attributes": {"ome": {"version": "0.5", "multiscales": [ms],
                                                                    "omero": omero}}})
        codecs = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd",
                                                                              "configuration": {"level": 1}}]
        if inner_yx:
            chunk_shape = [1, 1, z, y, x]
            codecs = [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [1, 1, 1, inner_yx, inner_yx], "codecs": codecs,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]
        else:
            chunk_shape = [1, 1, 1, y, x]
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(dest / name / "0")},
            "metadata": {"shape": list(data.shape), "data_type": str(data.dtype), "codecs": codecs,
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk_shape}},
                         "dimension_names": list("tczyx")},
            "create": True,
        }
        ts.open(spec).result().write(data).result()
    return dest


def patch_list(plate: Plate, n: int, seed: int) -> list[tuple[str, int, int, int, int]]:
    """Seeded (fov, t, z0, y0, x0) of ``n`` patches."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        name = plate.positions[int(rng.integers(len(plate.positions)))]
        t_n, _, z_n, y_n, x_n = plate.info(name).shape
        out.append((name, int(rng.integers(t_n)), int(rng.integers(z_n - PATCH[1] + 1)),
                    int(rng.integers(y_n - PATCH[2] + 1)), int(rng.integers(x_n - PATCH[3] + 1))))
    return out


def read_patches(plate: Plate, patches: list[tuple[str, int, int, int, int]]) -> tuple[float, int]:
    """Seconds and decoded bytes for reading every patch."""
    nbytes = 0
    start = time.perf_counter()
    for name, t, z0, y0, x0 in patches:
        data = plate.read(name, t, [0, 1, 2], slice(z0, z0 + PATCH[1]), slice(y0, y0 + PATCH[2]),
                          slice(x0, x0 + PATCH[3]))
        nbytes += data.nbytes
    return time.perf_counter() - start, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--yx", type=int, default=512, help="FOV edge in pixels")
    parser.add_argument("--z", type=int, default=8, help="Z slices per FOV")
    parser.add_argument("--patches", type=int, default=40, help="patches per engine and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (engines interleaved in each)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        v2 = write_synthetic_plate(SynthConfig(output=Path(tmp) / "v2.zarr", cols=["1"], fovs_per_well=2, z=args.z,
                                               yx=(args.yx,) * 2))
        with Plate(v2, engine="zarr") as src:
            v3 = copy_to_ngff05(src, Path(tmp) / "v3.zarr", None)
            v3s = copy_to_ngff05(src, Path(tmp) / "v3s.zarr", 256)
        configs = {  # name: (plate path, engine, tensorstore decode threads)
            "v2 zarr-python 2": (v2, "zarr", None),
            "v2 tensorstore x1": (v2, "tensorstore", 1),
            "v2 tensorstore": (v2, "tensorstore", None),
            "v3 tensorstore": (v3, "tensorstore", None),
            "v3 sharded tensorstore": (v3s, "tensorstore", None),
        }
        patches = patch_list(Plate(v2), args.patches * args.rounds, seed=0)
        totals = {k: [0.0, 0] for k in configs}
        for r in range(-1, args.rounds):  # round -1 warms up (opens arrays, page cache)
            batch = patches[max(r, 0) * args.patches : (max(r, 0) + 1) * args.patches]
            for key, (path, engine, threads) in configs.items():
                engine_mod.set_read_threads(threads)
                with Plate(path, engine=engine) as plate:
                    seconds, nbytes = read_patches(plate, batch)
                if r >= 0:
                    totals[key][0] += seconds
                    totals[key][1] += nbytes
        engine_mod.set_read_threads(None)
    n = args.patches * args.rounds
    print(f"{n} patches of (C, Z, Y, X) = {PATCH} float32 from 2 FOVs of (1, 3, {args.z}, {args.yx}, {args.yx})")
    rate = {}
    for key, (seconds, nbytes) in totals.items():
        rate[key] = n / seconds
        print(f"  {key:<24} {rate[key]:8.1f} patches/s  {nbytes / seconds / 1e6:8.0f} MB/s decoded")
    base = rate["v2 zarr-python 2"]
    print(f"ratio tensorstore / zarr-python 2 on zarr v2: {rate['v2 tensorstore'] / base:.2f} "
          f"(one decode thread: {rate['v2 tensorstore x1'] / base:.2f})")


if __name__ == "__main__":
    main()
