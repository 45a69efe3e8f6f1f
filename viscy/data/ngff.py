"""OME-NGFF metadata of zarr v2 and v3 stores: node kinds, NGFF versions, plates, wells and images.

NGFF 0.4 keeps its metadata in a zarr v2 group's ``.zattrs`` (``plate``, ``well``, ``multiscales``, ``omero``,
each versioned inside); NGFF 0.5 keeps it in a zarr v3 group's ``zarr.json`` under ``attributes.ome``, with one
``version`` for the group. Versions are told apart from that metadata, never guessed from the file layout
alone, and every refusal says what was found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from viscy.data.engine import read_json
from viscy.errors import DataError

SUPPORTED_VERSIONS = ("0.4", "0.5")
_OME_KEYS = ("plate", "well", "multiscales", "labels", "bioformats2raw.layout")


@dataclass(frozen=True)
class Node:
    """A zarr group or array as its metadata files describe it.

    Attributes
    ----------
    attrs
        The node's attributes as stored: v2 ``.zattrs``, v3 ``zarr.json`` ``attributes``.
    """

    path: Path
    zarr_format: int
    node_type: str
    attrs: dict[str, Any]

    @property
    def ome(self) -> dict[str, Any]:
        """The NGFF metadata: ``attributes.ome`` of zarr v3 (NGFF 0.5), the attributes themselves of zarr v2."""
        if self.zarr_format == 3:
            ome = self.attrs.get("ome")
            return ome if isinstance(ome, dict) else {}
        return self.attrs

    @property
    def format_name(self) -> str:
        return f"zarr v{self.zarr_format} {self.node_type}"


def read_node(path: Path) -> Node | None:
    """The zarr node at ``path`` (v3 ``zarr.json`` first, then v2 ``.zgroup``/``.zarray``/``.zattrs``), or ``None``."""
    v3 = read_json(path / "zarr.json")
    if v3 is not None and v3.get("zarr_format") == 3:
        attrs = v3.get("attributes")
        return Node(path, 3, str(v3.get("node_type", "group")), attrs if isinstance(attrs, dict) else {})
    zattrs = read_json(path / ".zattrs")
    if (path / ".zarray").is_file():
        return Node(path, 2, "array", zattrs or {})
    if (path / ".zgroup").is_file() or zattrs is not None:
        return Node(path, 2, "group", zattrs or {})
    return None


def _parse_version(version: str) -> tuple[int, ...] | None:
    match = re.match(r"^(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def ngff_version(node: Node) -> str | None:
    """The NGFF version a node declares (``None`` if it declares none)."""
    ome = node.ome
    if node.zarr_format == 3 and "version" in ome:
        return str(ome["version"])
    for key in ("plate", "well"):
        if isinstance(ome.get(key), dict) and "version" in ome[key]:
            return str(ome[key]["version"])
    ms = ome.get("multiscales")
    if isinstance(ms, list) and ms and isinstance(ms[0], dict) and "version" in ms[0]:
        return str(ms[0]["version"])
    return str(ome["version"]) if "version" in ome else None


def check_version(node: Node) -> str:
    """The node's NGFF version if viscy reads it (NGFF 0.4 without a version is taken as 0.4).

    Raises
    ------
    DataError
        Naming the version, for versions older than 0.4 or newer than 0.5, or one that is not a version.
    """
    version = ngff_version(node)
    if version is None:
        if node.zarr_format == 3:
            raise DataError(
                f"{node.path} is a zarr v3 group whose 'ome' attributes name no NGFF version; NGFF 0.5 requires "
                "attributes.ome.version in zarr.json"
            )
        return "0.4"
    if version in SUPPORTED_VERSIONS:
        return version
    parsed = _parse_version(version)
    supported = " and ".join(SUPPORTED_VERSIONS)
    if parsed is None:
        raise DataError(f"{node.path} declares NGFF version {version!r}, not a version viscy knows ({supported})")
    if parsed > _parse_version(SUPPORTED_VERSIONS[-1]):
        raise DataError(
            f"{node.path} is OME-NGFF {version}, newer than viscy reads (NGFF {supported}); convert it to NGFF 0.5 "
            "(e.g. with ome-zarr-py or iohub) or update viscy"
        )
    if parsed < _parse_version(SUPPORTED_VERSIONS[0]):
        raise DataError(
            f"{node.path} is OME-NGFF {version}, older than viscy reads (NGFF {supported}); convert it with "
            "`iohub convert` or ome-zarr-py"
        )
    return version


def describe(path: Path) -> str:
    """What a path that is not an OME-Zarr plate or image holds, in a few words."""
    node = read_node(path)
    if node is None and path.is_file():
        return "a file, not a zarr directory"
    if node is None:
        try:
            entries = sorted(p.name for p in path.iterdir())
        except OSError:
            entries = []
        listing = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "") if entries else "nothing"
        return f"a directory without zarr metadata (no zarr.json, .zgroup or .zarray; it holds {listing})"
    keys = sorted(node.attrs)
    if node.node_type == "array":
        return f"a {node.format_name}, not a group"
    if node.zarr_format == 3:
        ome = sorted(node.ome) if "ome" in node.attrs else None
        found = f"'ome' keys {ome}" if ome is not None else f"attribute keys {keys or 'none'}, no 'ome'"
        return f"a zarr v3 group without OME-NGFF 0.5 metadata ({found}; expected ome.plate or ome.multiscales)"
    found = f".zattrs keys {keys or 'none'}"
    return f"a zarr v2 group without OME-NGFF 0.4 metadata ({found}; expected 'plate' or 'multiscales')"


def layout(node: Node) -> str:
    """``"hcs"`` for a plate, ``"fov"`` for an image; a ``DataError`` saying what was found otherwise."""
    ome = node.ome
    if node.node_type == "group" and isinstance(ome.get("plate"), dict):
        return "hcs"
    if node.node_type == "group" and isinstance(ome.get("multiscales"), list) and ome["multiscales"]:
        return "fov"
    if node.node_type == "group" and isinstance(ome.get("well"), dict):
        raise DataError(
            f"{node.path} is an OME-Zarr well, not a plate or image; point to the plate root "
            f"({node.path.parent.parent}) or to one of its images ({node.path}/<fov>)"
        )
    if node.node_type == "group" and "bioformats2raw.layout" in ome:
        raise DataError(
            f"{node.path} is a bioformats2raw container, not a plate or image; point to an image inside it "
            f"(e.g. {node.path}/0) or to the plate it holds"
        )
    raise DataError(
        f"{node.path} is not an OME-Zarr HCS plate or image: it is {describe(node.path)}. Point to the plate root "
        "(the group whose metadata hold 'plate') or convert the data with `iohub convert`"
    )


def plate_images(node: Node) -> list[str]:
    """Image paths (``row/col/fov``) of a plate from its ``plate.wells`` and each well's ``well.images``."""
    names: list[str] = []
    for well in node.ome.get("plate", {}).get("wells", []) or []:
        well_path = well.get("path") if isinstance(well, dict) else None
        if not isinstance(well_path, str):
            continue
        well_node = read_node(node.path / well_path)
        images = well_node.ome.get("well", {}).get("images", []) if well_node is not None else []
        for image in images or []:
            if isinstance(image, dict) and isinstance(image.get("path"), str):
                names.append(f"{well_path.strip('/')}/{image['path'].strip('/')}")
    return sorted(set(names), key=lambda n: tuple(n.split("/")))


