"""Plates written by current OME-Zarr tools: NGFF 0.5 on zarr v3 (sharded or not), NGFF 0.4 with ``s0`` pyramids.

The stores in ``tests/data/stores`` were written by ome-zarr-py 0.18 / zarr-python 3 (``make_fixtures.py``,
which also defines the pixel values); version and format errors are made from copies of them.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.data.make_fixtures import CHANNELS, CHUNKS, SHAPE, SHARDS, fixture_image
from viscy.data.engine import LazyArray
from viscy.data.plate import Plate, summarize_plate
from viscy.errors import CorruptDataError, DataError

STORES = Path(__file__).resolve().parent / "stores"
PLATES = {  # store: (NGFF version, zarr format, shards)
    "ngff05.zarr": ("0.5", 3, None),
    "ngff05_sharded.zarr": ("0.5", 3, SHARDS),
    "ngff04_pyramid.zarr": ("0.4", 2, None),
}


@pytest.fixture
def copy_of(tmp_path):
    """A writable copy of a committed store."""

    def make(name: str) -> Path:
        return Path(shutil.copytree(STORES / name, tmp_path / name))

    return make


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("store", sorted(PLATES))
def test_plate_of_current_writers_opens_and_reads(store):
    version, zarr_format, shards = PLATES[store]
    with Plate(STORES / store) as plate:
        assert (plate.kind, plate.version, plate.zarr_format) == ("hcs", version, zarr_format)
        assert plate.positions == ["A/1/0", "A/2/0"]
        assert plate.channel_names == list(CHANNELS)
        assert plate.channel_indices(["Membrane", "Phase3D"]) == [2, 0]
        assert plate.image_key("A/1/0") == "s0"  # the full resolution, from multiscales
        info = plate.check_consistent()
        assert (info.shape, info.dtype, info.chunks, info.shards) == (SHAPE, np.dtype("uint16"), CHUNKS, shards)
        assert info.scale == (1.0, 1.0, 2.0, 0.5, 0.25)
        for i, name in enumerate(plate.positions):
            expected = fixture_image(i)
            np.testing.assert_array_equal(plate.read(name, 1), expected[1])
            region = plate.read(name, 0, [2, 0], slice(1, 4), slice(10, 40), slice(5, 60))
            np.testing.assert_array_equal(region, expected[0][[2, 0], 1:4, 10:40, 5:60])
            strided = plate.read(name, 1, [1], slice(None), slice(3, None, 4), slice(None, None, 4))
            np.testing.assert_array_equal(strided, expected[1, 1:2, :, 3::4, ::4])
        assert not plate.has_array("A/1/0", "fg_mask") and plate.labels("A/1/0") == []
        assert plate.has_array("A/1/0", "s1")  # a lower level of the pyramid is an array too
        assert plate.array("A/1/0", "s1").shape == (2, 3, 5, 24, 32)


@pytest.mark.parametrize("store", ["ngff05.zarr", "ngff05_sharded.zarr"])
def test_fixture_matches_tensorstore_read_directly(store):
    """The fixture holds what make_fixtures.py says (read without viscy)."""
    import tensorstore as ts

    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(STORES / store / "A/2/0/s0")}}).result()
    np.testing.assert_array_equal(arr.read().result(), fixture_image(1))


def test_single_image_store_and_position_path():
    with Plate(STORES / "ngff05_fov.zarr") as plate:
        assert (plate.kind, plate.version, plate.positions) == ("fov", "0.5", ["0"])
        assert plate.channel_names == ["Phase3D", "Nuclei"]
        np.testing.assert_array_equal(plate.read("0", 1, [1], slice(2, 3)), fixture_image(0)[1, 1:2, 2:3])
    with Plate(STORES / "ngff05.zarr/A/2/0") as plate:
        assert plate.positions == ["A/2/0"] and plate.root == (STORES / "ngff05.zarr").resolve()
        np.testing.assert_array_equal(plate.read("A/2/0", 0, [0]), fixture_image(1)[0, :1])


def test_v3_plate_and_arrays_pickle_and_reopen_lazily():
    plate = Plate(STORES / "ngff05_sharded.zarr")
    plate.read("A/1/0", 0, [0], slice(0, 1))  # opens a tensorstore handle
    copy = pickle.loads(pickle.dumps(plate))
    assert copy._arrays == {}  # handles are not pickled
    np.testing.assert_array_equal(copy.read("A/2/0", 1, [2]), fixture_image(1)[1, 2:3])
    arr = pickle.loads(pickle.dumps(plate.image("A/1/0")))
    assert isinstance(arr, LazyArray) and arr._handle is None
    np.testing.assert_array_equal(arr[0, 1, 2], fixture_image(0)[0, 1, 2])


def test_engines_agree_on_ngff04_and_zarr_python_refuses_v3():
    with Plate(STORES / "ngff04_pyramid.zarr", engine="zarr") as a, Plate(STORES / "ngff04_pyramid.zarr") as b:
        assert a.image("A/1/0").engine == "zarr" and b.image("A/1/0").engine == "tensorstore"
        np.testing.assert_array_equal(a.read("A/1/0", 1, [2, 1]), b.read("A/1/0", 1, [2, 1]))
    with pytest.raises(DataError, match="zarr v3.*use engine 'tensorstore'"):
        Plate(STORES / "ngff05.zarr", engine="zarr")
    with pytest.raises(DataError, match="unknown read engine 'dask'"):
        Plate(STORES / "ngff05.zarr", engine="dask")


def test_info_summary_of_a_v3_plate():
    text = summarize_plate(STORES / "ngff05_sharded.zarr")
    assert "NGFF 0.5, zarr v3" in text and "Phase3D, Nuclei, Membrane" in text and "shards" in text


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("version", "says"), [("0.6", "newer"), ("0.6.dev2", "newer"), ("0.3", "older")])
def test_unsupported_ngff_version_is_named(copy_of, version, says):
    path = copy_of("ngff05.zarr")
    _edit_json(path / "zarr.json", lambda m: m["attributes"]["ome"].update(version=version))
    with pytest.raises(DataError, match=rf"OME-NGFF {version}, {says} than viscy reads \(NGFF 0.4 and 0.5\)"):
        Plate(path)


def test_unsupported_version_of_an_image_is_named(copy_of):
    path = copy_of("ngff04_pyramid.zarr")
    _edit_json(path / "A/2/0/.zattrs", lambda m: m["multiscales"][0].update(version="0.6"))
    with pytest.raises(DataError, match=r"A/2/0 is OME-NGFF 0.6, newer"):
        Plate(path)


def test_stores_that_are_not_ome_zarr_say_what_they_are(tmp_path, copy_of):
    plain = tmp_path / "plain_v3.zarr"
    plain.mkdir()
    (plain / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"x": 1}}))
    with pytest.raises(DataError, match=r"not an OME-Zarr .*zarr v3 group without OME-NGFF 0.5 metadata.*\['x'\]"):
        Plate(plain)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"not an OME-Zarr .*directory without zarr metadata.*notes.txt"):
        Plate(folder)
    with pytest.raises(DataError, match=r"not an OME-Zarr .*zarr v3 array"):
        Plate(STORES / "ngff05.zarr/A/1/0/s0")
    with pytest.raises(DataError, match="is an OME-Zarr well.*point to the plate root"):
        Plate(STORES / "ngff05.zarr/A/1")
    path = copy_of("ngff05.zarr")
    ome = json.loads((path / "zarr.json").read_text())["attributes"]["ome"]
    assert ome["version"] == ome["plate"]["version"] == "0.5"  # ome-zarr-py repeats it inside plate
    for meta in (ome, ome["plate"]):
        del meta["version"]
    _edit_json(path / "zarr.json", lambda m: m["attributes"].update(ome=ome))
    with pytest.raises(DataError, match="attributes name no NGFF version"):
        Plate(path)


def test_missing_full_resolution_array_is_explained(copy_of):
    path = copy_of("ngff04_pyramid.zarr")
    for well in ("1", "2"):
        shutil.rmtree(path / f"A/{well}/0/s0")
    with pytest.raises(DataError, match=r"no positions with an image.*multiscales\[0\]\.datasets\[0\]\.path"):
        Plate(path)


# ---------------------------------------------------------------------------------- corrupt data and selections
@pytest.mark.parametrize("store", ["ngff05.zarr", "ngff05_sharded.zarr"])
def test_corrupt_v3_chunk_or_shard_is_named(copy_of, store):
    path = copy_of(store)
    key = "A/1/0/s0/c/0/1/2/0/0" if store == "ngff05.zarr" else "A/1/0/s0/c/0/1/0/0/0"
    chunk = path / key
    assert chunk.is_file()
    chunk.write_bytes(chunk.read_bytes()[:40])  # truncated
    with Plate(path) as plate:
        with pytest.raises(CorruptDataError, match=r"A/1/0/s0 at t=0, c=\[1\].*re-copy"):
            plate.read("A/1/0", 0, [1], slice(2, 3))
        np.testing.assert_array_equal(plate.read("A/1/0", 0, [0], slice(2, 3)), fixture_image(0)[0, :1, 2:3])


def test_bad_selection_on_v3_is_a_bug_not_corrupt_data():
    with Plate(STORES / "ngff05_sharded.zarr") as plate:
        with pytest.raises(IndexError, match="out of bounds"):
            plate.read("A/1/0", 2, [0])
        with pytest.raises(IndexError, match="channel index 3"):
            plate.read("A/1/0", 0, [3])
        with pytest.raises(ValueError, match="slice step cannot be zero"):
            plate.read("A/1/0", 0, [0], y=slice(0, 8, 0))
        with pytest.raises(IndexError, match="step >= 1"):
            plate.read("A/1/0", 0, [0], x=slice(None, None, -1))
        # numpy semantics: slices past the end are clipped, empty slices read nothing
        assert plate.read("A/1/0", 0, [0], y=slice(40, 100)).shape == (1, 5, 8, 64)
        assert plate.read("A/1/0", 0, [0], z=slice(3, 1)).shape == (1, 0, 48, 64)


# ---------------------------------------------------------------------------------- writing into NGFF 0.5
def test_statistics_and_mask_written_into_ngff05_plate_train_patches(copy_of):
    """preprocess's per-FOV task and writer (run here without Ray) on a sharded NGFF 0.5 plate, then patches."""
    from viscy.data.config import NormalizationConfig
    from viscy.data.patches import PatchSampler, PatchSpec
    from viscy.data.preprocess import fov_statistics_task, write_statistics

    path = copy_of("ngff05_sharded.zarr")
    results = [fov_statistics_task(str(path), n, list(CHANNELS), 4, "Nuclei", 1.0) for n in ("A/1/0", "A/2/0")]
    assert all(r.skipped is None for r in results)
    stats = write_statistics(Plate(path), results, list(CHANNELS))
    for group in (path, path / "A/1/0"):
        meta = json.loads((group / "zarr.json").read_text())
        assert meta["zarr_format"] == 3 and meta["attributes"]["ome"]["version"] == "0.5"  # NGFF metadata intact
        assert set(meta["attributes"]["normalization"]) == set(CHANNELS)  # viscy's key beside "ome"
    mask_meta = json.loads((path / "A/1/0/fg_mask/zarr.json").read_text())
    assert mask_meta["zarr_format"] == 3 and mask_meta["data_type"] == "uint8"
    assert mask_meta["attributes"]["channel"] == "Nuclei"
    assert mask_meta["attributes"]["otsu_threshold"] == results[0].otsu_threshold  # outside VisCy's layout
    with Plate(path) as plate:
        assert plate.channel_names == list(CHANNELS)  # the plate still opens as before
        norm = plate.normalization("A/2/0")["Nuclei"]
        assert norm["dataset_statistics"] == stats["Nuclei"] and "otsu_threshold" not in norm
        assert plate.plate_attrs()["normalization"]["Phase3D"]["dataset_statistics"] == stats["Phase3D"]
        mask = plate.read("A/1/0", 0, [0], array="fg_mask")  # (t=0 holds the threshold sample)
        assert mask.shape == (1, 5, 48, 64) and mask.dtype == np.uint8 and 0 < mask.mean() < 1
        assert plate.has_array("A/1/0", "fg_mask") and not plate.has_array("A/1/0", "fg_mask.partial")
    spec = PatchSpec(("Phase3D",), ("Nuclei",), z_window_size=3, yx_patch=(32, 32), target_2d=False)
    sampler = PatchSampler(path, spec, [NormalizationConfig()], fg_min_fraction=0.1, fg_weighted=True)
    sampler.validate(["A/1/0", "A/2/0"])
    batch = pickle.loads(pickle.dumps(sampler)).sample("A/2/0", 4, seed=0, augment=False)
    assert batch["source"].shape == (4, 1, 3, 32, 32) and batch["target"].shape == (4, 1, 3, 32, 32)
    assert np.isfinite(batch["source"]).all() and abs(float(batch["source"].mean())) < 5


