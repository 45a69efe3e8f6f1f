"""Image payloads of the HTTP API: decoding requests and encoding answers, with errors that name the fix.

Encodings, chosen by ``Content-Type`` (requests) and ``Accept`` (answers):

* ``application/octet-stream``: raw C-order bytes with ``X-Dtype`` and ``X-Shape`` headers (the fast path);
* ``application/x-npy``: a ``.npy`` file, loaded with ``allow_pickle=False`` (object arrays are refused);
* ``image/tiff``: a TIFF (tifffile); ``image/png`` is accepted as input (Pillow);
* ``application/x-npz``: several named arrays (stains and masks), for multi-output answers.

Nothing here touches a file path: bytes in, bytes out.
"""

from __future__ import annotations

import io
import json
import logging
import math
import struct
from collections.abc import Mapping

import numpy as np

log = logging.getLogger("ray.serve")
RAW = "application/octet-stream"
NPY = "application/x-npy"
NPZ = "application/x-npz"
TIFF = "image/tiff"
PNG = "image/png"
JSON = "application/json"
INPUT_TYPES = (RAW, NPY, TIFF, PNG)
ARRAY_ANSWERS = (NPY, RAW, TIFF)
INPUT_DTYPES = ("uint8", "uint16", "int8", "int16", "int32", "float16", "float32", "float64")
# Images are (Y, X), (Z, Y, X) or (C, Z, Y, X).
MIN_NDIM, MAX_NDIM = 2, 4
# The default of ServeConfig.max_image_pixels (8 planes of 2048 x 2048).
DEFAULT_MAX_VALUES = 8 * 2048 * 2048
# A TIFF page chain is followed at most this far (each page costs a parse before any pixel is read).
MAX_TIFF_PAGES = 4096
MAX_TIFF_TAGS = 32768
# TIFF compressions accepted: none, LZW, deflate (two codes), PackBits, zstd.
TIFF_CODECS = frozenset({1, 5, 8, 32946, 32773, 50000})
MAX_STATISTICS_CHARS = 16384
SUFFIX_TYPES = {".npy": NPY, ".tif": TIFF, ".tiff": TIFF, ".png": PNG, ".npz": NPZ, ".raw": RAW}


