"""A Python client of ``viscy serve`` and the ``viscy infer`` command.

::

    from viscy.serve import ServeClient

    client = ServeClient("http://127.0.0.1:8000")          # token=... when the server wants one
    client.models()                                          # names, channels, depths, normalisation
    stained = client.stain(phase)                            # (Y, X) -> (C', Y, X) float32
    stained.array, stained.channels, stained.timing_ms
    masks = client.segment(stained.array[0])                 # int32 labels
    both = client.stain_and_segment(phase, method="classical")
    both.stain, both.masks

Arrays travel as raw bytes with ``X-Dtype``/``X-Shape`` headers (the fast path); errors raise
:class:`ServeError` with the server's explanation.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from viscy.errors import DataError, ViscyError
from viscy.serve.codecs import NPZ, RAW, SUFFIX_TYPES, decode_image, decode_npz


class ServeError(ViscyError):
    """The server refused a request (``status`` is the HTTP code; the message is the server's ``detail``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class StainResult:
    """A staining answer: the array, its channel names, and what the server reported."""

    array: np.ndarray
    channels: list[str]
    model: str
    normalization: str
    timing_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StainSegmentResult:
    """A stain-and-segment answer."""

    stain: np.ndarray
    masks: np.ndarray
    channels: list[str]
    segmented: str
    timing_ms: dict[str, float] = field(default_factory=dict)


def parse_server_timing(header: str | None) -> dict[str, float]:
    """A ``Server-Timing`` header (``decode;dur=1.2, stain;dur=95.0``) as milliseconds by name."""
    out = {}
    for part in (header or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur)
    return out


class ServeClient:
    """Talks to a running ``viscy serve``.

    Parameters
    ----------
    url
        Base URL, e.g. ``http://127.0.0.1:8000`` (with the route prefix if the app has one).
    token
        Bearer token; default: the ``VISCY_SERVE_TOKEN`` environment variable, if set.
    timeout
        Seconds per request.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 300.0) -> None:
        import requests

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        token = token if token is not None else os.environ.get("VISCY_SERVE_TOKEN")
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _request(self, method: str, path: str, **kwargs: Any):
        import requests

        try:
            r = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.ConnectionError:
            raise ServeError(0, f"no server answers at {self.url}; start one with `viscy serve --models PATH`") \
                from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text[:500]
            raise ServeError(r.status_code, str(detail))
        return r

    def health(self) -> dict[str, Any]:
        """The ``/healthz`` answer (raises unless every model is loaded)."""
        return self._request("GET", "/healthz").json()

    def models(self) -> list[dict[str, Any]]:
        """Served models: name, channels, depths, YX multiple and normalisation."""
        return self._request("GET", "/v1/models").json()["models"]

    @staticmethod
    def _raw(image: np.ndarray) -> tuple[bytes, dict[str, str]]:
        image = np.ascontiguousarray(image)
        headers = {"Content-Type": RAW, "Accept": RAW, "X-Dtype": image.dtype.name,
                   "X-Shape": ",".join(map(str, image.shape))}
        return image.tobytes(), headers

    @staticmethod
    def _array(r) -> np.ndarray:
        return decode_image(r.content, r.headers.get("content-type"), r.headers.get("x-dtype"),
                            r.headers.get("x-shape"), max_values=sys.maxsize).copy()

    @staticmethod
    def _params(**kwargs: Any) -> dict[str, Any]:
        return {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in kwargs.items() if v is not None}

    def stain(self, image: np.ndarray, model: str | None = None, statistics: dict[str, dict[str, float]] | None = None,
              normalize: bool = True, denormalize: bool = False) -> StainResult:
        """Predict the model's channels for ``(Y, X)``, ``(Z, Y, X)`` or ``(C, Z, Y, X)``.

        ``statistics`` (e.g. a plate FOV's stored ``fov_statistics``) normalise as ``viscy predict`` does;
        without them the server uses the image's own statistics.
        """
        body, headers = self._raw(image)
        if statistics is not None:
            headers["X-Viscy-Statistics"] = json.dumps(statistics)
        r = self._request("POST", "/v1/stain", data=body, headers=headers,
                          params=self._params(model=model, normalize=normalize, denormalize=denormalize))
        return StainResult(self._array(r), r.headers["x-viscy-channels"].split(","), r.headers["x-viscy-model"],
                           r.headers["x-viscy-normalization"], parse_server_timing(r.headers.get("server-timing")))

    def segment(self, image: np.ndarray, method: str | None = None, diameter: float | None = None,
                channel: int | None = None) -> np.ndarray:
        """Instance labels (int32) of ``(Y, X)``/``(Z, Y, X)`` (or one ``channel`` of ``(C, Z, Y, X)``)."""
        body, headers = self._raw(image)
        r = self._request("POST", "/v1/segment", data=body, headers=headers,
                          params=self._params(method=method, diameter=diameter, channel=channel))
        return self._array(r)

    def stain_and_segment(self, image: np.ndarray, model: str | None = None, method: str | None = None,
                          segment_channel: str | None = None, diameter: float | None = None,
                          statistics: dict[str, dict[str, float]] | None = None, normalize: bool = True,
                          denormalize: bool = False) -> StainSegmentResult:
        """Stain, then segment one predicted channel (default: the first), in one request.

        With the FOV's stored statistics (sources, and targets for ``denormalize``) and the same method and
        diameter, the masks equal those ``viscy predict --segment`` writes for that FOV (``--denormalize`` alike).
        """
        body, headers = self._raw(image)
        headers["Accept"] = NPZ
        if statistics is not None:
            headers["X-Viscy-Statistics"] = json.dumps(statistics)
        r = self._request("POST", "/v1/stain-and-segment", data=body, headers=headers,
                          params=self._params(model=model, method=method, segment_channel=segment_channel,
                                              diameter=diameter, normalize=normalize, denormalize=denormalize))
        arrays = decode_npz(r.content)
        return StainSegmentResult(arrays["stain"], arrays["masks"], [str(c) for c in arrays["channels"]],
                                  r.headers["x-viscy-segmented"], parse_server_timing(r.headers.get("server-timing")))


# ------------------------------------------------------------------------------------------ infer
def read_image(path: Path) -> np.ndarray:
    """An image file as an array: .tif/.tiff (tifffile), .npy (no pickles) or .png (Pillow)."""
    kind = SUFFIX_TYPES.get(path.suffix.lower())
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    if kind not in ("image/tiff", "application/x-npy", "image/png"):
        raise DataError(f"cannot read {path.name}: use a .tif, .tiff, .npy or .png image")
    return decode_image(path.read_bytes(), kind, max_values=sys.maxsize)  # the server applies its own limit


# Errors of os.link on filesystems without hard links (exFAT, FAT, some SMB and FUSE mounts).
NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
# O_EXCL and O_NOFOLLOW: a file or link already at the path fails the open; nothing is written through it.
NEW_FILE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def partial_path(path: Path) -> Path:
    """Where :func:`write_output` writes the answer before publishing it at ``path``."""
    return path.with_name(path.name + ".viscy-partial")


def check_new_output(path: Path) -> None:
    """Refuse an output that exists (a dangling link included) or whose partial file is in the way.

    Raises
    ------
    DataError
        Naming the path and the fix.
    """
    if os.path.lexists(path):
        raise DataError(f"output {path} exists and is never replaced; choose a new name with --output")
    partial = partial_path(path)
    if partial.is_symlink():
        raise DataError(
            f"{partial} is a symbolic link; viscy infer never writes through a link. Remove the link (its target is "
            "untouched) and rerun"
        )
    if os.path.lexists(partial):
        raise DataError(
            f"{partial} exists: left by a viscy infer that was interrupted, or one writing {path.name} now. Remove it "
            "once no viscy infer writes there, and rerun"
        )


def write_output(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the answer to a new file (an existing file is never replaced): .tif, .npy or .npz.

    The answer is written to ``<path>.viscy-partial``, created exclusively and never through a link, and
    published as ``path`` with a hard link, which fails rather than replace a file that appeared meanwhile.
    Where the filesystem has no hard links, ``path`` itself is created exclusively and the bytes are copied
    into it (a run killed during that copy can leave a short ``path``; it is removed on any error).

    Raises
    ------
    DataError
        If the suffix does not fit the arrays, ``path`` or its partial file exists, or either is a link.
    """
    import tifffile

    suffix = path.suffix.lower()
    if suffix not in (".tif", ".tiff", ".npy", ".npz"):
        raise DataError(f"output {path} must end in .tif, .tiff, .npy or .npz")
    if len(arrays) > 1 and suffix == ".npy":
        raise DataError(f"stains and masks need .npz or .tif, not {path.name}")
    check_new_output(path)
    partial = partial_path(path)
    try:
        # read back by the copy fallback; opened by name so that tifffile knows the file's name
        f = open(partial, "w+b", opener=lambda name, _: os.open(name, os.O_RDWR | NEW_FILE_FLAGS, 0o666))
    except OSError as exc:  # e.g. another writer, or a link, appeared since the check
        check_new_output(path)
        raise DataError(f"cannot create {partial}: {exc.strerror}") from exc
    with f:
        try:
            if suffix == ".npz":
                np.savez(f, **arrays)
            elif suffix == ".npy":
                np.save(f, next(iter(arrays.values())), allow_pickle=False)
            else:
                with tifffile.TiffWriter(f) as tif:
                    for name, arr in arrays.items():
                        tif.write(arr, description=name, photometric="minisblack", metadata=None)
            f.flush()
            _publish(partial, f, path)
        finally:
            _unlink_if_same(partial, os.fstat(f.fileno()))


def _publish(partial: Path, written: BinaryIO, path: Path) -> None:
    """Make the complete ``partial`` (open as ``written``) appear at ``path``, never replacing anything there."""
    try:
        os.link(partial, path, follow_symlinks=False)
        return
    except FileExistsError as exc:
        raise DataError(f"output {path} appeared while the answer was written; it is never replaced") from exc
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
    try:
        fd = os.open(path, os.O_WRONLY | NEW_FILE_FLAGS, 0o666)
    except FileExistsError as exc:
        raise DataError(f"output {path} appeared while the answer was written; it is never replaced") from exc
    with os.fdopen(fd, "wb") as out:
        try:
            written.seek(0)
            shutil.copyfileobj(written, out)
        except BaseException:
            _unlink_if_same(path, os.fstat(out.fileno()))
            raise


def _unlink_if_same(path: Path, ours: os.stat_result) -> None:
    """Remove ``path`` only if it is still the file viscy created (not something swapped in since)."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
        path.unlink()


def run_infer(config: Any) -> Path:
    """``viscy infer``: read an image, send it to the server, write the answer to a new file."""
    image_path = Path(config.image)
    default_suffix = ".npz" if config.segment and image_path.suffix.lower() == ".npy" else image_path.suffix
    if default_suffix.lower() == ".png":
        default_suffix = ".tif"
    output = Path(config.output) if config.output else image_path.with_name(f"{image_path.stem}_viscy{default_suffix}")
    check_new_output(output)
    image = read_image(image_path)
    client = ServeClient(config.url, token=os.environ.get(config.token_env) or None, timeout=config.timeout_s)
    if config.segment_only:
        masks = client.segment(image, method=config.method)
        write_output(output, {"masks": masks})
        print(f"viscy infer: {image_path.name} {image.shape} -> {int(masks.max())} objects -> {output}")
    elif config.segment:
        res = client.stain_and_segment(image, model=config.model, method=config.method,
                                       segment_channel=config.segment_channel)
        write_output(output, {"stain": res.stain, "masks": res.masks})
        print(f"viscy infer: {image_path.name} {image.shape} -> {', '.join(res.channels)} "
              f"{res.stain.shape} + {int(res.masks.max())} {res.segmented} objects -> {output} "
              f"({sum(res.timing_ms.values()):.0f} ms on the server)")
    else:
        res = client.stain(image, model=config.model)
        write_output(output, {"stain": res.array})
        print(f"viscy infer: {image_path.name} {image.shape} -> {', '.join(res.channels)} {res.array.shape} "
              f"with {res.model} -> {output} ({sum(res.timing_ms.values()):.0f} ms on the server)")
    return output
