"""The reader seam: what viscy needs from a plate format, and the registry of formats it reads.

``Plate`` (``viscy.data.plate``) is what the rest of viscy uses; it validates, caches array handles and names
errors, and asks a :class:`PlateReader` for everything that depends on the on-disk format. One reader class per
format, registered under a name in :data:`READERS`; :func:`viscy.data.formats.open_plate` opens a path with the
first registered reader whose :meth:`PlateReader.claims` accepts it. Built in: ``"ngff-0.4"`` (OME-NGFF 0.4 on
zarr v2) and ``"ngff-0.5"`` (OME-NGFF 0.5 on zarr v3), in ``viscy/data/formats/``.

Adding a format is one module: a class with the members of :class:`PlateReader`, decorated with
``@register_reader("name")``. A module placed in ``viscy/data/formats/`` is imported (and so registered) with
that package; a module elsewhere registers when it is imported, before plates of its format are opened.
Arrays it hands out follow :class:`RegionArray` (``viscy.data.engine.LazyArray`` does, for zarr).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np


@runtime_checkable
class RegionArray(Protocol):
    """A lazily read array: metadata at hand, pixels read per region."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def chunks(self) -> tuple[int, ...]:
        """The read chunk shape (what one read decodes at least)."""
        ...

    @property
    def shards(self) -> tuple[int, ...] | None:
        """The shard shape of a sharded store, else ``None``."""
        ...

    def fetch(self, selection: Any) -> Callable[[], np.ndarray]:
        """Start reading ``selection`` (ints, slices with step >= 1, one list of ints); return a function that
        waits for it. Raises ``viscy.data.engine.ChunkReadError`` for data that cannot be fetched or decoded."""
        ...


class ImageDescription(Protocol):
    """What a reader says about one position's image."""

    axes: tuple[str, ...]  # lower-case axis names, in array order; viscy needs ("t", "c", "z", "y", "x")
    dataset: str  # the full-resolution array's key inside the position (``PlateReader.open_array``)
    channel_labels: tuple[str, ...] | None  # channel names, or None when the store names none

    @property
    def axes_metadata(self) -> list[dict[str, Any]]:
        """The axes as NGFF ``axes`` entries (``name``, ``type``, ``unit``), as stored."""
        ...

    def scale(self) -> tuple[float, ...]:
        """Pixel size per axis; raises ``ValueError`` (or ``KeyError``, ...) when the stored scale is malformed."""
        ...


class PlateReader(Protocol):
    """One opened plate (or single-FOV store) of one format.

    Attributes
    ----------
    format
        The registry name (set by :func:`register_reader`).
    root
        The plate's (or FOV store's) root directory.
    kind
        ``"hcs"`` for a plate of ``row/col/fov`` positions, ``"fov"`` for a single image (position ``"0"``).
    version
        The format's version as the store declares it (NGFF ``"0.4"``, ``"0.5"``).
    zarr_format
        2 or 3 for zarr stores; ``None`` for others (viscy then writes no masks or predictions into them).
    """

    format: ClassVar[str]
    root: Path
    kind: str
    version: str
    zarr_format: int | None

    @classmethod
    def claims(cls, path: Path) -> bool:
        """Whether this reader reads the store at ``path`` (cheap: metadata files only; never raises)."""
        ...

    def __init__(self, path: Path, engine: str = "auto") -> None:
        """Open ``path`` (a plate root, a position inside a plate, or a FOV store) with pixel engine ``engine``.

        Raises ``viscy.errors.DataError`` naming what is wrong with the store and how to fix it.
        """
        ...

    def positions(self) -> list[str]:
        """Position names with a readable image, sorted (only the one ``path`` named, if it named one)."""
        ...

    def image(self, position: str) -> ImageDescription:
        """The image metadata of a position returned by :meth:`positions`."""
        ...

    def open_array(self, position: str, key: str) -> RegionArray | None:
        """An array of a position by its key (the image's ``dataset``, ``fg_mask``, ...); ``None`` if absent."""
        ...

    def attrs(self, position: str | None = None) -> dict[str, Any]:
        """The plate's (``None``) or a position's attributes as stored now (``normalization``, markers)."""
        ...

    def write_attr(self, position: str | None, key: str, value: Any) -> None:
        """Set one attribute of the plate (``None``) or of a position (preprocess statistics, markers)."""
        ...

    def labels(self, position: str) -> list[str]:
        """Names of a position's label images (e.g. ``nuclei``)."""
        ...

    def label_key(self, position: str, label: str) -> str | None:
        """Key (for :meth:`open_array`) of a label image's full-resolution array; ``None`` if there is none."""
        ...


READERS: dict[str, type[PlateReader]] = {}
"""Registered plate formats, name -> reader class, tried in registration order by ``open_plate``."""

R = TypeVar("R")


def register_reader(name: str) -> Callable[[type[R]], type[R]]:
    """Class decorator: register a :class:`PlateReader` under ``name`` (and set its ``format``).

    Raises
    ------
    ValueError
        If another class is already registered under ``name``.
    """

    def add(cls: type[R]) -> type[R]:
        known = READERS.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"a plate reader named {name!r} is already registered ({known.__qualname__})")
        cls.format = name  # type: ignore[attr-defined]
        READERS[name] = cls  # type: ignore[assignment]
        return cls

    return add


def reader_for(path: Path) -> type[PlateReader] | None:
    """The first registered reader that claims ``path``, or ``None``."""
    for cls in READERS.values():
        if cls.claims(path):
            return cls
    return None