def test_rerun_of_fg_mask_replaces_the_v3_mask(copy_of):
    from viscy.data.preprocess import write_fg_mask

    path = copy_of("ngff05.zarr")
    with Plate(path) as plate:
        first = write_fg_mask(plate, "A/1/0", 1, 1.0)
        again = write_fg_mask(plate, "A/1/0", 1, 1.0)
        assert first == again
        assert sorted(p.name for p in (path / "A/1/0").iterdir()) == ["fg_mask", "s0", "s1", "s2", "s3", "s4",
                                                                      "zarr.json"]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_child_reads_v2_with_zarr_python_and_refuses_v3_clearly():
    """tensorstore aborts a forked process that uses it: a fork child falls back (v2) or says why (v3)."""
    import os

    v2, v3 = Plate(STORES / "ngff04_pyramid.zarr"), Plate(STORES / "ngff05.zarr")
    v2.read("A/1/0", 0, [0])
    v3.read("A/1/0", 0, [0])  # tensorstore has run in this process
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        try:
            ok = np.array_equal(v2.read("A/2/0", 1, [2]), fixture_image(1)[1, 2:3]) and np.array_equal(
                v2.read("A/1/0", 0, [0]), fixture_image(0)[0, :1]  # its handle was the parent's tensorstore one
            )
            try:
                v3.read("A/1/0", 0, [0])
                said = "read"
            except DataError as exc:
                said = str(exc)
            os.write(write_fd, json.dumps([ok, v2.image("A/2/0").engine, said]).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd) as f:
        ok, engine, said = json.loads(f.read() or "[null, null, null]")
    assert os.waitstatus_to_exitcode(status) == 0
    assert ok is True and engine == "zarr"
    assert "forked" in said and "spawn" in said
    np.testing.assert_array_equal(v3.read("A/2/0", 0, [1]), fixture_image(1)[0, 1:2])  # the parent still reads


