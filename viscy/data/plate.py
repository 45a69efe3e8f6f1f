"""Lazy, validated access to OME-Zarr HCS plates (and single-FOV stores) through iohub.

``Plate`` is the only way the rest of viscy reads pixels: it enumerates positions (``row/col/fov``),
resolves channel names, validates axes, dtypes and shapes, and reads TCZYX regions without loading more
than the chunks a region touches. It pickles as its path, so Ray tasks reopen it where they run.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import blosc
from pydantic import Field

from viscy.config import StrictModel, StrList
from viscy.errors import ChannelNotFoundError, CorruptDataError, DataError, ShapeError

IMAGE_KEY = "0"
FG_MASK_KEY = "fg_mask"
LABELS_GROUP = "labels"
EXPECTED_AXES = ("t", "c", "z", "y", "x")
SUPPORTED_DTYPES = tuple(
    np.dtype(d) for d in ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32", "float64")
)

# Blosc's internal thread pool is not fork/actor safe ("Mutex corrupt" aborts in Ray workers); zarr's
# documented remedy is to let Blosc decode in the calling thread.
blosc.use_threads = False

# What zarr 2.18 / numcodecs 0.15 raise for a chunk that is corrupt, truncated or unreadable, measured per
# compressor: Blosc (iohub's default), Zstd and LZ4 RuntimeError; LZ4 and uncompressed chunks of the wrong
# size ValueError; Zlib zlib.error; GZip gzip.BadGzipFile (an OSError) or EOFError; the store OSError.
_DECODE_ERRORS = (RuntimeError, ValueError, EOFError, OSError, zlib.error)
# ValueError and RuntimeError are also what a bad selection raises, so an error counts as corrupt data only
# when it was raised while zarr fetched or decoded chunks, i.e. below one of these functions of zarr.core.
_CHUNK_FUNCTIONS = frozenset({"_chunk_getitems", "_chunk_getitem", "_process_chunk", "_decode_chunk"})
_ZARR_CORE = os.path.join("zarr", "core.py")


def _is_chunk_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from fetching or decoding a chunk (corrupt data), not from the selection."""
    if not isinstance(exc, _DECODE_ERRORS):
        return False
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _CHUNK_FUNCTIONS and code.co_filename.endswith(_ZARR_CORE):
            return True
        tb = tb.tb_next
    return False


# iohub warns loudly (and harmlessly) about stores other writers made; errors below are clearer.
logging.getLogger("iohub").setLevel(logging.ERROR)


@dataclass(frozen=True)
class FovInfo:
    """Shape and metadata of one field of view."""

    name: str
    shape: tuple[int, int, int, int, int]
    dtype: np.dtype
    chunks: tuple[int, ...]
    scale: tuple[float, ...]


def _open_iohub(path: Path):
    from iohub.ngff import open_ome_zarr

    try:
        return open_ome_zarr(path, layout="auto", mode="r")
    except Exception as exc:  # iohub raises several types for "not a store"
        raise DataError(
            f"{path} is not an OME-Zarr HCS plate or FOV store ({type(exc).__name__}: {exc}); "
            "point to the plate root (the directory whose .zattrs holds 'plate') or convert the data "
            "with `iohub convert`"
        ) from None


