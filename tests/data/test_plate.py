"""OME-Zarr data layer: plates from iohub and from ome-zarr-py, lazy reads, clear errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr

from tests.conftest import write_iohub_plate
from viscy.data.plate import Plate
from viscy.errors import ChannelNotFoundError, CorruptDataError, DataError, ShapeError


def write_ome_zarr_py_plate(path: Path, shape=(1, 2, 4, 96, 80)) -> tuple[Path, np.ndarray]:
    """An NGFF 0.4 plate written by ome-zarr-py (a second, independent writer)."""
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    data = np.random.default_rng(1).random(shape, dtype=np.float32)
    store = parse_url(str(path), mode="w").store
    root = zarr.group(store=store)
    write_plate_metadata(root, ["A"], ["1", "2"], ["A/1", "A/2"])
    for col in ("1", "2"):
        well = root.require_group("A").require_group(col)
        write_well_metadata(well, ["0"])
        image = well.require_group("0")
        write_image(data, image, axes="tczyx", scaler=None)
        # NGFF 0.4 keeps channel names in the image group's transitional "omero" block.
        image.attrs["omero"] = {"channels": [{"label": "Phase3D"}, {"label": "Nuclei"}]}
    return path, data


def test_iohub_plate_positions_channels_and_select(small_plate):
    with Plate(small_plate) as plate:
        assert plate.kind == "hcs"
        assert plate.positions == ["A/1/0", "A/1/1", "B/2/0"]
        assert plate.channel_names == ["Phase3D", "Nuclei", "Membrane"]
        assert plate.select(["A/1/*"]) == ["A/1/0", "A/1/1"]
        assert plate.channel_indices(["Membrane", "Phase3D"]) == [2, 0]
        info = plate.check_consistent()
        assert info.shape == (1, 3, 3, 64, 64)


@pytest.mark.parametrize("engine", ["tensorstore", "zarr"])
def test_read_region_matches_array_and_is_lazy(small_plate, engine):
    from iohub.ngff import open_ome_zarr

    with open_ome_zarr(small_plate / "A/1/1", layout="fov", mode="r") as pos:
        full = pos["0"][:]
    with Plate(small_plate, engine=engine) as plate:
        assert plate.image("A/1/1").engine == engine
        region = plate.read("A/1/1", 0, [2, 0], slice(1, 3), slice(10, 30), slice(5, 25))
        assert region.shape == (2, 2, 20, 20)
        np.testing.assert_array_equal(region[0], full[0, 2, 1:3, 10:30, 5:25])
        np.testing.assert_array_equal(region[1], full[0, 0, 1:3, 10:30, 5:25])
    # Lazy: with every other chunk of the position garbage, one slice of one channel still reads, so it
    # touched its own chunk only.
    keep = small_plate / "A/1/1/0/0/1/2/0/0"
    for chunk in (small_plate / "A/1/1/0").rglob("*"):
        if chunk.is_file() and not chunk.name.startswith(".") and chunk != keep:
            chunk.write_bytes(b"\x00garbage" * 4)
    with Plate(small_plate, engine=engine) as plate:
        np.testing.assert_array_equal(plate.read("A/1/1", 0, [1], slice(2, 3), slice(0, 8)), full[0, 1:2, 2:3, :8])
        with pytest.raises(CorruptDataError):
            plate.read("A/1/1", 0, [1], slice(1, 3))


def test_zarr_engine_opens_only_the_chunk_a_region_touches(small_plate, monkeypatch):
    with Plate(small_plate, engine="zarr") as plate:
        opened: list[str] = []
        store = plate.image("A/1/1").handle().store
        original = type(store).__getitem__

        def spy(self, key):
            opened.append(key)
            return original(self, key)

        monkeypatch.setattr(type(store), "__getitem__", spy)
        plate.read("A/1/1", 0, [1], slice(2, 3), slice(0, 8), slice(0, 8))
        assert [k for k in opened if not k.endswith((".zarray", ".zattrs", ".zgroup"))] == ["0/1/2/0/0"]


def test_ome_zarr_py_plate_opens_and_reads(tmp_path):
    path, data = write_ome_zarr_py_plate(tmp_path / "other.zarr")
    with Plate(path) as plate:
        assert plate.positions == ["A/1/0", "A/2/0"]
        assert plate.channel_names == ["Phase3D", "Nuclei"]
        np.testing.assert_array_equal(plate.read("A/2/0", 0, [1]), data[0, 1:2])


def test_position_path_and_fov_store(small_plate, tmp_path):
    with Plate(small_plate / "A/1/1") as plate:
        assert plate.positions == ["A/1/1"]
        assert plate.root == small_plate.resolve()
    from iohub.ngff import open_ome_zarr

    fov_path = tmp_path / "fov.zarr"
    with open_ome_zarr(fov_path, layout="fov", mode="w-", channel_names=["Phase3D"]) as pos:
        pos.create_image("0", np.ones((1, 1, 2, 32, 32), np.float32))
    with Plate(fov_path) as plate:
        assert plate.kind == "fov" and plate.positions == ["0"]
        assert plate.read("0").shape == (1, 2, 32, 32)


def test_plate_pickles_as_its_path(small_plate):
    import pickle

    plate = pickle.loads(pickle.dumps(Plate(small_plate)))
    assert plate.read("B/2/0").shape == (3, 3, 64, 64)


def test_missing_path_and_not_a_plate(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Plate(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_dataset("x", shape=(2,))
    with pytest.raises(DataError, match="not an OME-Zarr"):
        Plate(tmp_path / "plain.zarr")


def test_missing_channel_lists_available(small_plate):
    with Plate(small_plate) as plate, pytest.raises(ChannelNotFoundError) as err:
        plate.channel_indices(["Phase3D", "DAPI"])
    assert "'DAPI'" in str(err.value) and "Phase3D, Nuclei, Membrane" in str(err.value)


def test_window_and_patch_too_large(small_plate):
    with Plate(small_plate) as plate:
        with pytest.raises(ShapeError, match="z_window_size <= 3"):
            plate.check_window("A/1/0", 5, (32, 32))
        with pytest.raises(ShapeError, match="at most \\[64, 64\\]"):
            plate.check_window("A/1/0", 1, (128, 32))


def test_unsupported_dtype(tmp_path):
    path = write_iohub_plate(tmp_path / "c.zarr", positions=(("A", "1", "0"),), dtype="float32")
    arr = zarr.open_array(str(path / "A/1/0/0"), mode="r+")
    # Rewrite the array as complex64, which no model can take.
    grp = zarr.open_group(str(path / "A/1/0"), mode="r+")
    del grp["0"]
    grp.create_dataset("0", shape=arr.shape, dtype="complex64", chunks=arr.chunks)
    with Plate(path) as plate, pytest.raises(DataError, match="complex64 is not supported"):
        plate.image("A/1/0")


def test_wrong_axis_order(tmp_path):
    path = write_iohub_plate(tmp_path / "axes.zarr", positions=(("A", "1", "0"),))
    attrs_path = path / "A/1/0/.zattrs"
    attrs = json.loads(attrs_path.read_text())
    axes = attrs["multiscales"][0]["axes"]
    attrs["multiscales"][0]["axes"] = [axes[0], axes[2], axes[1], axes[3], axes[4]]  # t z c y x
    attrs_path.write_text(json.dumps(attrs))
    with Plate(path) as plate, pytest.raises(DataError, match="viscy needs \\(t, c, z, y, x\\)"):
        plate.image("A/1/0")


def test_inconsistent_shapes(tmp_path):
    from iohub.ngff import open_ome_zarr

    path = tmp_path / "mixed.zarr"
    with open_ome_zarr(path, layout="hcs", mode="w-", channel_names=["Phase3D", "Nuclei"]) as plate:
        plate.create_position("A", "1", "0").create_image("0", np.zeros((1, 2, 3, 32, 32), np.float32))
        plate.create_position("A", "1", "1").create_image("0", np.zeros((1, 2, 5, 32, 32), np.float32))
    with Plate(path) as plate, pytest.raises(ShapeError, match="A/1/1"):
        plate.check_consistent()


def test_corrupt_chunk_is_named(small_plate):
    chunk = small_plate / "A/1/0/0/0/1/0/0/0"
    assert chunk.is_file()
    chunk.write_bytes(b"\x00garbage" * 4)
    with Plate(small_plate) as plate:
        with pytest.raises(CorruptDataError, match="A/1/0") as err:
            plate.read("A/1/0", 0, [1], slice(0, 1))
        assert "re-copy" in str(err.value)
        # Other chunks still read.
        assert plate.read("A/1/0", 0, [0], slice(0, 1)).shape == (1, 1, 64, 64)


def _rewrite_with_compressor(path: Path, position: str, compressor) -> None:
    """Rewrite one position's image with another numcodecs compressor (same data, same chunks)."""
    grp = zarr.open_group(str(path / position), mode="r+")
    data = grp["0"][:]
    del grp["0"]
    new = grp.create_dataset("0", shape=data.shape, dtype=data.dtype, chunks=(1, 1, 1) + data.shape[3:],
                             compressor=compressor, dimension_separator="/")
    new[:] = data


