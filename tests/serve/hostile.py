"""Small hostile request bodies (under 1 MB) built to make a decoder allocate many times the server's limit.

Shared by the decoder tests, the live fuzz campaign and ``benchmarks/bench_serve_soak.py``.
"""

from __future__ import annotations

import io
import math

import numpy as np
import tifffile
from hypothesis import strategies as st

from viscy.serve.codecs import NPY, PNG, RAW, TIFF


def encode(arr: np.ndarray, kind: str) -> bytes:
    """``arr`` in a request encoding (``kind`` without parameters); PNG takes a 2D uint8 view of it."""
    buf = io.BytesIO()
    if kind == NPY:
        np.save(buf, arr)
    elif kind == TIFF:
        tifffile.imwrite(buf, arr)
    elif kind == PNG:
        from PIL import Image

        Image.fromarray(np.clip(arr.reshape(-1, arr.shape[-1]), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    else:
        return arr.tobytes()
    return buf.getvalue()


@st.composite
def mutated(draw, body: bytes) -> bytes:
    """``body`` kept, bytes flipped, cut short, extended, replaced by random bytes, or emptied."""
    mutation = draw(st.sampled_from(["none"] * 3 + ["flip", "cut", "append", "random", "empty"]))
    if mutation == "flip" and body:
        data = bytearray(body)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if mutation == "cut":
        return body[: draw(st.integers(0, len(body)))]
    if mutation == "append":
        return body + draw(st.binary(max_size=64))
    if mutation == "random":
        return draw(st.binary(max_size=4096))
    return b"" if mutation == "empty" else body


def shared_block_tiff(shape: tuple[int, int], tile: tuple[int, int]) -> bytes:
    """A tiled, compressed TIFF of zeros whose every tile offset points at the same compressed block."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros(shape, np.float32), tile=tile, compression="zlib")
    data = bytearray(buf.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        page = tif.pages[0]
        offsets_tag = page.tags["TileOffsets"]
        first = page.dataoffsets[0]
        count = len(page.dataoffsets)
        fmt = np.dtype(tif.byteorder + ("u8" if tif.is_bigtiff else "u4"))
        pos = offsets_tag.valueoffset
    data[pos : pos + count * fmt.itemsize] = np.full(count, first, fmt).tobytes()
    return bytes(data)


def png_of(shape: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (shape[1], shape[0])).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def npy_header_only(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 64


def tile_bomb_tiff() -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((8, 8), np.float32), tile=(2048, 2048), compression="zlib")
    return buf.getvalue()


def many_page_tiff(n: int) -> bytes:
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for _ in range(n):
            tif.write(np.zeros((1, 1), np.uint8), contiguous=False)
    return buf.getvalue()


def overlapping_directories_tiff(pages: int, tags: int = 4096) -> bytes:
    """A TIFF whose page directories, of ``tags`` entries each, start 12 bytes apart and overlap."""
    size = 8 + 12 * pages + 2 + 12 * tags + 4
    data = bytearray(size)
    data[:8] = b"II*\0" + (8).to_bytes(4, "little")
    for k in range(pages):
        start = 8 + 12 * k
        data[start : start + 2] = tags.to_bytes(2, "little")
        nxt = start + 2 + 12 * tags
        data[nxt : nxt + 4] = ((start + 12) if k + 1 < pages else 0).to_bytes(4, "little")
    return bytes(data)


def jpeg_tiff(shape: tuple[int, int]) -> bytes:
    """A TIFF of JPEG-compressed tiles: a codec that carries its own image size."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros(shape, np.uint8), tile=(64, 64), compression="jpeg")
    return buf.getvalue()


def bombs(limit: int) -> dict[str, tuple]:
    """Small requests (under 1 MB) that decode, or claim to decode, to several times ``limit`` values."""
    edge = 64 * math.ceil(math.sqrt(4 * limit) / 64)  # an image of about 4x the limit
    return {
        # tiles all pointing at one zlib block: a few KB that would decode to 4x the limit
        "TIFF, one shared compressed block": (lambda: shared_block_tiff((edge, edge), (64, 64)), TIFF, None, None),
        # an 8 x 8 image whose single tile is 2048 x 2048: decoding the tile allocates 65,536x the image
        "TIFF, a tile far larger than the image": (lambda: tile_bomb_tiff(), TIFF, None, None),
        "TIFF, 4100 pages": (lambda: many_page_tiff(4100), TIFF, None, None),
        "PNG over the limit": (lambda: png_of((edge, edge)), PNG, None, None),
        "PNG over Pillow's own bomb limit": (lambda: png_of((2 * edge, edge)), PNG, None, None),
        "TIFF, 200 overlapping directories of 4096 tags": (lambda: overlapping_directories_tiff(200), TIFF, None,
                                                           None),
        ".npy header of 10^12 values": (lambda: npy_header_only((10**6, 10**6)), NPY, None, None),
        "raw shape whose product overflows int64": (lambda: b"\0" * 16, RAW, "float32", "4294967296,4294967296,16"),
        "raw shape of six dimensions": (lambda: b"\0" * 16, RAW, "float32", "1,1,1,1,2,2"),
    }
