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
from collections.abc import Mapping

import numpy as np

RAW = "application/octet-stream"
NPY = "application/x-npy"
NPZ = "application/x-npz"
TIFF = "image/tiff"
PNG = "image/png"
JSON = "application/json"
INPUT_TYPES = (RAW, NPY, TIFF, PNG)
ARRAY_ANSWERS = (NPY, RAW, TIFF)
INPUT_DTYPES = ("uint8", "uint16", "int8", "int16", "int32", "float16", "float32", "float64")
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
    if dtype.name not in INPUT_DTYPES:
        raise PayloadError(
            415, f"unsupported dtype {dtype.name!r}; send one of {', '.join(INPUT_DTYPES)}"
        )


def parse_shape(text: str | None) -> tuple[int, ...]:
    """``"1,256,256"`` (or ``"1x256x256"``) as a tuple of positive ints."""
    if not text:
        raise PayloadError(400, "raw application/octet-stream bodies need X-Dtype and X-Shape headers, "
                                "e.g. X-Dtype: float32 and X-Shape: 512,512")
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise PayloadError(400, f"X-Shape {text!r} is not a comma-separated list of sizes, e.g. 512,512") from None
    if not shape or min(shape) < 1:
        raise PayloadError(400, f"X-Shape {text!r} must list positive sizes, e.g. 512,512")
    return shape


def decode_image(
    body: bytes, content_type: str | None, dtype: str | None = None, shape: str | None = None
) -> np.ndarray:
    """Decode a request body into an array (not yet checked against a model).

    Raises
    ------
    PayloadError
        400 for an empty or corrupt body or a size mismatch, 415 for an unknown content type or dtype.
    """
    kind = media_type(content_type)
    if kind not in INPUT_TYPES:
        raise PayloadError(
            415, f"unsupported Content-Type {content_type!r}; send one of {', '.join(INPUT_TYPES)}"
        )
    if not body:
        raise PayloadError(400, "empty request body; send an image (see GET /docs for the encodings)")
    if kind == RAW:
        try:
            dt = np.dtype(dtype or "")
        except TypeError:
            raise PayloadError(415, f"X-Dtype {dtype!r} is not a numpy dtype; use e.g. float32 or uint16") from None
        _check_dtype(dt)
        dims = parse_shape(shape)
        expected = int(np.prod(dims)) * dt.itemsize
        if len(body) != expected:
            raise PayloadError(
                400, f"body has {len(body)} bytes but X-Shape {dims} of {dt.name} needs {expected}; check X-Shape"
            )
        return np.frombuffer(body, dtype=dt).reshape(dims)
    if kind == NPY:
        if body.startswith(b"PK"):
            raise PayloadError(400, "the body is an .npz archive; send a single array as .npy")
        if not body.startswith(b"\x93NUMPY"):
            raise PayloadError(400, "corrupt .npy payload (no NPY header); send the bytes np.save writes")
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except ValueError as exc:
            if "pickle" in str(exc).lower():
                raise PayloadError(400, "the .npy holds pickled Python objects, which are never loaded; "
                                        "send a numeric array (np.save of a float or integer array)") from None
            raise PayloadError(400, f"corrupt .npy payload ({exc}); send the bytes np.save writes") from None
        except Exception as exc:  # noqa: BLE001 - any parser failure is the client's corrupt payload
            raise PayloadError(400, f"corrupt .npy payload ({type(exc).__name__}: {exc})") from None
    elif kind == TIFF:
        import tifffile

        try:
            arr = tifffile.imread(io.BytesIO(body))
        except Exception as exc:  # noqa: BLE001
            raise PayloadError(400, f"corrupt TIFF payload ({type(exc).__name__}: {exc})") from None
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(body)) as img:
                img = img.convert("I;16") if img.mode in ("I;16", "I;16B", "I") else img.convert("L")
                arr = np.asarray(img)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise PayloadError(400, f"corrupt PNG payload ({exc})") from None
    if arr.size == 0:
        raise PayloadError(400, f"the {kind} payload holds no pixels (shape {arr.shape}); send a whole image")
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


def parse_statistics(text: str | None) -> dict[str, dict[str, float]] | None:
    """The ``X-Viscy-Statistics`` header: ``{"Phase3D": {"median": 0.1, "iqr": 0.3}, ...}``."""
    if not text:
        return None
    try:
        stats = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PayloadError(400, f"X-Viscy-Statistics is not JSON ({exc}); send e.g. "
                                '{"Phase3D": {"median": 0.1, "iqr": 0.3}}') from None
    ok = isinstance(stats, dict) and all(
        isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()) for v in stats.values()
    )
    if not ok:
        raise PayloadError(400, 'X-Viscy-Statistics must map channel -> {statistic: number}, e.g. '
                                '{"Phase3D": {"median": 0.1, "iqr": 0.3}}')
    return {ch: {k: float(x) for k, x in v.items()} for ch, v in stats.items()}
