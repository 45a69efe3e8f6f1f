"""Lazy, validated access to OME-Zarr HCS plates (and single-FOV stores) of NGFF 0.4 and 0.5.

``Plate`` is the only way the rest of viscy reads pixels: it enumerates positions (``row/col/fov``),
resolves channel names, validates axes, dtypes and shapes, and reads TCZYX regions without loading more
than the chunks a region touches. Everything that depends on the on-disk format is its reader's
(``viscy.data.reader.PlateReader``, opened by ``viscy.data.formats.open_plate``): NGFF 0.4 (zarr v2) and NGFF 0.5
(zarr v3, sharded or not) are built in, each taking the full-resolution array from the image's ``multiscales``
metadata and reading pixels through tensorstore or zarr-python 2 (``viscy.data.engine``). It pickles as its
path, so Ray tasks reopen it where they run.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from viscy.config import StrictModel, StrList
from viscy.data.engine import ChunkReadError
from viscy.data.formats import open_plate
from viscy.data.reader import ImageDescription, PlateReader, RegionArray
from viscy.errors import ChannelNotFoundError, CorruptDataError, DataError, ShapeError

IMAGE_KEY = "0"  # the array name viscy's writers give full-resolution images (readers follow multiscales)
FG_MASK_KEY = "fg_mask"
EXPECTED_AXES = ("t", "c", "z", "y", "x")
SUPPORTED_DTYPES = tuple(
    np.dtype(d) for d in ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32", "float64")
)


@dataclass(frozen=True)
class FovInfo:
    """Shape and metadata of one field of view (``chunks`` are the read chunks; ``shards`` for sharded v3)."""

    name: str
    shape: tuple[int, int, int, int, int]
    dtype: np.dtype
    chunks: tuple[int, ...]
    scale: tuple[float, ...]
    shards: tuple[int, ...] | None = None


class Plate:
    """Read-only view of the pixels of an HCS plate, a FOV inside a plate, or a single-FOV store.

    Attributes can be written (:meth:`set_plate_attr`, :meth:`set_position_attr`: preprocess statistics);
    ``reader`` is the format's :class:`~viscy.data.reader.PlateReader`, ``format`` its registry name.

    Parameters
    ----------
    path
        Plate root (``plate.zarr``), a position inside a plate (``plate.zarr/A/1/0``), or a FOV store.
    engine
        Pixel reader: ``"auto"`` (tensorstore; see ``viscy.data.engine``), ``"tensorstore"`` or ``"zarr"``
        (zarr-python 2, zarr v2 stores only).
    """

    def __init__(self, path: str | Path, engine: str = "auto") -> None:
        self.path = Path(path)
        self.engine = engine
        self._arrays: dict[tuple[str, str], RegionArray] = {}
        self._open()

    # ------------------------------------------------------------------ opening and pickling
    def _open(self) -> None:
        self.reader: PlateReader = open_plate(self.path, self.engine)
        self.format = self.reader.format
        self.root, self.kind, self.version = self.reader.root, self.reader.kind, self.reader.version
        self.zarr_format = self.reader.zarr_format
        self._positions = self.reader.positions()
        self._position_set = frozenset(self._positions)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "engine": self.engine}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.engine = state.get("engine", "auto")
        self._arrays = {}
        self._open()

    def __enter__(self) -> Plate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the array handles (they reopen on the next read)."""
        self._arrays.clear()

    def __repr__(self) -> str:
        return f"Plate({str(self.path)!r}, positions={len(self._positions)}, channels={self.channel_names})"

    # ------------------------------------------------------------------ positions and channels
    @property
    def positions(self) -> list[str]:
        """Position names (``row/col/fov``; ``"0"`` for a single-FOV store)."""
        return list(self._positions)

    def select(self, patterns: list[str] | str) -> list[str]:
        """Positions matching any fnmatch pattern (``"A/1/*"``); raises if none match."""
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        chosen = [p for p in self._positions if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]
        if not chosen:
            raise DataError(
                f"no position of {self.root} matches {patterns}; available: {', '.join(self._positions[:20])}"
                + (" ..." if len(self._positions) > 20 else "")
            )
        return chosen

    def _meta(self, name: str) -> ImageDescription:
        if name not in self._position_set:
            raise DataError(f"position {name!r} not in {self.root}; available: {', '.join(self._positions)}")
        return self.reader.image(name)

    @property
    def channel_names(self) -> list[str]:
        """Channel names (from OMERO metadata; indices as strings when a writer stored none)."""
        first = self._positions[0]
        labels = self._meta(first).channel_labels
        if labels is None:
            return [str(i) for i in range(self.image(first).shape[1])]
        return list(labels)

    def channel_indices(self, names: list[str] | str) -> list[int]:
        """Indices of channels by name.

        Raises
        ------
        ChannelNotFoundError
            Naming the missing channel and listing the available ones.
        """
        names = [names] if isinstance(names, str) else list(names)
        available = self.channel_names
        out = []
        for n in names:
            if n not in available:
                raise ChannelNotFoundError(
                    f"channel {n!r} not found in {self.root}; available channels: {', '.join(available)}. "
                    "Fix the channel name in the config (names are case-sensitive)."
                )
            out.append(available.index(n))
        return out

    # ------------------------------------------------------------------ arrays and validation
    def image_axes(self, name: str) -> list[dict[str, Any]]:
        """A position's NGFF ``axes`` metadata (names, types and units), as stored."""
        return self._meta(name).axes_metadata

    def image_key(self, name: str) -> str:
        """Path of a position's full-resolution array inside its group (``multiscales[0].datasets[0].path``)."""
        return self._meta(name).dataset

    def array(self, name: str, key: str) -> RegionArray:
        """Any array of a position by its path inside the position group (``fg_mask``, ``labels/nuclei/0``).

        Raises
        ------
        DataError
            If there is no array at ``key``.
        """
        self._meta(name)
        cached = self._arrays.get((name, key))
        if cached is not None:
            return cached
        arr = self.reader.open_array(name, key)
        if arr is None:
            raise DataError(f"position {name} of {self.root} has no array {key!r}")
        self._arrays[(name, key)] = arr
        return arr

    def image(self, name: str) -> RegionArray:
        """The full-resolution image array (lazy) of a position, validated."""
        meta = self._meta(name)
        if meta.axes != EXPECTED_AXES:
            raise DataError(
                f"position {name} of {self.root} has axes {meta.axes}; viscy needs (t, c, z, y, x). "
                "Rewrite the store in TCZYX order (e.g. with iohub), adding singleton axes as needed."
            )
        arr = self.array(name, meta.dataset)
        if arr.ndim != 5:
            raise DataError(f"position {name}: image has {arr.ndim} dimensions, expected 5 (TCZYX)")
        if np.dtype(arr.dtype) not in SUPPORTED_DTYPES:
            raise DataError(
                f"position {name}: dtype {arr.dtype} is not supported; "
                f"convert to one of {', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
        return arr

    def info(self, name: str) -> FovInfo:
        """Shape, dtype, chunks and scale of one position."""
        arr = self.image(name)
        try:
            scale = self._meta(name).scale()
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            warnings.warn(
                f"position {name} of {self.root}: cannot read the pixel scale from its coordinateTransformations "
                f"({type(exc).__name__}: {exc}); using unit scale (1, 1, 1, 1, 1). Fix the position's "
                "multiscales metadata (e.g. rewrite it with iohub) to keep physical units",
                stacklevel=2,
            )
            scale = (1.0,) * 5
        return FovInfo(name, tuple(arr.shape), np.dtype(arr.dtype), tuple(arr.chunks), scale, arr.shards)

    def check_consistent(self, names: list[str] | None = None) -> FovInfo:
        """Check that positions share channel count, Z depth and dtype; return the first one's info.

        Raises
        ------
        ShapeError
            Listing the positions whose shape differs.
        """
        names = names or self._positions
        first = self.info(names[0])
        odd = []
        for n in names[1:]:
            inf = self.info(n)
            if inf.shape[1:3] != first.shape[1:3] or inf.dtype != first.dtype:
                odd.append(f"{n} {inf.shape} {inf.dtype}")
        if odd:
            raise ShapeError(
                f"positions of {self.root} disagree with {names[0]} {first.shape} {first.dtype} in channels, "
                f"Z or dtype: {'; '.join(odd[:10])}. Select consistent positions with the positions key."
            )
        return first

    def check_window(self, name: str, z_window_size: int, yx_patch: tuple[int, int]) -> None:
        """Raise a ``ShapeError`` if a z window or YX patch does not fit the FOV."""
        _, _, z, y, x = self.info(name).shape
        if z_window_size > z:
            raise ShapeError(
                f"z window of {z_window_size} slices is larger than the {z}-slice stack of {name}; "
                f"set z_window_size <= {z} (or use a 2D model for 2D data)"
            )
        if yx_patch[0] > y or yx_patch[1] > x:
            raise ShapeError(
                f"patch {tuple(yx_patch)} is larger than the {y}x{x} image of {name}; "
                f"set yx_patch_size to at most [{y}, {x}]"
            )

    def read(
        self,
        name: str,
        t: int = 0,
        channels: list[int] | None = None,
        z: slice = slice(None),
        y: slice = slice(None),
        x: slice = slice(None),
        array: str | None = None,
    ) -> np.ndarray:
        """Read a ``(C, Z, Y, X)`` region; only the chunks it touches are read and decoded.

        ``array`` is a path inside the position group (``fg_mask``, ``labels/nuclei/0``); ``None`` reads the
        full-resolution image named by the position's ``multiscales`` metadata.

        Raises
        ------
        CorruptDataError
            If a chunk cannot be decoded; names the position, region and fix.
        """
        return self.fetch(name, t, channels, z, y, x, array)()

    def fetch(
        self,
        name: str,
        t: int = 0,
        channels: list[int] | None = None,
        z: slice = slice(None),
        y: slice = slice(None),
        x: slice = slice(None),
        array: str | None = None,
    ) -> Callable[[], np.ndarray]:
        """Start reading what :meth:`read` reads; return a function that waits for the region.

        With the tensorstore engine the region is fetched and decoded in the background meanwhile.
        """
        if array is None or array == self.image_key(name):
            arr, array = self.image(name), self.image_key(name)
        else:
            arr = self.array(name, array)
        if channels is not None:
            channels = self._check_channels(arr.shape[1], channels)
        if channels is not None and channels == list(range(channels[0], channels[-1] + 1)):
            sel_c: slice | list[int] = slice(channels[0], channels[-1] + 1)
        else:
            sel_c = slice(None) if channels is None else channels

        def corrupt(exc: ChunkReadError) -> CorruptDataError:
            return CorruptDataError(
                f"cannot decode data of {self.root}/{name}/{array} at t={t}, c={channels}, z={z}, y={y}, x={x}: "
                f"{exc}. The chunk is corrupt or truncated: re-copy the position from its source, or exclude it "
                "with the positions key"
            )

        try:
            pending = arr.fetch((t, sel_c, z, y, x))
        except ChunkReadError as exc:
            raise corrupt(exc) from None

        def wait() -> np.ndarray:
            try:
                return pending()
            except ChunkReadError as exc:
                raise corrupt(exc) from None

        return wait

    @staticmethod
    def _check_channels(n_channels: int, channels: list[int]) -> list[int]:
        """Channel indices as a list of ints in ``[0, n_channels)``; raises ``IndexError``/``TypeError`` otherwise."""
        channels = list(channels)
        if not channels:
            raise IndexError("channels is empty; pass at least one channel index (or None for all channels)")
        for c in channels:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise TypeError(f"channel {c!r} is not an index; map names to indices with Plate.channel_indices")
            if not 0 <= c < n_channels:
                raise IndexError(f"channel index {c} out of range for {n_channels} channels (0..{n_channels - 1})")
        return [int(c) for c in channels]

    # ------------------------------------------------------------------ stored metadata
    def plate_attrs(self) -> dict[str, Any]:
        """The root group's attributes as stored now (v2 ``.zattrs``; v3 ``zarr.json`` ``attributes``)."""
        return self.reader.attrs(None)

    def position_attrs(self, name: str) -> dict[str, Any]:
        """A position group's attributes as stored now; viscy's keys (``normalization``) sit at the top level."""
        self._meta(name)
        return self.reader.attrs(name)

    def set_plate_attr(self, key: str, value: Any) -> None:
        """Set one attribute of the plate's root group (of a single-FOV store: its only group)."""
        self.reader.write_attr(None, key, value)

    def set_position_attr(self, name: str, key: str, value: Any) -> None:
        """Set one attribute of a position's group (VisCy's ``normalization`` sits at the top level)."""
        self._meta(name)
        self.reader.write_attr(name, key, value)

    def normalization(self, name: str) -> dict[str, Any]:
        """A position's ``normalization`` metadata (VisCy layout); raises if preprocess never ran."""
        norm = self.position_attrs(name).get("normalization")
        if not norm:
            raise DataError(
                f"position {name} of {self.root} has no normalization statistics; run "
                f"`viscy preprocess --data_path {self.root}` first"
            )
        return norm

    def has_array(self, name: str, array: str) -> bool:
        """Whether a position holds an array (e.g. ``fg_mask``) at ``array``."""
        self._meta(name)
        return (name, array) in self._arrays or self.reader.open_array(name, array) is not None

    def labels(self, name: str) -> list[str]:
        """Names of the NGFF label images of a position (e.g. ``nuclei``, ``cells``)."""
        self._meta(name)
        return self.reader.labels(name)

    def label_key(self, name: str, label: str) -> str:
        """Path (inside the position group) of a label image's full-resolution array, e.g. ``labels/nuclei/0``.

        Raises
        ------
        DataError
            If the position has no such label image.
        """
        self._meta(name)
        key = self.reader.label_key(name, label)
        if key is None:
            raise DataError(f"position {name} of {self.root} has no label image {label!r}")
        return key


# ---------------------------------------------------------------------------------- viscy info
class InfoConfig(StrictModel):
    """Summarise a plate."""

    data_path: Path = Field(description="OME-Zarr plate, FOV inside a plate, or FOV store.")
    positions: StrList = Field(["*"], description="FOV name patterns to list.")


def summarize_plate(path: str | Path, patterns: list[str] | None = None) -> str:
    """Human-readable summary: positions, shapes, channels and stored statistics."""
    with Plate(path) as plate:
        names = plate.select(patterns or ["*"])
        first = plate.info(names[0])
        lines = [
            f"plate     {plate.root} ({plate.kind}, {len(plate.positions)} positions, {len(names)} selected)",
            f"channels  {', '.join(plate.channel_names)}",
            f"format    NGFF {plate.version}, zarr v{plate.zarr_format}"
            if plate.zarr_format
            else f"format    {plate.format} {plate.version}",
            f"shape     {first.shape} (T, C, Z, Y, X) {first.dtype}, chunks {first.chunks}"
            + (f", shards {first.shards}" if first.shards else ""),
            f"scale     {first.scale}",
        ]
        plate_norm = plate.plate_attrs().get("normalization", {})
        if plate_norm:
            lines.append("dataset statistics (median / iqr / p1 / p99):")
            for ch, meta in plate_norm.items():
                s = meta.get("dataset_statistics", {})
                lines.append(
                    f"  {ch:<10} {s.get('median', float('nan')):10.4g} {s.get('iqr', float('nan')):10.4g} "
                    f"{s.get('p1', float('nan')):10.4g} {s.get('p99', float('nan')):10.4g}"
                )
        else:
            lines.append("no normalization statistics (run `viscy preprocess`)")
        extras = []
        if plate.has_array(names[0], FG_MASK_KEY):
            extras.append(FG_MASK_KEY)
        extras += [f"labels/{n}" for n in plate.labels(names[0])]
        if extras:
            lines.append(f"extras    {', '.join(extras)}")
        lines.append("positions " + ", ".join(names[:12]) + (" ..." if len(names) > 12 else ""))
    return "\n".join(lines)


def run_info(config: InfoConfig) -> None:
    """CLI entry of ``viscy info``."""
    print(summarize_plate(config.data_path, config.positions))