COMPRESSORS = {
    "blosc": "default",  # iohub's default (Blosc zstd), as every plate viscy writes
    "zlib": numcodecs.Zlib(),
    "gzip": numcodecs.GZip(),
    "zstd": numcodecs.Zstd(),
    "lz4": numcodecs.LZ4(),
    "uncompressed": None,
}


# Every compressor with every damage, except an empty GZip chunk: numcodecs decodes it to nothing and zarr
# 2.18 raises nothing (it hands back whatever the output buffer held), so no reader can flag it.
DAMAGES = [(c, d) for c in COMPRESSORS for d in ("garbage", "truncated", "empty") if (c, d) != ("gzip", "empty")]


# tensorstore reads these zarr v2 codecs itself; for the others (LZ4, and numcodecs' Zstd, whose metadata has a
# "checksum" member tensorstore refuses) the engine "auto" falls back to zarr-python 2.
TENSORSTORE_READS = {"blosc", "zlib", "gzip", "uncompressed"}


@pytest.mark.parametrize("engine", ["auto", "zarr"])
@pytest.mark.parametrize(("compressor", "damage"), DAMAGES)
def test_corrupt_or_truncated_chunk_of_every_compressor(tmp_path, compressor, damage, engine):
    path = write_iohub_plate(tmp_path / "c.zarr", positions=(("A", "1", "0"),))
    if COMPRESSORS[compressor] != "default":
        _rewrite_with_compressor(path, "A/1/0", COMPRESSORS[compressor])
    with Plate(path, engine=engine) as plate:
        intact = plate.read("A/1/0", 0, [1])
        used = plate.image("A/1/0").engine
        assert used == ("tensorstore" if engine == "auto" and compressor in TENSORSTORE_READS else "zarr")
    chunk = path / "A/1/0/0/0/1/2/0/0"
    raw = chunk.read_bytes()
    chunk.write_bytes({"garbage": b"\x00garbage" * 4, "truncated": raw[: len(raw) // 2], "empty": b""}[damage])
    with Plate(path, engine=engine) as plate:
        np.testing.assert_array_equal(plate.read("A/1/0", 0, [1], slice(0, 2)), intact[:, :2])
        with pytest.raises(CorruptDataError, match=r"A/1/0/0 at t=0, c=\[1\].*re-copy"):
            plate.read("A/1/0", 0, [1], slice(2, 3))
        assert plate.read("A/1/0", 0, [1], slice(0, 2)).shape == (1, 2, 64, 64)  # the other chunks read


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux procfs")
@pytest.mark.parametrize(("engine", "says"), [("zarr", "OSError"), ("tensorstore", "Error reading local file")])
def test_chunk_the_store_cannot_read_is_corrupt_data(small_plate, engine, says):
    # Reading /proc/self/mem from offset 0 fails with EIO for every user (root included): a real I/O error.
    chunk = small_plate / "A/1/0/0/0/0/0/0/0"
    chunk.unlink()
    chunk.symlink_to("/proc/self/mem")
    with Plate(small_plate, engine=engine) as plate, pytest.raises(CorruptDataError, match=says):
        plate.read("A/1/0", 0, [0], slice(0, 1))


def test_bad_selection_is_a_bug_not_corrupt_data(small_plate):
    """Selections a caller got wrong raise as they are: a bug must not become a silently skipped FOV."""
    with Plate(small_plate) as plate:
        with pytest.raises(IndexError, match="channel index 3 out of range for 3 channels"):
            plate.read("A/1/0", 0, [3])
        with pytest.raises(IndexError, match="channel index -1"):
            plate.read("A/1/0", 0, [-1])  # would silently read nothing as the slice -1:0
        with pytest.raises(TypeError, match="channel_indices"):
            plate.read("A/1/0", 0, ["Nuclei"])
        with pytest.raises(ValueError, match="slice step cannot be zero") as err:
            plate.read("A/1/0", 0, [0], y=slice(0, 8, 0))
        assert not isinstance(err.value, CorruptDataError)
        with pytest.raises(IndexError, match="out of bounds"):
            plate.read("A/1/0", 5, [0])  # t beyond the time points
        with pytest.raises(IndexError):
            plate.read("A/1/0", 0, [0], y=slice(None, None, -1))
        # The same plate still reads: nothing above was data corruption.
        assert plate.read("A/1/0", 0, [2, 0]).shape == (2, 3, 64, 64)


def test_unreadable_scale_warns_and_falls_back_to_unit_scale(small_plate):
    attrs_path = small_plate / "A/1/1/.zattrs"
    attrs = json.loads(attrs_path.read_text())
    attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"] = [{"type": "scale", "scale": [1.0, 0.5]}]
    attrs_path.write_text(json.dumps(attrs))
    with Plate(small_plate) as plate:
        with pytest.warns(UserWarning, match=r"position A/1/1 of .*small.zarr: cannot read the pixel scale.*broadcast"):
            info = plate.info("A/1/1")
        assert info.scale == (1.0,) * 5
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert plate.info("A/1/0").scale == (1.0,) * 5  # a readable (identity) scale: no warning
