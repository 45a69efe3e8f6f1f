"""The one place viscy writes OME-Zarr: stores, images, labels, extra arrays, pixel blocks and attributes.

Reading goes through the format readers (``viscy.data.reader``); every write goes through this module, with the
library chosen per format on purpose:

* **NGFF 0.4 on zarr v2: iohub 0.2, and zarr-python 2 underneath it.** VisCy reads plates with iohub 0.2, so
  plate, well and image metadata (and channel appends) are written by iohub itself, and what iohub has no call
  for (label images, extra arrays such as ``fg_mask``, attributes, pixel blocks of existing arrays) by
  zarr-python 2, the library iohub writes with: Blosc, nested ``/`` chunk keys and ``.zattrs`` stay what iohub
  and VisCy read. tensorstore could write zarr v2 too, but it would make its own choices of codec metadata
  and ``.zattrs`` handling, and nothing would check them against iohub's.
* **NGFF 0.5 on zarr v3: tensorstore for arrays (zstd, ``/`` chunk keys, as ome-zarr-py writes) and JSON for
  groups.** zarr-python 2 cannot write zarr v3, iohub 0.3 (which can) needs Python >= 3.12, and tensorstore is
  already viscy's reader; group metadata are a single ``zarr.json`` each, replaced atomically.

Nothing here decides *what* is written (layouts, markers and statistics belong to synth, preprocess and
predict); this module only knows *how* to write it for each format.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from viscy.data.engine import read_json, ts_context
from viscy.errors import DataError

# iohub (viscy's NGFF 0.4 writer) warns loudly (and harmlessly) about stores other writers made.
logging.getLogger("iohub").setLevel(logging.ERROR)

V3_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd", "configuration": {"level": 3}}]


def zarr_format(path: Path) -> int | None:
    """2 or 3 for a zarr v2 or v3 group or array at ``path`` (by its metadata files); ``None`` if neither."""
    v3 = read_json(path / "zarr.json")
    if v3 is not None and v3.get("zarr_format") == 3:
        return 3
    if (path / ".zarray").is_file() or (path / ".zgroup").is_file() or read_json(path / ".zattrs") is not None:
        return 2
    return None


# ---------------------------------------------------------------------------------- attributes
def write_attrs(node_path: Path, key: str, value: Any) -> None:
    """Set one top-level attribute of a zarr group or array.

    zarr v2 ``.zattrs`` are written through zarr-python 2; zarr v3 ``zarr.json`` ``attributes`` are rewritten
    atomically. In NGFF 0.5 the NGFF metadata live in ``attributes.ome``; iohub 0.3 and VisCy keep their own keys
    (``normalization``) at the top level beside it, and so does viscy.

    Raises
    ------
    DataError
        If ``node_path`` is not a zarr group or array.
    """
    fmt = zarr_format(node_path)
    if fmt is None:
        raise DataError(f"{node_path} is not a zarr group or array; cannot write its {key!r} attribute")
    if fmt == 2:
        import zarr

        zarr.open(str(node_path), mode="r+").attrs[key] = value
        return
    meta = read_json(node_path / "zarr.json") or {}
    meta.setdefault("attributes", {})[key] = value
    _replace_json(node_path / "zarr.json", meta)


def delete_attr(node_path: Path, key: str) -> None:
    """Remove one top-level attribute of a zarr v2 or v3 group or array (nothing if it is absent)."""
    fmt = zarr_format(node_path)
    if fmt == 2:
        import zarr

        attrs = zarr.open(str(node_path), mode="r+").attrs
        if key in attrs:
            del attrs[key]
        return
    meta = read_json(node_path / "zarr.json") if fmt == 3 else None
    if meta is not None and key in (meta.get("attributes") or {}):
        meta["attributes"].pop(key)
        _replace_json(node_path / "zarr.json", meta)


def _replace_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- arrays
class ArrayWriter:
    """A writable zarr v2 (zarr-python 2) or v3 (tensorstore) array; blocks are cast to its dtype."""

    def __init__(self, handle: Any, fmt: int) -> None:
        self.handle = handle
        self.zarr_format = fmt

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.handle.dtype.numpy_dtype if self.zarr_format == 3 else self.handle.dtype)

    def write(self, selection: tuple[Any, ...], data: np.ndarray) -> None:
        """Write ``data`` at ``selection`` (ints and slices), synchronously."""
        block = np.asarray(data).astype(self.dtype, copy=False)
        if self.zarr_format == 3:
            self.handle[selection].write(block).result()
        else:
            self.handle[selection] = block


def create_array(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, fmt: int) -> ArrayWriter:
    """Create (or replace) an array at ``path`` inside an existing group, unsharded.

    zarr v2: zarr-python 2's default compressor (Blosc), nested ``/`` chunk keys (as iohub reads them); zarr v3:
    zstd (:func:`create_v3_array`).
    """
    if fmt == 3:
        return ArrayWriter(create_v3_array(path, shape, chunks, dtype), 3)
    import zarr

    group = zarr.open_group(str(path.parent), mode="r+")
    if path.name in group:
        del group[path.name]
    arr = group.create_dataset(
        path.name, shape=shape, chunks=chunks, dtype=dtype, overwrite=True, dimension_separator="/"
    )
    return ArrayWriter(arr, 2)


def open_array(path: Path, fmt: int | None = None) -> ArrayWriter:
    """The existing zarr v2 or v3 array at ``path``, for writing (``fmt``: its zarr format, if known).

    Raises
    ------
    DataError
        If there is no zarr array at ``path``.
    """
    fmt = fmt or zarr_format(path)
    if fmt == 3:
        return ArrayWriter(open_v3_array(path), 3)
    if fmt is None:
        raise DataError(f"{path} is not a zarr array; cannot write to it")
    import zarr

    return ArrayWriter(zarr.open_array(str(path), mode="r+"), 2)


def create_v3_array(
    path: Path,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    dimension_names: tuple[str, ...] = ("t", "c", "z", "y", "x"),
):
    """Create (or replace) a zarr v3 array (zstd, ``/`` chunk keys, as ome-zarr-py writes); its writable
    tensorstore handle."""
    import tensorstore as ts

    if path.exists():
        shutil.rmtree(path)
    metadata: dict[str, Any] = {
        "shape": list(shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": V3_CODECS,
        "fill_value": 0,
        "dimension_names": list(dimension_names),
    }
    return ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path.resolve()) + "/"}, "metadata": metadata},
        create=True,
        context=ts_context(),
    ).result()


def open_v3_array(path: Path):
    """A writable tensorstore handle of the existing zarr v3 array at ``path``."""
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path.resolve()) + "/"}}
    return ts.open(spec, open=True, read=True, write=True, context=ts_context()).result()


# ---------------------------------------------------------------------------------- NGFF 0.5 (zarr v3) groups
def write_v3_group(path: Path, attributes: dict[str, Any]) -> None:
    """Create the zarr v3 group ``path`` (and missing parents' directories), or replace its attributes."""
    path.mkdir(parents=True, exist_ok=True)
    _replace_json(path / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attributes})


