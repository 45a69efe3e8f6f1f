"""Write the tiny OME-Zarr fixtures of ``tests/data/stores/`` with the real writers (ome-zarr-py, zarr v3).

The stores are committed; rerun this only to regenerate them. It needs ome-zarr-py >= 0.11 (zarr-python 3),
which cannot share viscy's environment (iohub 0.2 pins zarr 2), so it runs in a separate virtual environment::

    python3 -m venv /tmp/omezarr-venv
    /tmp/omezarr-venv/bin/pip install 'ome-zarr>=0.11' numpy
    /tmp/omezarr-venv/bin/python tests/data/make_fixtures.py

Stores (1 row x 2 wells x 1 FOV, T=2, C=3 ``Phase3D``/``Nuclei``/``Membrane``, Z=5, Y=48, X=64, uint16):

* ``ngff05.zarr``: NGFF 0.5 on zarr v3, ome-zarr-py's defaults (pyramid ``s0``..``s4``, zstd), chunks
  ``(1, 1, 1, 24, 32)``.
* ``ngff05_sharded.zarr``: the same with sharded arrays (shards ``(1, 1, 5, 48, 64)`` of ``(1, 1, 1, 24, 32)``
  chunks), written by ome-zarr-py's ``storage_options``.
* ``ngff04_pyramid.zarr``: NGFF 0.4 on zarr v2 (``FormatV04``), pyramid ``s0``..``s4``.
* ``ngff05_fov.zarr``: a single NGFF 0.5 image (no plate), channels ``Phase3D``/``Nuclei``.

Pixel values come from :func:`fixture_image`, which the tests import (this module needs only numpy at import).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

SHAPE = (2, 3, 5, 48, 64)  # T, C, Z, Y, X
CHANNELS = ("Phase3D", "Nuclei", "Membrane")
WELLS = ("1", "2")
CHUNKS = (1, 1, 1, 24, 32)
SHARDS = (1, 1, 5, 48, 64)
SCALE = {"t": 1.0, "c": 1.0, "z": 2.0, "y": 0.5, "x": 0.25}
STORES = Path(__file__).resolve().parent / "stores"


def fixture_image(index: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """The uint16 TCZYX image of well ``index``: every axis shifts values, compressible, deterministic.

    A seeded generator adds a small texture so that a read from the wrong place cannot match by chance.
    """
    t, c, z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    texture = np.random.default_rng(index).integers(0, 2, size=shape[-2:])
    values = 7000 * c + 3000 * t + 400 * z + 5 * y + x + 1000 * index + 8 * texture
    return values.astype(np.uint16)


def _omero(channels: tuple[str, ...]) -> dict:
    colors = ("FFFFFF", "00FF00", "FF00FF")
    return {
        "channels": [
            {"label": name, "color": colors[i % 3], "active": True, "window": {"start": 0, "end": 65535, "min": 0,
                                                                                 "max": 65535}}
            for i, name in enumerate(channels)
        ]
    }


def write_plate(path: Path, fmt, storage_options: dict | None = None) -> None:
    """An HCS plate A/1/0, A/2/0 written with ome-zarr-py in format ``fmt``."""
    import zarr
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    shutil.rmtree(path, ignore_errors=True)
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_plate_metadata(root, ["A"], list(WELLS), [f"A/{w}" for w in WELLS], fmt=fmt, field_count=1)
    for i, col in enumerate(WELLS):
        well = root.require_group("A").require_group(col)
        write_well_metadata(well, ["0"], fmt=fmt)
        image = well.require_group("0")
        write_image(
            fixture_image(i),
            image,
            axes="tczyx",
            fmt=fmt,
            scale=SCALE,
            storage_options=storage_options or {"chunks": CHUNKS},
            omero=_omero(CHANNELS),
        )


def write_fov(path: Path, fmt) -> None:
    """A single-image store (no plate) with two channels."""
    import zarr
    from ome_zarr.writer import write_image

    shutil.rmtree(path, ignore_errors=True)
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    image = fixture_image(0)[:, :2]
    write_image(image, root, axes="tczyx", fmt=fmt, scale=SCALE, storage_options={"chunks": CHUNKS},
                omero=_omero(CHANNELS[:2]))


def main() -> None:
    import ome_zarr
    import zarr
    from ome_zarr.format import FormatV04, FormatV05

    print(f"ome-zarr {ome_zarr.__version__}, zarr {zarr.__version__}, python {sys.version.split()[0]}")
    STORES.mkdir(exist_ok=True)
    write_plate(STORES / "ngff05.zarr", FormatV05())
    write_plate(STORES / "ngff05_sharded.zarr", FormatV05(), {"chunks": CHUNKS, "shards": SHARDS})
    write_plate(STORES / "ngff04_pyramid.zarr", FormatV04())
    write_fov(STORES / "ngff05_fov.zarr", FormatV05())
    for p in sorted(STORES.iterdir()):
        files = [f for f in p.rglob("*") if f.is_file()]
        print(f"{p.name}: {len(files)} files, {sum(f.stat().st_size for f in files) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
