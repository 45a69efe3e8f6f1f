"""OME-NGFF metadata of zarr v2 and v3 stores: node kinds, NGFF versions, plates, wells and images.

NGFF 0.4 keeps its metadata in a zarr v2 group's ``.zattrs`` (``plate``, ``well``, ``multiscales``, ``omero``,
each versioned inside); NGFF 0.5 keeps it in a zarr v3 group's ``zarr.json`` under ``attributes.ome``, with one
``version`` for the group. Versions are told apart from that metadata, never guessed from the file layout
alone, and every refusal says what was found.

:class:`NgffReader` is the :class:`viscy.data.reader.PlateReader` both NGFF formats share; the registered
readers (``viscy/data/formats/ngff04.py``, ``ngff05.py``) name their zarr format. Writing is
``viscy.data.store_writer``'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from viscy.data.engine import LazyArray, array_meta, read_json, resolve_engine
from viscy.data.store_writer import write_attrs
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

    @property
    def axes_metadata(self) -> list[dict[str, Any]]:
        """The NGFF ``axes`` entries (names, types and units), as stored."""
        axes = self.multiscale.get("axes") or []
        return [dict(a) if isinstance(a, dict) else {"name": str(a)} for a in axes]

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


# ---------------------------------------------------------------------------------- the reader
LABELS_GROUP = "labels"


def find_root(path: Path) -> tuple[Path, str | None]:
    """Plate root and position name when ``path`` points inside a plate (``.../A/1/0``); else ``(path, None)``."""
    parts = path.resolve().parts
    if len(parts) > 3:
        candidate = Path(*parts[:-3])
        node = read_node(candidate)
        if node is not None and isinstance(node.ome.get("plate"), dict):
            return candidate, "/".join(parts[-3:])
    return path, None


class NgffReader:
    """An OME-NGFF HCS plate or single image on zarr: the part the NGFF 0.4 and 0.5 readers share.

    The formats differ in where the metadata sit and how versions are declared (:class:`Node`,
    :func:`check_version`); subclasses name their zarr format and register (``viscy/data/formats/``).
    Pixels are read through ``viscy.data.engine`` (tensorstore, or zarr-python 2 for zarr v2); attributes are
    written through ``viscy.data.store_writer``.

    Parameters
    ----------
    path
        Plate root, a position inside a plate (``plate.zarr/A/1/0``), or a single-image store.
    engine
        Pixel engine (``viscy.data.engine.ENGINES``).
    """

    format: ClassVar[str] = ""
    zarr_format: ClassVar[int] = 0

    @classmethod
    def claims(cls, path: Path) -> bool:
        """Whether ``path`` holds zarr metadata of this reader's zarr format (what they say is checked on opening)."""
        node = read_node(path)
        return node is not None and node.zarr_format == cls.zarr_format

    def __init__(self, path: Path, engine: str = "auto") -> None:
        root, only = find_root(path)
        node = read_node(root)
        if node is None:
            layout(Node(root, self.zarr_format, "group", {}))  # raises, saying what the path holds
        self.kind = layout(node)
        self.version = check_version(node)
        resolve_engine(engine, node.zarr_format, root)  # an unknown engine or zarr-python 2 on v3 fails now
        self.root, self.only, self.engine = root, only, engine
        self._images: dict[str, ImageMeta] = {}
        self._positions = self._list_positions(node)
        if not self._positions:
            if self.kind == "fov":
                meta = image_meta(root)
                hint = repr(meta.dataset) if meta is not None else "(none named)"
                raise DataError(f"{root}: the image's full-resolution array {hint} does not exist")
            raise DataError(
                f"{root} holds no positions with an image: none of the wells listed in its plate metadata has an "
                "image group whose multiscales[0].datasets[0].path names an existing array"
            )
        if only is not None and only not in self._positions:
            raise DataError(f"{path}: position {only!r} not found; available: {', '.join(self._positions)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, kind={self.kind!r}, version={self.version!r})"

    def group(self, position: str) -> Path:
        """The zarr group of a position (the root of a single-image store)."""
        return self.root if self.kind == "fov" else self.root / position

    def _list_positions(self, node: Node) -> list[str]:
        candidates = ["0"] if self.kind == "fov" else plate_images(node)
        if self.only is not None and self.only in candidates:
            candidates = [self.only]
        names = []
        for name in candidates:
            meta = image_meta(self.group(name))
            if meta is not None and array_meta(self.group(name) / meta.dataset) is not None:
                self._images[name] = meta
                names.append(name)
        return names

    def positions(self) -> list[str]:
        return list(self._positions)

    def image(self, position: str) -> ImageMeta:
        return self._images[position]

    def open_array(self, position: str, key: str) -> LazyArray | None:
        meta = array_meta(self.group(position) / key)
        return None if meta is None else LazyArray(meta, self.engine)

    def attrs(self, position: str | None = None) -> dict[str, Any]:
        node = read_node(self.root if position is None else self.group(position))
        return dict(node.attrs) if node is not None else {}

    def write_attr(self, position: str | None, key: str, value: Any) -> None:
        write_attrs(self.root if position is None else self.group(position), key, value)

    def labels(self, position: str) -> list[str]:
        return label_names(self.group(position) / LABELS_GROUP)

    def label_key(self, position: str, label: str) -> str | None:
        meta = image_meta(self.group(position) / LABELS_GROUP / label)
        return None if meta is None else f"{LABELS_GROUP}/{label}/{meta.dataset}"
