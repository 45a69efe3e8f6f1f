"""Bounded decoding, without Ray: every decoder refuses from the header, before it allocates the pixels.

Property: whatever the body and headers, ``decode_image`` returns an array within the limit or raises a
4xx ``PayloadError``, and its peak allocation stays within a small multiple of the largest image it accepts.
"""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import LEAKS
from tests.serve.hostile import bombs, encode, jpeg_tiff, mutated, overlapping_directories_tiff, png_of
from viscy.serve.codecs import INPUT_TYPES, NPY, PNG, RAW, TIFF, PayloadError, decode_image, parse_statistics

LIMIT = 1 << 16  # values: 256 KiB of float32, so a bomb of a few MiB is many times the limit
DTYPES = ["uint8", "uint16", "float32", "float64", "int64", "complex64", "bool", "object", "pixels", ""]


def _peak_bytes(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        out = fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return out, peak


def _decode_or_refusal(*args, **kwargs) -> np.ndarray | PayloadError:
    try:
        return decode_image(*args, **kwargs)
    except PayloadError as exc:
        return exc


def _check(result: np.ndarray | PayloadError, peak: int, body: bytes) -> None:
    if isinstance(result, PayloadError):
        assert 400 <= result.status < 500, result
        assert not LEAKS.search(str(result)), str(result)
    else:
        assert 2 <= result.ndim <= 4 and 0 < result.size <= LIMIT
    # the body, one decoded copy as float64 and the parser's own buffers (a few times the largest image)
    assert peak <= len(body) + 8 * LIMIT * 4 + (2 << 20), f"peak {peak} bytes"


@st.composite
def payloads(draw) -> tuple[bytes, str, str | None, str | None]:
    """A valid small image in one encoding, then maybe corrupted: bytes flipped, cut, or headers lying."""
    kind = draw(st.sampled_from(INPUT_TYPES + ("text/plain", "image/tiff; charset=x")))
    ndim = 2 if kind == PNG else draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 24), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(["uint8", "uint16", "float32", "float64", "int16"]))
    arr = np.random.default_rng(draw(st.integers(0, 2**16))).normal(size=shape).astype(dtype)
    body = encode(arr, kind.split(";")[0])
    body = draw(mutated(body))
    x_dtype = draw(st.sampled_from([dtype, *DTYPES]))
    x_shape = draw(st.one_of(
        st.just(",".join(map(str, shape))),
        st.lists(st.integers(-2, 2**63), max_size=9).map(lambda v: ",".join(map(str, v))),
        st.text(max_size=30),
    ))
    return body, kind, x_dtype, x_shape


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(payload=payloads())
def test_any_payload_decodes_within_the_limit_or_gets_a_4xx(payload) -> None:
    body, kind, x_dtype, x_shape = payload
    result, peak = _peak_bytes(lambda: _decode_or_refusal(body, kind, x_dtype, x_shape, max_values=LIMIT))
    _check(result, peak, body)


BOMBS = bombs(LIMIT)


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_are_refused_from_the_header_with_413_or_422(name: str) -> None:
    make, kind, x_dtype, x_shape = BOMBS[name]
    body = make()
    assert len(body) < 1 << 20, f"{name}: {len(body)} bytes is not a small request"
    result, peak = _peak_bytes(lambda: _decode_or_refusal(body, kind, x_dtype, x_shape, max_values=LIMIT))
    assert isinstance(result, PayloadError), f"{name} was decoded to {getattr(result, 'shape', result)}"
    assert result.status in (413, 422), f"{name}: {result.status} {result}"
    assert peak < len(body) + (2 << 20), f"{name}: peak {peak} bytes before refusing"
    assert any(w in str(result) for w in (str(LIMIT), "dimension", "pages", "tiles", "tags")), str(result)


def test_images_at_the_limit_still_decode() -> None:
    arr = np.arange(LIMIT, dtype=np.float32).reshape(256, 256)
    for kind in (RAW, NPY, TIFF):
        out = decode_image(encode(arr, kind), kind, "float32", "256,256", max_values=LIMIT)
        np.testing.assert_array_equal(out, arr)
    tiled = io.BytesIO()
    tifffile.imwrite(tiled, arr, tile=(64, 64), compression="zlib")
    np.testing.assert_array_equal(decode_image(tiled.getvalue(), TIFF, max_values=LIMIT), arr)
    fortran = io.BytesIO()
    np.save(fortran, np.asfortranarray(arr[:, :100]))
    np.testing.assert_array_equal(decode_image(fortran.getvalue(), NPY, max_values=LIMIT), arr[:, :100])
    assert decode_image(png_of((256, 256)), PNG, max_values=LIMIT).shape == (256, 256)


@given(text=st.one_of(st.text(max_size=200), st.recursive(
    st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=5), st.booleans(), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
).map(lambda v: __import__("json").dumps(v))))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_statistics_header_parses_or_gets_a_400(text: str) -> None:
    try:
        stats = parse_statistics(text)
    except PayloadError as exc:
        assert exc.status in (400, 431)
        return
    assert stats is None or all(np.isfinite(v) for ch in stats.values() for v in ch.values())


def test_deeply_nested_or_huge_statistics_are_a_4xx() -> None:
    with pytest.raises(PayloadError) as nested:
        parse_statistics("[" * 10_000)
    assert nested.value.status == 400
    with pytest.raises(PayloadError) as huge:
        parse_statistics('{"Phase3D": {"median": ' + "1" * 20_000 + "}}")
    assert huge.value.status == 431
    with pytest.raises(PayloadError):
        parse_statistics('{"Phase3D": {"median": ' + "9" * 4000 + "}}")


def test_tiff_codecs_that_carry_their_own_image_size_are_refused() -> None:
    """JPEG, JPEG 2000, WebP, LERC ... tiles allocate the size in their own stream, whatever the TIFF says."""
    with pytest.raises(PayloadError) as exc:
        decode_image(jpeg_tiff((128, 128)), TIFF, max_values=LIMIT)
    assert exc.value.status == 415 and "LZW, deflate, zstd or PackBits" in str(exc.value)
    for codec in ("zlib", "zstd", "lzw", "packbits"):
        buf = io.BytesIO()
        arr = np.arange(128 * 128, dtype=np.uint16).reshape(128, 128)
        tifffile.imwrite(buf, arr, tile=(64, 64), compression=codec)
        np.testing.assert_array_equal(decode_image(buf.getvalue(), TIFF, max_values=LIMIT), arr)


def test_a_long_chain_of_directories_is_refused_before_tifffile_parses_it() -> None:
    import time

    body = overlapping_directories_tiff(200)
    t0 = time.perf_counter()
    with pytest.raises(PayloadError) as exc:
        decode_image(body, TIFF, max_values=LIMIT)
    assert exc.value.status == 413 and time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("shape", ["(-2, -2)", "(True, 4)", "(4, 0)"])
def test_npy_headers_with_impossible_shapes_are_a_400(shape: str) -> None:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }"
    header += " " * (63 - len(header) % 64) + "\n"
    body = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 64
    with pytest.raises(PayloadError) as exc:
        decode_image(body, NPY, max_values=LIMIT)
    assert exc.value.status == 400


@pytest.mark.parametrize("x_shape", [",", "x", " , ,", "²,3"])
def test_x_shapes_without_sizes_are_a_400(x_shape: str) -> None:
    with pytest.raises(PayloadError) as exc:
        decode_image(b"\0" * 16, RAW, "float32", x_shape, max_values=LIMIT)
    assert exc.value.status == 400