class PayloadError(ValueError):
    """A request the server refuses; ``status`` is the HTTP code, the message names the problem and the fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def media_type(header: str | None) -> str:
    """The bare media type of a Content-Type/Accept value (parameters and case dropped)."""
    return (header or "").split(";", 1)[0].strip().lower()


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise PayloadError(400, "the payload holds pickled Python objects, which are never loaded; "
                                "send a numeric array (np.save of a float or integer array)")
    if dtype.name not in INPUT_DTYPES:
        raise PayloadError(
            415, f"unsupported dtype {dtype.name!r}; send one of {', '.join(INPUT_DTYPES)}"
        )


def check_image_size(shape: tuple[int, ...], max_values: int, what: str = "image") -> None:
    """Refuse a shape outside 2-4 dimensions (422) or over ``max_values`` values (413), before allocating.

    The product is taken over Python ints, so no header can overflow it.
    """
    if not MIN_NDIM <= len(shape) <= MAX_NDIM:
        raise PayloadError(422, f"the {what} has {len(shape)} dimension(s) {tuple(shape)}; send (Y, X), "
                                "(Z, Y, X) or (C, Z, Y, X)")
    values = math.prod(int(n) for n in shape)
    if values > max_values:
        raise PayloadError(413, f"the {what} of shape {tuple(shape)} holds {values} values, over max_image_pixels "
                                f"({max_values}); send a smaller image or tile it")


def parse_shape(text: str | None) -> tuple[int, ...]:
    """``"1,256,256"`` (or ``"1x256x256"``) as a tuple of positive ints (a few, of at most 12 digits)."""
    if not text:
        raise PayloadError(400, "raw application/octet-stream bodies need X-Dtype and X-Shape headers, "
                                "e.g. X-Dtype: float32 and X-Shape: 512,512")
    parts = [v for v in text.replace("x", ",").split(",") if v.strip()]
    if not parts or len(parts) > 2 * MAX_NDIM or any(len(v.strip()) > 12 for v in parts):
        raise PayloadError(400, f"X-Shape {text[:40]!r} must list 2 to 4 sizes, e.g. 512,512 or 5,512,512")
    try:
        shape = tuple(int(v) for v in parts)
    except ValueError:
        raise PayloadError(400, f"X-Shape {text[:40]!r} is not a comma-separated list of sizes, e.g. 512,512") from None
    if min(shape) < 1:
        raise PayloadError(400, f"X-Shape {text[:40]!r} must list positive sizes, e.g. 512,512")
    return shape


def _refusal(status: int, message: str, exc: BaseException) -> PayloadError:
    """A refusal with viscy's own text: a parser's message (heap addresses, internal names) goes to the log only."""
    log.info("payload refused (%s): %s: %s", message, type(exc).__name__, " ".join(str(exc).split())[:300])
    return PayloadError(status, message)


def decode_image(
    body: bytes, content_type: str | None, dtype: str | None = None, shape: str | None = None,
    max_values: int = DEFAULT_MAX_VALUES,
) -> np.ndarray:
    """Decode a request body into an array (not yet checked against a model).

    Every decoder reads the shape and dtype from the header first and refuses before allocating the pixels:
    no body decodes to more than ``max_values`` values (nor, for TIFF, decodes tiles or strips of more
    than a few times that).

    Raises
    ------
    PayloadError
        400 for an empty or corrupt body or a size mismatch, 413 for an image over ``max_values``, 415 for an
        unknown content type or dtype, 422 for an image that is not 2 to 4 dimensional.
    """
    kind = media_type(content_type)
    if kind not in INPUT_TYPES:
        raise PayloadError(
            415, f"unsupported Content-Type {str(content_type)[:60]!r}; send one of {', '.join(INPUT_TYPES)}"
        )
    if not body:
        raise PayloadError(400, "empty request body; send an image (see GET /docs for the encodings)")
    if kind == RAW:
        arr = _decode_raw(body, dtype, shape, max_values)
    elif kind == NPY:
        arr = _decode_npy(body, max_values)
    elif kind == TIFF:
        arr = _decode_tiff(body, max_values)
    else:
        arr = _decode_png(body, max_values)
    if arr.size == 0:
        raise PayloadError(400, f"the {kind} payload holds no pixels (shape {arr.shape}); send a whole image")
    return arr


def _decode_raw(body: bytes, dtype: str | None, shape: str | None, max_values: int) -> np.ndarray:
    try:
        dt = np.dtype(str(dtype or "")[:16])
    except Exception:  # noqa: BLE001 - numpy raises TypeError, ValueError or SyntaxError for a bad spec
        raise PayloadError(
            415, f"X-Dtype {str(dtype)[:40]!r} is not a numpy dtype; use e.g. float32 or uint16"
        ) from None
    _check_dtype(dt)
    dims = parse_shape(shape)
    check_image_size(dims, max_values)
    expected = math.prod(dims) * dt.itemsize
    if len(body) != expected:
        raise PayloadError(
            400, f"body has {len(body)} bytes but X-Shape {dims} of {dt.name} needs {expected}; check X-Shape"
        )
    return np.frombuffer(body, dtype=dt).reshape(dims)


def _decode_npy(body: bytes, max_values: int) -> np.ndarray:
    if body.startswith(b"PK"):
        raise PayloadError(400, "the body is an .npz archive; send a single array as .npy")
    if not body.startswith(b"\x93NUMPY"):
        raise PayloadError(400, "corrupt .npy payload (no NPY header); send the bytes np.save writes")
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dt = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dt = np.lib.format.read_array_header_2_0(fp)
        else:
            raise PayloadError(400, f"corrupt .npy payload (format version {version} is not read); send np.save's 1.0")
    except PayloadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any header failure is the client's corrupt payload
        raise _refusal(400, "corrupt .npy header; send the bytes np.save writes", exc) from None
    if not all(type(n) is int and n > 0 for n in shape):
        raise PayloadError(400, f"corrupt .npy header (shape {str(shape)[:40]}); send the bytes np.save writes")
    _check_dtype(dt)
    check_image_size(tuple(shape), max_values)
    offset = fp.tell()
    expected = math.prod(shape) * dt.itemsize
    if len(body) - offset != expected:
        raise PayloadError(400, f".npy header says {tuple(shape)} of {dt.name} ({expected} bytes) but "
                                f"{len(body) - offset} bytes follow it; send the bytes np.save writes")
    flat = np.frombuffer(body, dtype=dt, count=math.prod(shape), offset=offset)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def _tiff_directories(body: bytes) -> None:
    """Walk the TIFF's page chain with ``struct`` (tag counts and next offsets only) and refuse a long one.

    tifffile parses every tag of every page it opens; a chain of overlapping directories of 4,096 tags each
    costs minutes of CPU in a few hundred KB, so the count is bounded before tifffile reads anything.
    """
    order = {b"II": "<", b"MM": ">"}.get(body[:2])
    if order is None or len(body) < 16:
        return  # not a TIFF: tifffile says so
    version = struct.unpack_from(order + "H", body, 2)[0]
    big = version == 43
    offset = struct.unpack_from(order + ("Q" if big else "I"), body, 8 if big else 4)[0]
    count_fmt, entry, next_fmt = (order + "Q", 20, order + "Q") if big else (order + "H", 12, order + "I")
    pages, tags, seen = 0, 0, set()
    while offset and offset not in seen and offset + struct.calcsize(count_fmt) <= len(body):
        seen.add(offset)
        count = struct.unpack_from(count_fmt, body, offset)[0]
        pages, tags = pages + 1, tags + count
        if pages > MAX_TIFF_PAGES or tags > MAX_TIFF_TAGS:
            raise PayloadError(413, f"the TIFF has over {MAX_TIFF_PAGES} pages or {MAX_TIFF_TAGS} tags; send one "
                                    "image or stack")
        end = offset + struct.calcsize(count_fmt) + count * entry
        if end + struct.calcsize(next_fmt) > len(body):
            return
        offset = struct.unpack_from(next_fmt, body, end)[0]


def _decode_tiff(body: bytes, max_values: int) -> np.ndarray:
    import tifffile

    _tiff_directories(body)
    try:
        with tifffile.TiffFile(io.BytesIO(body)) as tif:
            series = tif.series[0]
            _check_dtype(np.dtype(series.dtype))
            check_image_size(tuple(series.shape), max_values, "TIFF image")
            pages = [p for p in series.pages if p is not None]
            # Codecs outside this list (JPEG, JPEG 2000, WebP, JPEG XL, LERC, ...) carry their own image size
            # and allocate it whatever the TIFF declares; these decode into a buffer of the declared tile size.
            codecs = {int(p.compression) for p in pages}
            if not codecs <= TIFF_CODECS:
                raise PayloadError(415, f"TIFF compression {sorted(codecs - TIFF_CODECS)} is not accepted; "
                                        "send it uncompressed or with LZW, deflate, zstd or PackBits")
            # What decoding touches: every tile or strip at its full size (a tile may reach past the image).
            decoded = sum(len(p.dataoffsets) * math.prod(p.chunks) for p in pages)
            budget = 4 * math.prod(series.shape) + (1 << 20)
            if decoded > budget:
                raise PayloadError(413, f"the TIFF's tiles or strips decode to {decoded} values for an image of "
                                        f"{math.prod(series.shape)}; write it with tiles no larger than the image")
            arr = series.asarray(maxworkers=1)
    except PayloadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure is the client's corrupt payload
        raise _refusal(400, "corrupt TIFF payload; send a whole .tif file as image/tiff", exc) from None
    return np.asarray(arr)


def _decode_png(body: bytes, max_values: int) -> np.ndarray:
    from PIL import Image

    # Pillow's own bomb check (a warning over the limit, an error over twice it) follows the server's limit.
    Image.MAX_IMAGE_PIXELS = max_values
    try:
        with Image.open(io.BytesIO(body), formats=["PNG"]) as img:
            width, height = img.size
            check_image_size((height, width), max_values, "PNG image")
            img = img.convert("I;16") if img.mode in ("I;16", "I;16B", "I") else img.convert("L")
            arr = np.asarray(img)
    except PayloadError:
        raise
    except Image.DecompressionBombError:
        raise PayloadError(413, f"the PNG image is over max_image_pixels ({max_values}); send a smaller image") \
            from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is the client's corrupt payload
        raise _refusal(400, "corrupt PNG payload; send a whole .png file as image/png", exc) from None
    _check_dtype(arr.dtype)
    return arr


def encode_array(arr: np.ndarray, accept: str) -> tuple[bytes, str, dict[str, str]]:
    """Body, media type and headers of one array in the requested encoding (raw adds X-Dtype/X-Shape)."""
    arr = np.ascontiguousarray(arr)
    headers = {"X-Dtype": arr.dtype.name, "X-Shape": ",".join(map(str, arr.shape))}
    if accept == RAW:
        return arr.tobytes(), RAW, headers
    buf = io.BytesIO()
    if accept == TIFF:
        import tifffile

        tifffile.imwrite(buf, arr, metadata={"axes": _axes(arr.ndim)}, photometric="minisblack")
        return buf.getvalue(), TIFF, headers
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue(), NPY, headers


def _axes(ndim: int) -> str:
    return "CZYX"[-ndim:] if ndim <= 4 else "Q" * (ndim - 4) + "CZYX"


def encode_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Several named arrays as an (uncompressed) ``.npz``; load with ``np.load(..., allow_pickle=False)``."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def decode_npz(body: bytes) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` answer."""
    with np.load(io.BytesIO(body), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def negotiate(accept: str | None, request_type: str, allowed: tuple[str, ...]) -> str:
    """The answer's media type: the first acceptable of ``allowed``; ``*/*`` or none mirrors the request."""
    wanted = [media_type(part) for part in (accept or "").split(",") if part.strip()]
    if not wanted or all(w in ("*/*", "application/*") for w in wanted):
        fallback = request_type if request_type in allowed else allowed[0]
        return fallback
    for w in wanted:
        if w in allowed:
            return w
    raise PayloadError(406, f"cannot answer in {accept!r}; ask for one of {', '.join(allowed)}")


def _finite_number(x: object) -> bool:
    try:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def parse_statistics(text: str | None) -> dict[str, dict[str, float]] | None:
    """The ``X-Viscy-Statistics`` header: ``{"Phase3D": {"median": 0.1, "iqr": 0.3}, ...}``."""
    if not text:
        return None
    example = '{"Phase3D": {"median": 0.1, "iqr": 0.3}}'
    if len(text) > MAX_STATISTICS_CHARS:
        raise PayloadError(431, f"X-Viscy-Statistics has {len(text)} characters, over {MAX_STATISTICS_CHARS}; "
                                f"send only the channels the model reads, e.g. {example}")
    try:
        stats = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _refusal(400, f"X-Viscy-Statistics is not JSON; send e.g. {example}", exc) from None
    ok = isinstance(stats, dict) and all(
        isinstance(v, dict) and all(_finite_number(x) for x in v.values()) for v in stats.values()
    )
    if not ok:
        raise PayloadError(400, f"X-Viscy-Statistics must map channel -> {{statistic: finite number}}, e.g. {example}")
    return {ch: {k: float(x) for k, x in v.items()} for ch, v in stats.items()}