@dataclass(frozen=True)
class ImageMeta:
    """The NGFF image metadata viscy uses: axes, full-resolution dataset path, channel names, transforms."""

    node: Node
    version: str
    axes: tuple[str, ...]
    dataset: str
    channel_labels: tuple[str, ...] | None
    multiscale: dict[str, Any]

    def scale(self) -> tuple[float, ...]:
        """Full-resolution scale: product of the multiscale's and the first dataset's scale transforms.

        Raises
        ------
        ValueError
            If a transform is malformed or its length does not broadcast to the axes.
        """
        transforms = list(self.multiscale.get("coordinateTransformations") or [])
        transforms += list(self.multiscale["datasets"][0].get("coordinateTransformations") or [])
        scale = [1.0] * len(self.axes)
        for tr in transforms:
            if tr.get("type") != "scale":
                continue
            values = tr["scale"]
            if len(values) != len(scale):
                raise ValueError(f"scale {values} has {len(values)} values for {len(scale)} axes (cannot broadcast)")
            scale = [a * float(b) for a, b in zip(scale, values, strict=True)]
        return tuple(scale)


def image_meta(path: Path) -> ImageMeta | None:
    """The image at ``path`` (a group whose NGFF metadata hold ``multiscales``), or ``None`` if it is none.

    Raises
    ------
    DataError
        If the image declares an NGFF version viscy does not read, or its multiscales metadata are malformed.
    """
    node = read_node(path)
    if node is None or node.node_type != "group":
        return None
    ms = node.ome.get("multiscales")
    if not isinstance(ms, list) or not ms:
        return None
    version = check_version(node)
    multiscale = ms[0]
    try:
        dataset = str(multiscale["datasets"][0]["path"])
        axes = tuple(str(a["name"] if isinstance(a, dict) else a).lower() for a in multiscale.get("axes", []))
    except (KeyError, IndexError, TypeError) as exc:
        raise DataError(
            f"{path}: malformed multiscales metadata ({type(exc).__name__}: {exc}); each image needs "
            "multiscales[0].datasets[0].path and axes"
        ) from None
    omero = node.ome.get("omero") or node.attrs.get("omero")
    labels = None
    if isinstance(omero, dict) and isinstance(omero.get("channels"), list):
        channels = omero["channels"]
        labels = tuple(str(c.get("label", i)) if isinstance(c, dict) else str(i) for i, c in enumerate(channels))
    return ImageMeta(node, version, axes, dataset, labels, multiscale)