class Plate:
    """Read-only view of an HCS plate, a FOV inside a plate, or a single-FOV store.

    Parameters
    ----------
    path
        Plate root (``plate.zarr``), a position inside a plate (``plate.zarr/A/1/0``), or a FOV store.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._node = None
        self._only: str | None = None
        self._open()

    # ------------------------------------------------------------------ opening and pickling
    def _open(self) -> None:
        path = self.path
        if not path.exists():
            raise DataError(f"{path} does not exist; check the path (plates usually end in .zarr)")
        root, only = self._find_root(path)
        node = _open_iohub(root)
        from iohub.ngff import Plate as IohubPlate
        from iohub.ngff import Position

        if isinstance(node, IohubPlate):
            self.kind = "hcs"
        elif isinstance(node, Position):
            self.kind = "fov"
        else:
            raise DataError(f"{root} is an OME-Zarr store of unsupported layout {type(node).__name__}")
        self._node, self._only, self.root = node, only, root
        self._positions = self._list_positions()
        if not self._positions:
            raise DataError(f"{root} holds no positions with an image array '{IMAGE_KEY}'")
        if only is not None and only not in self._positions:
            raise DataError(f"{path}: position {only!r} not found; available: {', '.join(self._positions)}")

    @staticmethod
    def _find_root(path: Path) -> tuple[Path, str | None]:
        """Plate root and position name when ``path`` points inside a plate (``.../A/1/0``)."""
        parts = path.resolve().parts
        if len(parts) > 3:
            candidate = Path(*parts[:-3])
            if "plate" in _read_json(candidate / ".zattrs"):
                return candidate, "/".join(parts[-3:])
        return path, None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._node = None
        self._open()

    def __enter__(self) -> Plate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the store handle."""
        if self._node is not None:
            self._node.close()

    def __repr__(self) -> str:
        return f"Plate({str(self.path)!r}, positions={len(self._positions)}, channels={self.channel_names})"

    # ------------------------------------------------------------------ positions and channels
    def _list_positions(self) -> list[str]:
        if self.kind == "fov":
            return ["0"] if IMAGE_KEY in self._node.array_keys() else []
        names = []
        for name, pos in self._node.positions():
            if IMAGE_KEY in pos.array_keys():
                names.append(name.strip("/"))
        if self._only is not None:
            return [n for n in names if n == self._only] or names
        return names

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

    def position_node(self, name: str):
        """The iohub ``Position`` for ``name``."""
        if name not in self._positions:
            raise DataError(f"position {name!r} not in {self.root}; available: {', '.join(self._positions)}")
        return self._node if self.kind == "fov" else self._node[name]

    @property
    def channel_names(self) -> list[str]:
        """Channel names (from OMERO metadata; indices as strings when a writer stored none)."""
        names = self.position_node(self._positions[0]).channel_names
        return [str(n) for n in names]

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
    def image(self, name: str):
        """The full-resolution image array (lazy iohub ``ImageArray``) of a position, validated."""
        pos = self.position_node(name)
        axes = tuple(a.name.lower() for a in pos.axes)
        if axes != EXPECTED_AXES:
            raise DataError(
                f"position {name} of {self.root} has axes {axes}; viscy needs (t, c, z, y, x). "
                "Rewrite the store in TCZYX order (e.g. with iohub), adding singleton axes as needed."
            )
        arr = pos[IMAGE_KEY]
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
        pos = self.position_node(name)
        try:
            scale = tuple(float(s) for s in pos.scale)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            warnings.warn(
                f"position {name} of {self.root}: cannot read the pixel scale from its coordinateTransformations "
                f"({type(exc).__name__}: {exc}); using unit scale (1, 1, 1, 1, 1). Fix the position's "
                "multiscales metadata (e.g. rewrite it with iohub) to keep physical units",
                stacklevel=2,
            )
            scale = (1.0,) * 5
        return FovInfo(name, tuple(arr.shape), np.dtype(arr.dtype), tuple(arr.chunks), scale)

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

    def check_window(self, name: str, z_window: int, yx_patch: tuple[int, int]) -> None:
        """Raise a ``ShapeError`` if a z window or YX patch does not fit the FOV."""
        _, _, z, y, x = self.info(name).shape
        if z_window > z:
            raise ShapeError(
                f"z window of {z_window} slices is larger than the {z}-slice stack of {name}; "
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
        array: str = IMAGE_KEY,
    ) -> np.ndarray:
        """Read a ``(C, Z, Y, X)`` region; only the chunks it touches are read and decoded.

        Raises
        ------
        CorruptDataError
            If a chunk cannot be decoded; names the position, region and fix.
        """
        arr = self.image(name) if array == IMAGE_KEY else self.position_node(name).zgroup[array]
        if channels is not None:
            channels = self._check_channels(arr.shape[1], channels)
        sel_c = slice(None) if channels is None else channels
        try:
            if isinstance(sel_c, list) and sel_c == list(range(sel_c[0], sel_c[-1] + 1)):
                data = arr[t, sel_c[0] : sel_c[-1] + 1, z, y, x]
            elif isinstance(sel_c, list):
                data = np.stack([arr[t, c, z, y, x] for c in sel_c])
            else:
                data = arr[t, :, z, y, x]
        except _DECODE_ERRORS as exc:
            if not _is_chunk_error(exc):
                raise  # a bad selection is a bug of the caller, not corrupt data
            raise CorruptDataError(
                f"cannot decode data of {self.root}/{name}/{array} at t={t}, c={channels}, z={z}, y={y}, x={x}: "
                f"{type(exc).__name__}: {exc}. The chunk is corrupt or truncated: re-copy the position from its "
                "source, or exclude it with the positions key"
            ) from None
        return np.asarray(data)

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
        """The root ``.zattrs`` (plate-level metadata)."""
        return dict(self._node.zattrs)

    def position_attrs(self, name: str) -> dict[str, Any]:
        """A position's ``.zattrs``."""
        return dict(self.position_node(name).zattrs)

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
        try:
            self.position_node(name).zgroup[array]
        except KeyError:
            return False
        return True

    def labels(self, name: str) -> list[str]:
        """Names of the NGFF label images of a position (e.g. ``nuclei``, ``cells``)."""
        grp = self.position_node(name).zgroup
        if LABELS_GROUP not in grp:
            return []
        return list(grp[LABELS_GROUP].attrs.get("labels", []))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


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
            f"shape     {first.shape} (T, C, Z, Y, X) {first.dtype}, chunks {first.chunks}",
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