# ---------------------------------------------------------------------------------- prediction stores (no Ray)
@pytest.mark.parametrize(("store", "version"), [("ngff04_pyramid.zarr", "0.5"), ("ngff05_sharded.zarr", "0.4"),
                                                ("ngff05.zarr", None)])
def test_prediction_store_in_either_version(tmp_path, store, version):
    """predict's writer on its own: a new store in the asked version (None: the input's), resumable."""
    from viscy.predict.writer import check_output, is_complete, mark_complete, prepare_output, write_block

    plate = Plate(STORES / store)
    expected = version or plate.version
    out, targets = tmp_path / "pred.zarr", ["Nuclei", "Membrane"]
    assert check_output(plate, ["A/2/0"], out, targets, "fp", False, expected) == "create"
    target = prepare_output(plate, ["A/2/0"], out, targets, "fp", "create", {"model": "m"}, version)
    assert target.zarr_format == {"0.4": 2, "0.5": 3}[expected]
    block = np.random.default_rng(0).random((2, 3, 48, 64), dtype=np.float32)
    write_block(target, "A/2/0", 1, 2, block)
    mark_complete(target, "A/2/0", "fp", {"targets": targets})
    # a rerun with one more position resumes: the finished one is kept, the new one is added
    assert check_output(plate, ["A/1/0", "A/2/0"], out, targets, "fp", False, expected) == "resume"
    target = prepare_output(plate, ["A/1/0", "A/2/0"], out, targets, "fp", "resume", {"model": "m"}, version)
    assert is_complete(target, "A/2/0", "fp") and not is_complete(target, "A/1/0", "fp")
    with Plate(out) as pred:
        assert (pred.version, pred.positions) == (expected, ["A/1/0", "A/2/0"])
        assert pred.channel_names == ["Nuclei_prediction", "Membrane_prediction"]
        assert pred.info("A/1/0").scale == plate.info("A/1/0").scale
        np.testing.assert_array_equal(pred.read("A/2/0", 1, z=slice(2, 5)), block)
        assert not pred.read("A/2/0", 0).any()  # not written yet: zeros
        assert pred.plate_attrs()["viscy_prediction"] == {"model": "m", "fingerprint": "fp", "store": True}
    other = "0.4" if expected == "0.5" else "0.5"
    with pytest.raises(DataError, match=rf"as NGFF {expected}, not {other}; rerun with NGFF {expected}"):
        check_output(plate, ["A/2/0"], out, targets, "fp", False, other)
    assert check_output(plate, ["A/2/0"], out, targets, "fp", True, other) == "replace"


