"""The reader seam: the registry picks the NGFF 0.4 or 0.5 reader by the store, and a new format is one class
registered in one place (here a tiny format of ``.npy`` files, registered by this test)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from viscy.data.engine import normalize_selection
from viscy.data.formats import open_plate
from viscy.data.formats.ngff04 import Ngff04Reader
from viscy.data.formats.ngff05 import Ngff05Reader
from viscy.data.plate import Plate, summarize_plate
from viscy.data.reader import READERS, RegionArray, register_reader
from viscy.errors import DataError

STORES = Path(__file__).resolve().parent / "stores"


@pytest.mark.parametrize(
    ("store", "cls", "fmt"),
    [
        ("ngff04_pyramid.zarr", Ngff04Reader, "ngff-0.4"),
        ("ngff05.zarr", Ngff05Reader, "ngff-0.5"),
        ("ngff05_sharded.zarr/A/2/0", Ngff05Reader, "ngff-0.5"),
        ("ngff05_fov.zarr", Ngff05Reader, "ngff-0.5"),
    ],
)
def test_registry_picks_the_reader_of_the_store(store, cls, fmt):
    assert READERS["ngff-0.4"] is Ngff04Reader and READERS["ngff-0.5"] is Ngff05Reader
    reader = open_plate(STORES / store)
    assert type(reader) is cls and reader.format == fmt and reader.zarr_format == int(cls.zarr_format)
    with Plate(STORES / store) as plate:
        assert plate.reader.format == plate.format == fmt and plate.version == fmt.split("-")[1]


def test_an_iohub_plate_is_read_by_the_ngff04_reader(small_plate):
    reader = open_plate(small_plate)
    assert isinstance(reader, Ngff04Reader) and reader.positions() == ["A/1/0", "A/1/1", "B/2/0"]
    assert isinstance(reader.open_array("A/1/0", reader.image("A/1/0").dataset), RegionArray)


# ---------------------------------------------------------------------------------- a tiny format of .npy files
class NpyArray:
    """An in-memory array behind the RegionArray protocol."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shape, self.ndim, self.dtype = data.shape, data.ndim, data.dtype
        self.chunks, self.shards = data.shape, None

    def fetch(self, selection: Any) -> Callable[[], np.ndarray]:
        sel = tuple(list(s) if isinstance(s, tuple) else s for s in normalize_selection(selection, self.shape))
        return lambda: self.data[sel]


@dataclass(frozen=True)
class NpyImage:
    channel_labels: tuple[str, ...]
    axes: tuple[str, ...] = ("t", "c", "z", "y", "x")
    dataset: str = "image"

    @property
    def axes_metadata(self) -> list[dict[str, Any]]:
        return [{"name": a} for a in self.axes]

    def scale(self) -> tuple[float, ...]:
        return (1.0, 1.0, 2.0, 0.5, 0.5)


class NpyReader:
    """A directory with ``npy_plate.json`` (channels, attributes) and one ``<position>.npy`` TCZYX image each."""

    format = ""
    kind, version, zarr_format = "hcs", "1", None

    @classmethod
    def claims(cls, path: Path) -> bool:
        return (path / "npy_plate.json").is_file()

    def __init__(self, path: Path, engine: str = "auto") -> None:
        self.root = path
        self.meta = json.loads((path / "npy_plate.json").read_text())

    def positions(self) -> list[str]:
        return sorted(self.meta["positions"])

    def image(self, position: str) -> NpyImage:
        return NpyImage(tuple(self.meta["channels"]))

    def open_array(self, position: str, key: str) -> NpyArray | None:
        path = self.root / f"{position.replace('/', '_')}.{key}.npy"
        return NpyArray(np.load(path)) if path.is_file() else None

    def attrs(self, position: str | None = None) -> dict[str, Any]:
        return dict(self.meta["attrs"].get(position or "", {}))

    def write_attr(self, position: str | None, key: str, value: Any) -> None:
        self.meta["attrs"].setdefault(position or "", {})[key] = value
        (self.root / "npy_plate.json").write_text(json.dumps(self.meta))

    def labels(self, position: str) -> list[str]:
        return []

    def label_key(self, position: str, label: str) -> str | None:
        return None


@pytest.fixture
def npy_format():
    """The npy format, registered for one test (and removed after it, so other tests never see it)."""
    yield register_reader("npy-test")(NpyReader)
    READERS.pop("npy-test", None)


def _npy_plate(path: Path) -> np.ndarray:
    path.mkdir()
    data = np.arange(2 * 2 * 3 * 8 * 6, dtype=np.uint16).reshape(2, 2, 3, 8, 6)
    meta = {"positions": ["A/1/0", "B/1/0"], "channels": ["Phase3D", "Nuclei"], "attrs": {}}
    (path / "npy_plate.json").write_text(json.dumps(meta))
    for i, position in enumerate(meta["positions"]):
        np.save(path / f"{position.replace('/', '_')}.image.npy", data + i)
    return data


def test_a_new_format_registers_in_one_place_and_plate_reads_it(tmp_path, npy_format):
    data = _npy_plate(tmp_path / "plate.npy")
    assert READERS["npy-test"] is NpyReader and NpyReader.format == "npy-test"
    with Plate(tmp_path / "plate.npy") as plate:
        assert (plate.format, plate.kind, plate.zarr_format) == ("npy-test", "hcs", None)
        assert plate.positions == ["A/1/0", "B/1/0"] and plate.channel_names == ["Phase3D", "Nuclei"]
        info = plate.check_consistent()
        assert (info.shape, info.dtype, info.scale) == (data.shape, np.dtype("uint16"), (1.0, 1.0, 2.0, 0.5, 0.5))
        region = plate.read("B/1/0", 1, [1, 0], slice(1, 3), slice(2, 6), slice(None, None, 2))
        np.testing.assert_array_equal(region, (data + 1)[1, [1, 0], 1:3, 2:6, ::2])
        plate.set_position_attr("A/1/0", "normalization", {"Nuclei": {"fov_statistics": {"median": 3.0}}})
        assert plate.normalization("A/1/0")["Nuclei"]["fov_statistics"]["median"] == 3.0
        assert pickle.loads(pickle.dumps(plate)).positions == plate.positions  # reopens through the registry
    assert "format    npy-test 1" in summarize_plate(tmp_path / "plate.npy")


def test_registry_refuses_a_second_class_under_a_name_and_names_other_formats(tmp_path, npy_format):
    class Other(NpyReader):
        pass

    with pytest.raises(ValueError, match="'npy-test' is already registered"):
        register_reader("npy-test")(Other)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"not an OME-Zarr HCS plate or image \(nor .*npy-test\)"):
        Plate(tmp_path / "folder")