def _plate_order(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def plate_metadata(positions: list[str], name: str | None = None, version: str | None = None) -> dict[str, Any]:
    """NGFF ``plate`` metadata (rows, columns, wells, field_count) of the images ``row/col/fov``.

    ``version`` repeats the NGFF version inside ``plate``, as ome-zarr-py writes (and ome-zarr-models expects).
    """
    wells = sorted({tuple(p.split("/")[:2]) for p in positions}, key=lambda w: tuple(map(_plate_order, w)))
    rows = sorted({r for r, _ in wells}, key=_plate_order)
    cols = sorted({c for _, c in wells}, key=_plate_order)
    fields: dict[tuple[str, ...], int] = {}
    for p in positions:
        key = tuple(p.split("/")[:2])
        fields[key] = fields.get(key, 0) + 1
    meta: dict[str, Any] = {
        "rows": [{"name": r} for r in rows],
        "columns": [{"name": c} for c in cols],
        "wells": [{"path": f"{r}/{c}", "rowIndex": rows.index(r), "columnIndex": cols.index(c)} for r, c in wells],
        "field_count": max(fields.values(), default=0),
    }
    if name:
        meta["name"] = name
    if version:
        meta["version"] = version
    return meta


def image_metadata(
    axes: list[dict[str, Any]], scale: tuple[float, ...], channel_names: list[str], dataset: str = "0"
) -> dict[str, Any]:
    """NGFF 0.5 ``ome`` content of a one-level image: ``multiscales`` (axes, one scale transform) and ``omero``."""
    channels = [
        {
            "label": n,
            "color": "FFFFFF",
            "active": i == 0,
            "coefficient": 1.0,
            "family": "linear",
            "inverted": False,
            "window": {"start": 0.0, "end": 65535.0, "min": 0.0, "max": 65535.0},
        }
        for i, n in enumerate(channel_names)
    ]
    return {
        "version": "0.5",
        "multiscales": [
            {
                "axes": axes,
                "datasets": [{"path": dataset, "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]}],
            }
        ],
        "omero": {"channels": channels, "rdefs": {"defaultT": 0, "defaultZ": 0, "model": "color"}},
    }


def write_v3_image_groups(root: Path, position: str, image: dict[str, Any], root_attrs: dict[str, Any] | None) -> Path:
    """The groups of one NGFF 0.5 image (ome-zarr-py's layout); returns the image group.

    A single-FOV store (``root_attrs`` given) is its own image: its root gets ``root_attrs`` plus ``image``. In a
    plate the row group is created if missing, the well lists the field (added if missing) and the image group
    gets ``image``; the plate root is :func:`write_v3_group`'s with :func:`plate_metadata`.
    """
    if root_attrs is not None:
        write_v3_group(root, {**root_attrs, "ome": image})
        return root
    row, col, field = position.split("/")
    if zarr_format(root / row) is None:
        write_v3_group(root / row, {})
    well = read_json(root / row / col / "zarr.json")
    ome = ((well or {}).get("attributes") or {}).get("ome") or {}
    images = (ome.get("well") or {}).get("images", []) if isinstance(ome, dict) else []
    if field not in [i.get("path") for i in images if isinstance(i, dict)]:
        images = [*images, {"path": field}]
        write_v3_group(root / row / col, {"ome": {"version": "0.5", "well": {"images": images}}})
    write_v3_group(root / position, {"ome": image})
    return root / position


# ---------------------------------------------------------------------------------- NGFF 0.4 (zarr v2) via iohub
class Ngff04Writer:
    """An NGFF 0.4 store (HCS plate or single FOV) opened with iohub 0.2 for writing; a context manager.

    Parameters
    ----------
    path
        Store root.
    layout
        ``"hcs"``, ``"fov"``, or ``"auto"`` (an existing store's).
    mode
        iohub's: ``"w-"`` create, ``"a"`` create or open, ``"r+"`` open.
    channel_names
        Channels of a new store (ignored for an existing one).
    """

    def __init__(
        self, path: Path, layout: str = "auto", mode: str = "r+", channel_names: list[str] | None = None
    ) -> None:
        from iohub.ngff import Plate, open_ome_zarr

        self._store = open_ome_zarr(path, layout=layout, mode=mode, channel_names=channel_names)
        self.layout = "hcs" if isinstance(self._store, Plate) else "fov"
        self._created: dict[str, Any] = {}  # positions created here (iohub nodes, with their parsed axes)

    def __enter__(self) -> Ngff04Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        self.close()

    def close(self) -> None:
        self._store.close()

    def set_root_attr(self, key: str, value: Any) -> None:
        """Set one attribute of the store's root group."""
        self._store.zattrs[key] = value

    def positions(self) -> set[str]:
        """Positions the store holds (``row/col/fov``; ``"0"`` for a single FOV)."""
        if self.layout == "fov":
            return {"0"}
        return {name for name, _ in self._store.positions()}

    def _position(self, position: str, create: bool) -> Any:
        if self.layout == "fov":
            return self._store
        if create:
            self._created[position] = self._store.create_position(*position.split("/"))
            return self._created[position]
        return self._created[position] if position in self._created else self._store[position]

    def add_image(
        self,
        position: str,
        key: str,
        scale: tuple[float, ...] | list[float],
        chunks: tuple[int, ...],
        data: np.ndarray | None = None,
        shape: tuple[int, ...] | None = None,
        dtype: Any = None,
    ) -> None:
        """Create ``position`` (in a plate) and its image ``key``: ``data``, or zeros of ``shape`` and ``dtype``
        (only the array metadata are written then), with one scale transform."""
        from iohub.ngff.models import TransformationMeta

        pos = self._position(position, create=True)
        transform = [TransformationMeta(type="scale", scale=list(scale))]
        if data is not None:
            pos.create_image(key, data, chunks=chunks, transform=transform)
        else:
            pos.create_zeros(key, shape=shape, dtype=dtype, chunks=chunks, transform=transform)

    def add_labels(
        self, position: str, labels: dict[str, np.ndarray], scale: list[float], chunks: tuple[int, ...]
    ) -> None:
        """NGFF 0.4 ``labels`` of a position: one single-level label image per name, with the image's axes and
        scale and ``image-label.source.image == "../../"`` (napari shows them as label layers)."""
        pos = self._position(position, create=False)
        axes = [a.model_dump(exclude_none=True) for a in pos.axes]
        root = pos.zgroup.require_group("labels")
        root.attrs["labels"] = list(labels)
        for name, data in labels.items():
            sub = root.require_group(name)
            dataset = {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}
            sub.attrs.update(
                {
                    "multiscales": [{"version": "0.4", "name": name, "axes": axes, "datasets": [dataset]}],
                    "image-label": {"version": "0.4", "source": {"image": "../../"}},
                }
            )
            sub.array("0", data, chunks=chunks, overwrite=True)

    def append_channels(self, names: list[str]) -> None:
        """Append channels to every position, resizing their arrays (new channels read as zeros)."""
        nodes = [self._store] if self.layout == "fov" else [pos for _, pos in self._store.positions()]
        for pos in nodes:
            for name in names:
                pos.append_channel(name, resize_arrays=True)


# ---------------------------------------------------------------------------------- label images (both versions)
def _label_names(labels_group: Path) -> list[str]:
    """Names the NGFF ``labels`` group at ``labels_group`` lists (v2 ``.zattrs``, v3 ``attributes.ome``)."""
    v3 = read_json(labels_group / "zarr.json")
    attrs = (v3 or {}).get("attributes") if v3 is not None else read_json(labels_group / ".zattrs")
    attrs = attrs if isinstance(attrs, dict) else {}
    names = (attrs.get("ome") or {}).get("labels") if v3 is not None else attrs.get("labels")
    return [str(n) for n in names] if isinstance(names, list) else []


def _write_label_list(labels_group: Path, names: list[str], fmt: int) -> None:
    """Create the ``labels`` group, or replace its list of names, keeping its other attributes."""
    if fmt == 2:
        import zarr

        zarr.open_group(str(labels_group), mode="a").attrs["labels"] = names
        return
    meta = read_json(labels_group / "zarr.json") or {}
    attributes = dict(meta.get("attributes") or {})
    attributes["ome"] = {**(attributes.get("ome") or {}), "version": "0.5", "labels": names}
    write_v3_group(labels_group, attributes)


def create_label_image(
    image_group: Path,
    name: str,
    axes: list[dict[str, Any]],
    scale: tuple[float, ...] | list[float],
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    attrs: dict[str, Any],
    fmt: int,
) -> Path:
    """Create (or recreate, empty) the single-level NGFF label image ``<image_group>/labels/<name>``.

    The label image has the image's ``axes`` and ``scale``, ``image-label.source.image == "../../"`` and the
    extra top-level attributes ``attrs``; its int32 array ``0`` is created without writing pixels (they read as
    0 until written). ``name`` is added to the ``labels`` group's list, whose other names are kept. zarr v2 is
    NGFF 0.4 (zarr-python 2, as :meth:`Ngff04Writer.add_labels`), zarr v3 NGFF 0.5 (metadata in
    ``attributes.ome``, the array through tensorstore). Returns the path of the array.
    """
    labels_group = image_group / "labels"
    names = _label_names(labels_group)
    _write_label_list(labels_group, [*names, name] if name not in names else names, fmt)
    group = labels_group / name
    dataset = {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]}
    if fmt == 2:
        import zarr

        node = zarr.open_group(str(group), mode="a")
        node.attrs.put(
            {
                "multiscales": [{"version": "0.4", "name": name, "axes": axes, "datasets": [dataset]}],
                "image-label": {"version": "0.4", "source": {"image": "../../"}},
                **attrs,
            }
        )
        create_array(group / "0", shape, chunks, "int32", 2)
    else:
        ome = {
            "version": "0.5",
            "multiscales": [{"name": name, "axes": axes, "datasets": [dataset]}],
            "image-label": {"version": "0.5", "source": {"image": "../../"}},
        }
        write_v3_group(group, {"ome": ome, **attrs})
        create_v3_array(group / "0", shape, chunks, "int32", tuple(str(a["name"]) for a in axes))
    return group / "0"


def delete_label_image(image_group: Path, name: str) -> None:
    """Remove the label image ``<image_group>/labels/<name>`` and its name from the ``labels`` list.

    Only for label images the caller has checked it wrote: this deletes without asking.
    """
    labels_group = image_group / "labels"
    fmt = zarr_format(labels_group)
    if fmt is None:
        return
    names = _label_names(labels_group)
    if name in names:
        _write_label_list(labels_group, [n for n in names if n != name], fmt)
    if (labels_group / name).exists():
        shutil.rmtree(labels_group / name)
