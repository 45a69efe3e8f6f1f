"""Chunked reads of zarr v2 and v3 arrays through one of two engines, behind one small interface.

* ``tensorstore`` reads zarr v2 and v3 (sharded or not) and decodes chunks in its own thread pool.
* ``zarr`` (zarr-python 2, what iohub 0.2 uses) reads zarr v2 only.

``LazyArray`` is what ``Plate`` hands out: shape, dtype and chunks come from the array's metadata file, the engine
handle is opened on the first read and never pickled, so arrays (and plates) travel to Ray workers as paths.
Selections are checked and normalised here, before any engine sees them, so both engines accept and refuse
the same selections, and an error raised while reading is a chunk that cannot be fetched or decoded.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import blosc

from viscy.errors import DataError

# Blosc's internal thread pool is not fork/actor safe ("Mutex corrupt" aborts in Ray workers); zarr's
# documented remedy is to let Blosc decode (and encode: viscy's zarr v2 writers) in the calling thread.
blosc.use_threads = False

ENGINES = ("auto", "tensorstore", "zarr")
# The engine "auto" picks per zarr format. tensorstore is the only one that reads v3, and it read zarr v2 patches
# 1.43x as fast as zarr-python 2 (1.19x on one thread; benchmarks/bench_read_engine.py, docs/data.md "Read
# engines"), so it reads both; "auto" falls back to zarr-python 2 for v2 codecs tensorstore lacks, and in a
# forked child of a process that used tensorstore.
AUTO_ENGINE = {2: "tensorstore", 3: "tensorstore"}

# What zarr 2.18 / numcodecs 0.15 raise for a chunk that is corrupt, truncated or unreadable, measured per
# compressor: Blosc (iohub's default), Zstd and LZ4 RuntimeError; LZ4 and uncompressed chunks of the wrong
# size ValueError; Zlib zlib.error; GZip gzip.BadGzipFile (an OSError) or EOFError; the store OSError.
_ZARR_DECODE_ERRORS = (RuntimeError, ValueError, EOFError, OSError, zlib.error)
# ValueError and RuntimeError are also what a bad selection raises, so an error counts as corrupt data only
# when it was raised while zarr fetched or decoded chunks, i.e. below one of these functions of zarr.core.
_CHUNK_FUNCTIONS = frozenset({"_chunk_getitems", "_chunk_getitem", "_process_chunk", "_decode_chunk"})
_ZARR_CORE = os.path.join("zarr", "core.py")


class ChunkReadError(Exception):
    """A chunk could not be fetched or decoded (the message is the engine's)."""


def _is_zarr_chunk_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from zarr-python 2 fetching or decoding a chunk, not from the selection."""
    if not isinstance(exc, _ZARR_DECODE_ERRORS):
        return False
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _CHUNK_FUNCTIONS and code.co_filename.endswith(_ZARR_CORE):
            return True
        tb = tb.tb_next
    return False


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file; ``None`` if the file is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class ArrayMeta:
    """What a zarr array's metadata file says about it.

    Attributes
    ----------
    chunks
        The read chunk shape (the inner chunks of a sharded array).
    shards
        The shard shape of a sharded zarr v3 array, else ``None``.
    separator
        Chunk key separator of a zarr v2 array (``"/"`` for NGFF 0.4).
    """

    path: Path
    zarr_format: int
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None
    separator: str = "/"
    separator_stored: bool = True


def _v2_separator(path: Path, meta: dict[str, Any]) -> tuple[str, bool]:
    """The chunk key separator: stored in ``.zarray`` since zarr 2.8; else guessed from the chunk files."""
    sep = meta.get("dimension_separator")
    if sep in ("/", "."):
        return sep, True
    try:
        nested = any(p.is_dir() and p.name.isdigit() for p in path.iterdir())
    except OSError:
        nested = False
    return ("/" if nested else "."), False


def array_meta(path: Path) -> ArrayMeta | None:
    """Metadata of the zarr array at ``path`` (v3 ``zarr.json`` or v2 ``.zarray``); ``None`` if there is none.

    Raises
    ------
    DataError
        If the metadata exist but name a data type numpy does not know.
    """
    v3 = read_json(path / "zarr.json")
    if v3 is not None:
        if v3.get("node_type") != "array":
            return None
        try:
            shape = tuple(int(s) for s in v3["shape"])
            grid = tuple(int(s) for s in v3["chunk_grid"]["configuration"]["chunk_shape"])
            codecs = v3.get("codecs") or []
            shards = None
            if codecs and codecs[0].get("name") == "sharding_indexed":
                shards, chunks = grid, tuple(int(s) for s in codecs[0]["configuration"]["chunk_shape"])
            else:
                chunks = grid
            dtype = _dtype(v3["data_type"], path)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DataError(
                f"{path}/zarr.json is not valid zarr v3 array metadata ({type(exc).__name__}: {exc})"
            ) from None
        return ArrayMeta(path, 3, shape, dtype, chunks, shards)
    v2 = read_json(path / ".zarray")
    if v2 is None:
        return None
    try:
        shape = tuple(int(s) for s in v2["shape"])
        chunks = tuple(int(s) for s in v2["chunks"])
        dtype = _dtype(v2["dtype"], path)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}/.zarray is not valid zarr v2 array metadata ({type(exc).__name__}: {exc})") from None
    sep, stored = _v2_separator(path, v2)
    return ArrayMeta(path, 2, shape, dtype, chunks, None, sep, stored)


def _dtype(spec: Any, path: Path) -> np.dtype:
    try:
        return np.dtype(spec if isinstance(spec, str) else [tuple(f) for f in spec])
    except (TypeError, ValueError):
        raise DataError(f"array {path} has data type {spec!r}, which viscy cannot read") from None


# ---------------------------------------------------------------------------------- selections
Selection = tuple[Any, ...]


def normalize_selection(selection: Any, shape: tuple[int, ...]) -> Selection:
    """Check a selection against ``shape`` and make it explicit: ints in range, slices with bounds and step.

    Accepts ints, slices with step >= 1, ``Ellipsis`` and one list of ints (read in its order). Raises what
    numpy raises for the same mistake: ``IndexError`` out of range, ``ValueError`` for a zero step,
    ``TypeError`` for anything else.
    """
    sel = selection if isinstance(selection, tuple) else (selection,)
    if any(s is Ellipsis for s in sel):
        i = next(k for k, s in enumerate(sel) if s is Ellipsis)
        rest = sel[i + 1 :]
        if any(s is Ellipsis for s in rest):
            raise IndexError("an index can only have a single ellipsis ('...')")
        sel = sel[:i] + (slice(None),) * (len(shape) - len(sel) + 1) + rest
    if len(sel) > len(shape):
        raise IndexError(f"too many indices for array: array is {len(shape)}-dimensional, but {len(sel)} were indexed")
    sel = sel + (slice(None),) * (len(shape) - len(sel))
    out: list[Any] = []
    lists = 0
    for axis, (s, n) in enumerate(zip(sel, shape, strict=True)):
        if isinstance(s, slice):
            start, stop, step = s.indices(n)  # ValueError("slice step cannot be zero")
            if step < 1:
                raise IndexError(f"only slices with step >= 1 are supported (axis {axis} has step {step})")
            out.append(slice(start, max(start, stop), step))
        elif isinstance(s, (list, np.ndarray)) and not isinstance(s, bool):
            lists += 1
            if lists > 1:
                raise TypeError("only one axis can be selected with a list of indices")
            out.append(tuple(_index(i, n, axis) for i in np.asarray(s).ravel().tolist()))
        else:
            out.append(_index(s, n, axis))
    return tuple(out)


def _index(i: Any, n: int, axis: int) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"index {i!r} on axis {axis} is not an integer, a slice or a list of integers")
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"index {i} is out of bounds for axis {axis} with size {n}")
    return i % n


def selection_shape(sel: Selection) -> tuple[int, ...]:
    """Shape of the array a normalised selection reads (ints drop their axis)."""
    shape: list[int] = []
    for s in sel:
        if isinstance(s, slice):
            shape.append(len(range(s.start, s.stop, s.step)))
        elif isinstance(s, tuple):
            shape.append(len(s))
    return tuple(shape)


# ---------------------------------------------------------------------------------- engines
_TS_CONTEXT = None
_TS_THREADS: int | None = None
# The process that started tensorstore's threads. tensorstore aborts a process forked from it that uses it
# ("fork() use detected"), so a forked child (e.g. a DataLoader worker with the fork start method) reads zarr v2
# with zarr-python 2 and refuses zarr v3 with an error instead.
_TS_PID: int | None = None


def tensorstore_usable() -> bool:
    """Whether this process may use tensorstore (it is not a fork of a process that already used it)."""
    return _TS_PID is None or _TS_PID == os.getpid()


def _fork_error(what: str) -> DataError:
    return DataError(
        f"{what} needs tensorstore, which cannot run in a process forked from one that already used it; start "
        "worker processes with the 'spawn' method (e.g. DataLoader(multiprocessing_context='spawn'))"
    )


def set_read_threads(threads: int | None) -> None:
    """Limit tensorstore's decode threads for arrays opened from now on (``None``: its default, one per core).

    The environment variable ``VISCY_READ_THREADS`` sets the same limit for a whole process (e.g. Ray workers).
    """
    global _TS_CONTEXT, _TS_THREADS
    _TS_CONTEXT, _TS_THREADS = None, threads


def ts_context():
    """One tensorstore context per process: no chunk cache, decode threads as :func:`set_read_threads` says."""
    global _TS_CONTEXT, _TS_PID
    if not tensorstore_usable():
        raise _fork_error("reading or writing zarr v3")
    if _TS_CONTEXT is None:
        import tensorstore as ts

        _TS_PID = os.getpid()

        spec: dict[str, Any] = {"cache_pool": {"total_bytes_limit": 0}}
        threads = _TS_THREADS or int(os.environ.get("VISCY_READ_THREADS") or 0)
        if threads:
            spec["data_copy_concurrency"] = {"limit": max(1, threads)}
        _TS_CONTEXT = ts.Context(spec)
    return _TS_CONTEXT


def _open_tensorstore(meta: ArrayMeta):
    import tensorstore as ts

    spec: dict[str, Any] = {
        "driver": "zarr3" if meta.zarr_format == 3 else "zarr",
        "kvstore": {"driver": "file", "path": str(meta.path.resolve()) + "/"},
    }
    if meta.zarr_format == 2 and not meta.separator_stored:
        spec["metadata"] = {"dimension_separator": meta.separator}
    return ts.open(spec, read=True, context=ts_context()).result()


def _open_zarr(meta: ArrayMeta):
    import zarr

    store = zarr.storage.DirectoryStore(str(meta.path), dimension_separator=meta.separator)
    return zarr.open_array(store=store, mode="r")


class LazyArray:
    """A zarr v2 or v3 array, opened by its engine on the first read; pickles as its metadata.

    Parameters
    ----------
    meta
        The array's metadata (:func:`array_meta`).
    engine
        ``"tensorstore"``, ``"zarr"`` (zarr v2 only) or ``"auto"``.
    """

    def __init__(self, meta: ArrayMeta, engine: str = "auto") -> None:
        self.meta = meta
        self.requested = engine
        self.engine = resolve_engine(engine, meta.zarr_format, meta.path)
        self._handle: Any = None
        self._pid = 0  # the process that opened the handle

    def __getstate__(self) -> dict[str, Any]:
        return {"meta": self.meta, "engine": self.requested}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["meta"], state["engine"])

    def __repr__(self) -> str:
        return f"LazyArray({str(self.meta.path)!r}, shape={self.shape}, dtype={self.dtype}, engine={self.engine!r})"

    @property
    def path(self) -> Path:
        return self.meta.path

    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.shape

    @property
    def ndim(self) -> int:
        return len(self.meta.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.meta.dtype

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.meta.chunks

    @property
    def shards(self) -> tuple[int, ...] | None:
        return self.meta.shards

    def handle(self) -> Any:
        """The engine's array (a ``tensorstore.TensorStore`` or a ``zarr.Array``), opened once per process."""
        if self._handle is not None and self._pid == os.getpid():
            return self._handle
        self._handle, self._pid = None, os.getpid()
        fallback = self.requested == "auto" and self.meta.zarr_format == 2
        if self.engine == "tensorstore" and not tensorstore_usable():
            if not fallback:
                raise _fork_error(f"array {self.meta.path} (engine {self.requested!r})")
            self.engine = "zarr"
        try:
            self._handle = _open_tensorstore(self.meta) if self.engine == "tensorstore" else _open_zarr(self.meta)
        except Exception as exc:  # both engines raise several types for metadata they cannot read
            if not (fallback and self.engine == "tensorstore"):
                raise DataError(
                    f"cannot open array {self.meta.path} with {self.engine} ({type(exc).__name__}: {exc})"
                ) from None
            # tensorstore knows fewer zarr v2 codecs than numcodecs (no LZ4; no Zstd "checksum" member):
            # zarr-python 2 reads what numcodecs wrote.
            self.engine = "zarr"
            return self.handle()
        return self._handle

    def __getitem__(self, selection: Any) -> np.ndarray:
        """Read a selection (ints, slices with step >= 1, one list of ints) into a numpy array.

        Raises
        ------
        ChunkReadError
            If a chunk the selection touches cannot be fetched or decoded.
        """
        return self.fetch(selection)()

    def fetch(self, selection: Any) -> Callable[[], np.ndarray]:
        """Start reading a selection and return a function that waits for it (see ``__getitem__``).

        With tensorstore the chunks are fetched and decoded in its own threads meanwhile, so a caller can
        compute on one region while the next is read; zarr-python 2 reads when the function is called.
        """
        sel = normalize_selection(selection, self.shape)
        if any(isinstance(s, slice) and s.start == s.stop for s in sel):
            return lambda: np.empty(selection_shape(sel), dtype=self.dtype)
        handle = self.handle()
        has_list = any(isinstance(s, tuple) for s in sel)
        outer = tuple(list(s) if isinstance(s, tuple) else s for s in sel)  # the one list, as a list
        if self.engine == "tensorstore":
            future = (handle.oindex[outer] if has_list else handle[sel]).read()

            def wait() -> np.ndarray:
                try:
                    return np.asarray(future.result())
                except (ValueError, OSError, RuntimeError) as exc:  # tensorstore: ValueError("DATA_LOSS: ...")
                    raise ChunkReadError(str(exc)) from None

            return wait

        def read() -> np.ndarray:
            try:
                return np.asarray(handle.get_orthogonal_selection(outer) if has_list else handle[sel])
            except _ZARR_DECODE_ERRORS as exc:
                if not _is_zarr_chunk_error(exc):
                    raise
                raise ChunkReadError(f"{type(exc).__name__}: {exc}") from None

        return read


def resolve_engine(engine: str, zarr_format: int, path: Path | str = "") -> str:
    """The engine that reads a zarr ``zarr_format`` array: ``engine`` itself, or the default for ``"auto"``.

    Raises
    ------
    DataError
        For an unknown engine, or zarr-python 2 asked to read zarr v3.
    """
    if engine not in ENGINES:
        raise DataError(f"unknown read engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        return AUTO_ENGINE[zarr_format]
    if engine == "zarr" and zarr_format != 2:
        raise DataError(
            f"{path} is a zarr v{zarr_format} array, which zarr-python 2 cannot read; use engine 'tensorstore' "
            "(or 'auto')"
        )
    return engine