def test_prediction_store_of_a_single_v3_image(tmp_path):
    from viscy.predict.writer import is_complete, mark_complete, prepare_output, write_block

    plate = Plate(STORES / "ngff05_fov.zarr")
    target = prepare_output(plate, ["0"], tmp_path / "fov.zarr", ["Nuclei"], "fp", "create", {})
    write_block(target, "0", 0, 0, np.ones((1, 5, 48, 64), np.float32))
    mark_complete(target, "0", "fp")
    assert is_complete(target, "0", "fp")
    with Plate(tmp_path / "fov.zarr") as pred:
        assert (pred.kind, pred.version, pred.channel_names) == ("fov", "0.5", ["Nuclei_prediction"])
        assert pred.read("0", 0).mean() == 1 and pred.plate_attrs()["viscy_prediction"]["store"] is True


def test_output_version_is_checked():
    from viscy.predict.writer import resolve_output_version

    v2, v3 = Plate(STORES / "ngff04_pyramid.zarr"), Plate(STORES / "ngff05.zarr")
    assert resolve_output_version(v3, "auto", Path("x")) == "0.5" and resolve_output_version(v2, "auto", None) == "0.4"
    assert resolve_output_version(v3, "0.4", Path("x")) == "0.4"
    with pytest.raises(DataError, match="unknown output NGFF version '0.3'; choose one of auto, 0.4, 0.5"):
        resolve_output_version(v3, "0.3", Path("x"))
    with pytest.raises(DataError, match="keeps the input plate's NGFF version"):
        resolve_output_version(v2, "0.5", None)