def label_names(path: Path) -> list[str]:
    """Names listed by the NGFF ``labels`` group at ``path`` (empty if there is none)."""
    node = read_node(path)
    labels = node.ome.get("labels") if node is not None else None
    return [str(n) for n in labels] if isinstance(labels, list) else []


# ---------------------------------------------------------------------------------- writing (zarr v3)
def write_attrs(node_path: Path, key: str, value: Any) -> None:
    """Set one top-level attribute of a zarr group or array.

    zarr v2 ``.zattrs`` are written through zarr-python 2 (as before); zarr v3 ``zarr.json`` ``attributes`` are
    rewritten atomically. In NGFF 0.5 the NGFF metadata live in ``attributes.ome``; iohub 0.3 and VisCy keep
    their own keys (``normalization``) at the top level beside it, and so does viscy.

    Raises
    ------
    DataError
        If ``node_path`` is not a zarr group or array.
    """
    node = read_node(node_path)
    if node is None:
        raise DataError(f"{node_path} is not a zarr group or array; cannot write its {key!r} attribute")
    if node.zarr_format == 2:
        import zarr

        zarr.open(str(node_path), mode="r+").attrs[key] = value
        return
    meta = read_json(node_path / "zarr.json") or {}
    meta.setdefault("attributes", {})[key] = value
    _replace_json(node_path / "zarr.json", meta)


def _replace_json(path: Path, obj: dict[str, Any]) -> None:
    import json
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def create_v3_array(
    path: Path,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    dimension_names: tuple[str, ...] = ("t", "c", "z", "y", "x"),
):
    """Create (or replace) a zarr v3 array (zstd, ``/`` chunk keys, as ome-zarr-py writes); its writable
    tensorstore handle."""
    import shutil

    import tensorstore as ts

    from viscy.data.engine import _ts_context

    if path.exists():
        shutil.rmtree(path)
    metadata: dict[str, Any] = {
        "shape": list(shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd",
                                                                              "configuration": {"level": 3}}],
        "fill_value": 0,
        "dimension_names": list(dimension_names),
    }
    return ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path.resolve()) + "/"}, "metadata": metadata},
        create=True,
        context=_ts_context(),
    ).result()


def open_v3_array(path: Path):
    """A writable tensorstore handle of the existing zarr v3 array at ``path``."""
    import tensorstore as ts

    from viscy.data.engine import _ts_context

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path.resolve()) + "/"}}
    return ts.open(spec, open=True, read=True, write=True, context=_ts_context()).result()


def write_v3_group(path: Path, attributes: dict[str, Any]) -> None:
    """Create the zarr v3 group ``path`` (and missing parents' directories), or replace its attributes."""
    path.mkdir(parents=True, exist_ok=True)
    _replace_json(path / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attributes})


def delete_attr(node_path: Path, key: str) -> None:
    """Remove one top-level attribute of a zarr v2 or v3 group or array (nothing if it is absent)."""
    node = read_node(node_path)
    if node is None or key not in node.attrs:
        return
    if node.zarr_format == 2:
        import zarr

        del zarr.open(str(node_path), mode="r+").attrs[key]
        return
    meta = read_json(node_path / "zarr.json") or {}
    meta.get("attributes", {}).pop(key, None)
    _replace_json(node_path / "zarr.json", meta)


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
        {"label": n, "color": "FFFFFF", "active": i == 0, "coefficient": 1.0, "family": "linear", "inverted": False,
         "window": {"start": 0.0, "end": 65535.0, "min": 0.0, "max": 65535.0}}
        for i, n in enumerate(channel_names)
    ]
    return {
        "version": "0.5",
        "multiscales": [{
            "axes": axes,
            "datasets": [{"path": dataset, "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]}],
        }],
        "omero": {"channels": channels, "rdefs": {"defaultT": 0, "defaultZ": 0, "model": "color"}},
    }
