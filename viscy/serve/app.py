"""The Ray Serve application: ``Ingress`` (FastAPI) composing ``VirtualStainer`` and ``Segmenter``.

* ``VirtualStainer`` holds one onnxruntime session per served model (CUDA when usable). Large images go
  through the shared tiling engine (:mod:`viscy.predict.tiling`: padding to the YX multiple, Gaussian
  blending, Z windows); every tile passes through one ``@serve.batch`` queue, so same-shaped tiles of
  concurrent requests run as one batch.
* ``Segmenter`` runs the segmenters of ``viscy evaluate`` and ``viscy predict`` (classical; Cellpose when
  configured), applied to a stack as predict's segmentation stage does (:func:`viscy.segment.label_stack`).
* ``Ingress`` decodes and validates payloads, normalises with the model's metadata, composes the two
  through deployment handles and encodes the answer. Bad input gets a 4xx JSON answer naming the problem.

``build_app`` is the application builder that ``serve run``/``serve deploy`` and ``viscy serve`` use::

    applications:
      - name: viscy
        import_path: viscy.serve.app:build_app
        args: {models: [/models], stainer: {num_gpus: 1}}
"""

import asyncio
import logging
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from viscy.config import ConfigError, format_validation_error
from viscy.serve.codecs import (
    ARRAY_ANSWERS,
    JSON,
    NPZ,
    RAW,
    PayloadError,
    decode_image,
    encode_array,
    encode_npz,
    media_type,
    negotiate,
    parse_statistics,
)
from viscy.serve.config import ServeConfig, StainerSettings
from viscy.serve.gate import Gate, current_gate, gatekeeper, install_gate
from viscy.serve.models import MIN_YX, ServedModel, find_models
from viscy.serve.preview import preview

# Ray Serve writes this logger to the replica's own log file (logs/serve/replica_<app>_<deployment>_<id>.log).
log = logging.getLogger("ray.serve")
API_VERSION = "v1"

BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "An image (Y, X), stack (Z, Y, X) or (C, Z, Y, X). Raw bytes need X-Dtype and X-Shape.",
        "content": {
            RAW: {"schema": {"type": "string", "format": "binary"}},
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
            "image/tiff": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

QUERY_PARAMETERS = {
    "model": "Model name (GET /v1/models); default: the only one served.",
    "normalize": "true (default): normalise as training did; false: the image is sent normalised.",
    "denormalize": "true: answer in the targets' raw units (needs their statistics in X-Viscy-Statistics).",
    "method": "Segmentation method: classical or cellpose (when served); default: the server's.",
    "diameter": "Object diameter in pixels, within the server's [min_diameter, max_diameter] (4-400 by default).",
    "channel": "Channel index of a (C, Z, Y, X) image to segment (default 0).",
    "segment_channel": "Predicted channel to segment (default: the model's first target).",
}
# Cellpose resizes a plane so that objects of the requested diameter become this many pixels across.
CELLPOSE_DIAMETER = 30.0


def query_doc(*names: str) -> dict[str, Any]:
    """OpenAPI entries of the query parameters a route reads itself (after the auth check)."""
    return {"parameters": [{"name": n, "in": "query", "required": False, "description": QUERY_PARAMETERS[n],
                            "schema": {"type": "string"}} for n in names]}


api = FastAPI(
    title="viscy serve",
    redirect_slashes=False,  # a redirect would echo the client's Host header back as a Location
    version=API_VERSION,
    description=(
        "Virtual staining (ONNX models exported by `viscy export`) and instance segmentation over HTTP.\n\n"
        "Send images as raw bytes (`application/octet-stream` with `X-Dtype` and `X-Shape`), `.npy` "
        "(`application/x-npy`), TIFF (`image/tiff`) or PNG. Answers follow `Accept` (default: the request's "
        "encoding); `/v1/stain-and-segment` answers `.npz` (`stain`, `masks`, `channels`). Errors are JSON "
        "`{\"detail\": ...}` naming the problem. With a token configured, send `Authorization: Bearer TOKEN`."
    ),
)
# Host check, auth and the mapping of every error to JSON, before any route (viscy.serve.gate).
api.middleware("http")(gatekeeper)


# ---------------------------------------------------------------------------------------- stainer
@serve.deployment(name="VirtualStainer")
class VirtualStainer:
    """onnxruntime sessions of every served model; tiles of concurrent requests are batched together."""

    def __init__(self, model_paths: dict[str, str], settings: dict[str, Any]) -> None:
        from viscy.predict.backends import load_backend
        from viscy.predict.tiling import TilingOptions

        self.settings = StainerSettings(**settings)
        self.models = {name: ServedModel.load(Path(p)) for name, p in model_paths.items()}
        threads = max(1, math.floor(self.settings.num_cpus + 0.5))
        self.backends = {  # ONNX sessions; a bioimage.io package cuts its own blocks of tile_yx
            name: load_backend(m.card, onnx=m.path, device=self.settings.device, threads=threads,
                               block_yx=self.settings.tile_yx)
            for name, m in self.models.items()
        }
        s = self.settings
        self.options = {
            name: TilingOptions.for_model(
                m.card.spec, None if m.package else s.tile_yx, overlap=s.tile_overlap, blend=s.blend,
                batch_size=s.max_batch_size,
            )
            for name, m in self.models.items()
        }
        self._run_tiles.set_max_batch_size(s.max_batch_size)
        self._run_tiles.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        # Own pools: each request's tiling thread blocks on its tiles while the model thread runs the batches.
        # Sharing asyncio's default pool (cpu + 4 threads) deadlocks once that many requests wait for tiles.
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="viscy-onnx")
        self.tiling_pool = ThreadPoolExecutor(s.max_ongoing_requests, thread_name_prefix="viscy-tiling")

    def info(self) -> dict[str, Any]:
        """Providers per model and the sizes of recent batches (for health checks and benchmarks)."""
        sizes = list(self.batch_sizes)
        return {
            "providers": {n: b.session.get_providers()[0] if hasattr(b, "session") else "bioimageio.core"
                          for n, b in self.backends.items()},
            "batches": len(sizes),
            "mean_batch_size": float(np.mean(sizes)) if sizes else 0.0,
            "pid": os.getpid(),
        }

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run_tiles(self, items: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for i, (name, tile) in enumerate(items):
            groups.setdefault((name, tile.shape), []).append(i)
        out: list[Any] = [None] * len(items)
        for (name, _), idx in groups.items():
            batch = np.stack([items[i][1] for i in idx])
            self.batch_sizes.append(len(idx))
            pred = await asyncio.get_running_loop().run_in_executor(self.model_pool, self.backends[name], batch)
            for j, i in enumerate(idx):
                out[i] = pred[j]
        return out

    async def predict(self, name: str, image: np.ndarray) -> np.ndarray:
        """Predict a normalised ``(C, Z, Y, X)`` image; returns ``(C', Z, Y, X)`` float32.

        A cancelled request (the client left, or the proxy's timeout) stops before its next batch of tiles.
        """
        from viscy.predict.tiling import predict_plane_stack

        loop = asyncio.get_running_loop()
        cancelled = threading.Event()

        def predict_fn(batch: np.ndarray) -> np.ndarray:
            if cancelled.is_set():
                raise asyncio.CancelledError
            futures = [asyncio.run_coroutine_threadsafe(self._run_tiles((name, tile)), loop) for tile in batch]
            return np.stack([f.result() for f in futures])

        try:
            return await loop.run_in_executor(
                self.tiling_pool, predict_plane_stack, image, predict_fn, self.options[name]
            )
        except asyncio.CancelledError:
            cancelled.set()
            raise


# -------------------------------------------------------------------------------------- segmenter
@serve.deployment(name="Segmenter")
class Segmenter:
    """The segmenters of ``viscy evaluate``: classical always, Cellpose when a model is configured."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from viscy.segment.segmenters import cached_cellpose
        from viscy.serve.config import SegmenterSettings

        self.settings = SegmenterSettings(**settings)
        self.methods = ["classical"]
        if self.settings.model:
            cached_cellpose(self.settings.model, self.settings.gpu)  # loaded before the replica is healthy
            self.methods.append("cellpose")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="viscy-segment")

    def available(self) -> list[str]:
        """The methods this replica serves."""
        return list(self.methods)

    async def segment(self, stack: np.ndarray, method: str | None, diameter: float | None) -> np.ndarray:
        """Label every slice of a ``(Z, Y, X)`` float image as ``viscy predict`` (``dims: 2d``) does: ids unique in
        the stack; returns int32 ``(Z, Y, X)``.

        Planes run one at a time on the replica's segmentation thread; a cancelled request stops between
        planes (a plane already running finishes: neither Cellpose nor scikit-image can be interrupted).
        """
        from viscy.segment.segmenters import get_segmenter, label_stack

        segment = get_segmenter(self.settings.for_request(method, diameter))
        cancelled = threading.Event()

        def plane(image: np.ndarray) -> np.ndarray:
            if cancelled.is_set():
                raise asyncio.CancelledError
            return segment(image)

        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, label_stack, stack, plane, "2d")
        except asyncio.CancelledError:
            cancelled.set()
            raise


# ---------------------------------------------------------------------------------------- ingress
def _timing(parts: dict[str, float]) -> str:
    return ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in parts.items())


def _bool(value: str | None, name: str, default: bool) -> bool:
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise PayloadError(400, f"query parameter {name}={value[:40]!r} must be true or false")


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP front: auth, size limits, decoding, validation, normalisation and composition."""

    def __init__(self, stainer: DeploymentHandle, segmenter: DeploymentHandle, config: dict[str, Any]) -> None:
        from viscy.predict.tiling import TilingOptions

        self.config = ServeConfig(**config)
        self.stainer = stainer
        self.segmenter = segmenter
        self.models = find_models(self.config.models)
        self.max_bytes = int(self.config.max_request_mb * 1024 * 1024)
        # Decoding, normalising and encoding run here, one thread per request the replica works on: a thread
        # cannot be stopped, so a cancelled request keeps its thread until its (bounded) work ends, and the
        # next requests wait for a free one instead of piling up more threads and memory.
        self.cpu_pool = ThreadPoolExecutor(self.config.ingress.max_ongoing_requests, thread_name_prefix="viscy-cpu")
        s = self.config.stainer
        self.tiling = {
            name: TilingOptions.for_model(
                m.card.spec, None if m.package else s.tile_yx, overlap=s.tile_overlap, blend=s.blend
            )
            for name, m in self.models.items()
        }
        install_gate(Gate.for_config(self.config))

    # ------------------------------------------------------------------------------ plumbing
    @staticmethod
    def _query(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
        """The query parameters, refusing any this route does not take (a typo must not pass silently)."""
        q = request.query_params
        unknown = sorted(k for k in q if k not in allowed)
        if unknown:
            raise PayloadError(400, f"unknown query parameter(s) {', '.join(k[:40] for k in unknown[:5])}; "
                                    f"this route takes {', '.join(allowed)}")
        return {k: q[k] for k in allowed if k in q}

    async def _cpu(self, fn, *args):
        """``fn(*args)`` on the replica's CPU threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isascii() and length.isdecimal() and int(length) > self.max_bytes:
            raise PayloadError(413, f"request body of {int(length)} bytes is over the limit of {self.max_bytes} "
                                    "(max_request_mb); send a smaller image or raise the limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                raise PayloadError(413, f"request body is over the limit of {self.max_bytes} bytes (max_request_mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _image(self, request: Request) -> np.ndarray:
        body = await self._body(request)
        h = request.headers
        limit = self.config.max_image_pixels

        def decode() -> np.ndarray:
            image = decode_image(body, h.get("content-type"), h.get("x-dtype"), h.get("x-shape"), limit)
            planes = math.prod(image.shape[:-2])
            if planes > self.config.max_planes:
                raise PayloadError(413, f"the image has {planes} planes (shape {image.shape}), over max_planes "
                                        f"({self.config.max_planes}); send fewer Z slices per request")
            if min(image.shape[-2:]) < MIN_YX:
                raise PayloadError(422, f"image YX {image.shape[-2:]} is too small; send at least {MIN_YX} x {MIN_YX}")
            if image.dtype.kind == "f" and not np.isfinite(image).all():
                raise PayloadError(422, "the image holds NaN or infinite values; replace them before sending")
            return image

        return await self._cpu(decode)

    def _model(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise PayloadError(400, f"name a model with ?model=NAME; served: {', '.join(self.models)}")
        if name not in self.models:
            raise PayloadError(404, f"unknown model {name[:60]!r}; served: {', '.join(self.models)} (GET /v1/models)")
        return self.models[name]

    def _check_tiles(self, served: ServedModel, x: np.ndarray) -> None:
        from viscy.predict.tiling import count_model_calls

        served.check_padding(x.shape, self.config.max_image_pixels, self.config.stainer.tile_yx)
        tiles = count_model_calls(x.shape[1], x.shape[-2:], self.tiling[served.name])
        if tiles > self.config.max_tiles:
            raise PayloadError(413, f"the image of shape {x.shape} makes {tiles} model tiles, over max_tiles "
                                    f"({self.config.max_tiles}); send fewer slices or a smaller image")

    async def _stain(self, request: Request, q: dict[str, str]) -> tuple[ServedModel, np.ndarray, dict, dict]:
        served = self._model(q.get("model"))
        normalize = _bool(q.get("normalize"), "normalize", True)
        denorm = _bool(q.get("denormalize"), "denormalize", False)
        served.check_denormalize(denorm)
        stats = parse_statistics(request.headers.get("x-viscy-statistics"))
        t0 = time.perf_counter()
        image = await self._image(request)
        x = served.as_czyx(image)
        self._check_tiles(served, x)

        def prepare() -> tuple[np.ndarray, str]:
            if normalize or served.package:
                return served.normalize(x, stats)
            return x.astype(np.float32, copy=False), "none (sent normalised)"

        x, source = await self._cpu(prepare)
        t1 = time.perf_counter()
        pred = await self.stainer.predict.remote(served.name, x)
        t2 = time.perf_counter()
        if denorm:
            pred = served.denormalize(pred, stats)
        if image.ndim == 2:
            pred = pred[:, 0]
        timing = {"decode": t1 - t0, "stain": t2 - t1}
        headers = {
            "X-Viscy-Model": served.name,
            "X-Viscy-Channels": ",".join(served.card.target_channels),
            "X-Viscy-Normalization": source,
            "X-Viscy-Units": "raw" if denorm else "normalized",
        }
        return served, pred, timing, {"image": image, "headers": headers}

    async def _segment(self, stack: np.ndarray, method: str | None, diameter: float | None) -> np.ndarray:
        methods = await self.segmenter.available.remote()
        method = method or self.config.segmenter.method
        if method not in methods:
            hint = " (set segmenter.model in the serve config)" if method == "cellpose" else ""
            raise PayloadError(400, f"segmentation method {method[:40]!r} is not served; available: "
                                    f"{', '.join(methods)}{hint}")
        diameter = diameter or self.config.segmenter.diameter
        if method == "cellpose" and diameter is not None:
            # Cellpose resizes each plane so that objects are 30 px across: the resized stack must fit too.
            scale = CELLPOSE_DIAMETER / diameter
            resized = stack.shape[0] * math.ceil(stack.shape[1] * scale) * math.ceil(stack.shape[2] * scale)
            if resized > self.config.max_image_pixels:
                raise PayloadError(413, f"diameter={diameter:g} makes Cellpose resize the image by {scale:.2f} to "
                                        f"{resized} values, over max_image_pixels ({self.config.max_image_pixels}); "
                                        "send a larger diameter or a smaller image")
        return await self.segmenter.segment.remote(stack.astype(np.float32, copy=False), method, diameter)

    def _diameter(self, q: dict[str, str]) -> float | None:
        value = q.get("diameter")
        if value is None:
            return None
        lo, hi = self.config.segmenter.min_diameter, self.config.segmenter.max_diameter
        try:
            d = float(value[:32])
        except ValueError:
            raise PayloadError(400, f"diameter={value[:32]!r} must be a number of pixels") from None
        if not np.isfinite(d) or not lo <= d <= hi:
            raise PayloadError(422, f"diameter={value[:32]!r} is outside the served range [{lo:g}, {hi:g}] pixels")
        return d

    async def _respond(self, arr: np.ndarray, accept: str, headers: dict[str, str], timing: dict[str, float]
                       ) -> Response:
        t0 = time.perf_counter()
        body, kind, extra = await self._cpu(encode_array, arr, accept)
        timing = {**timing, "encode": time.perf_counter() - t0}
        return Response(body, media_type=kind, headers={**headers, **extra, "Server-Timing": _timing(timing)})

    # ------------------------------------------------------------------------------ endpoints
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The page: drop an image, see the stains and masks."""
        return HTMLResponse(resources.files("viscy.serve").joinpath("page.html").read_text())

    @api.get("/healthz")
    async def healthz(self, request: Request) -> Response:
        """200 when every model and segmenter is loaded, else 503; details only with the token (if one is set)."""
        try:
            info = await asyncio.wait_for(self.stainer.info.remote(), timeout=10)
            methods = await asyncio.wait_for(self.segmenter.available.remote(), timeout=10)
        except Exception:  # noqa: BLE001
            log.warning("healthz: a deployment did not answer", exc_info=True)
            return JSONResponse({"status": "not ready"}, status_code=503)
        gate = current_gate()
        if gate is None or not gate.authorized(request):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "models": list(self.models), "providers": info["providers"],
                             "segmentation": methods, "auth": gate.token is not None})

    @api.get(f"/{API_VERSION}/models")
    async def list_models(self) -> Response:
        """Served models: name, channels, input/output depth, YX multiple and normalisation."""
        methods = await self.segmenter.available.remote()
        return JSONResponse({"models": [m.describe() for m in self.models.values()], "segmentation": methods})

    @api.post(f"/{API_VERSION}/stain", openapi_extra=BODY_DOC | query_doc("model", "normalize", "denormalize"))
    async def stain(self, request: Request) -> Response:
        """Predict the model's target channels. Query: model, normalize (true), denormalize (false).

        Statistics for normalisation come from the ``X-Viscy-Statistics`` header (JSON, e.g. the plate's
        stored fov_statistics) or the image itself. Answer: ``(C', [Z,] Y, X)`` float32 in the Accept encoding.
        """
        q = self._query(request, ("model", "normalize", "denormalize"))
        accept = negotiate(request.headers.get("accept"), media_type(request.headers.get("content-type")),
                           ARRAY_ANSWERS)
        _, pred, timing, extra = await self._stain(request, q)
        return await self._respond(pred, accept, extra["headers"], timing)

    @api.post(f"/{API_VERSION}/segment", openapi_extra=BODY_DOC | query_doc("method", "diameter", "channel"))
    async def segment(self, request: Request) -> Response:
        """Instance labels (int32, 0 = background) of an image: ``(Y, X)`` or ``(Z, Y, X)``.

        Query: method (classical | cellpose), diameter (pixels), channel (index for (C, Z, Y, X) input).
        """
        q = self._query(request, ("method", "diameter", "channel"))
        accept = negotiate(request.headers.get("accept"), media_type(request.headers.get("content-type")),
                           ARRAY_ANSWERS)
        diameter = self._diameter(q)
        channel_text = q.get("channel", "0")
        if not (channel_text.isascii() and channel_text.isdecimal()) or len(channel_text) > 3:
            raise PayloadError(400, f"channel={channel_text[:20]!r} must be a channel index (0, 1, ...)")
        channel = int(channel_text)
        t0 = time.perf_counter()
        image = await self._image(request)
        if image.ndim == 4:
            if channel >= image.shape[0]:
                raise PayloadError(422, f"channel={channel} but the image has {image.shape[0]} channel(s)")
            stack = image[channel]
        else:
            stack = image[None] if image.ndim == 2 else image
        t1 = time.perf_counter()
        masks = await self._segment(stack, q.get("method"), diameter)
        t2 = time.perf_counter()
        masks = masks[0] if image.ndim == 2 else masks
        return await self._respond(masks, accept, {"X-Viscy-Objects": str(int(masks.max()))},
                                   {"decode": t1 - t0, "segment": t2 - t1})

    @api.post(f"/{API_VERSION}/stain-and-segment",
              openapi_extra=BODY_DOC | query_doc("model", "method", "diameter", "segment_channel", "normalize",
                                                 "denormalize"))
    async def stain_and_segment(self, request: Request) -> Response:
        """Stain, then segment one predicted channel, in one request.

        Answer ``application/x-npz`` (default) with arrays ``stain`` (float32), ``masks`` (int32) and
        ``channels``; or ``application/json`` with PNG previews and timings (what the page shows).
        """
        q = self._query(request, ("model", "method", "diameter", "segment_channel", "normalize", "denormalize"))
        accept = negotiate(request.headers.get("accept"), NPZ, (NPZ, JSON))
        diameter = self._diameter(q)
        served, pred, timing, extra = await self._stain(request, q)
        channel = q.get("segment_channel") or served.card.target_channels[0]
        if channel not in served.card.target_channels:
            raise PayloadError(422, f"segment_channel {channel[:40]!r} is not predicted by {served.name!r}; "
                                    f"choose one of {served.card.target_channels}")
        ci = served.card.target_channels.index(channel)
        plane = pred[ci] if pred.ndim == 4 else pred[ci][None]
        t0 = time.perf_counter()
        masks = await self._segment(plane, q.get("method"), diameter)
        timing["segment"] = time.perf_counter() - t0
        masks = masks if pred.ndim == 4 else masks[0]
        headers = {**extra["headers"], "X-Viscy-Segmented": channel, "X-Viscy-Objects": str(int(masks.max()))}
        if accept == JSON:
            answer = await self._cpu(preview, extra["image"], pred, masks, served, channel, timing)
            return JSONResponse(answer, headers=headers)
        t1 = time.perf_counter()
        arrays = {"stain": pred, "masks": masks, "channels": np.array(served.card.target_channels)}
        body = await self._cpu(encode_npz, arrays)
        timing["encode"] = time.perf_counter() - t1
        return Response(body, media_type=NPZ, headers={**headers, "Server-Timing": _timing(timing)})


# ---------------------------------------------------------------------------------------- builder
def build_app(args: dict[str, Any] | ServeConfig):
    """Ray Serve application builder (``import_path: viscy.serve.app:build_app``; ``args`` = ServeConfig keys).

    Raises
    ------
    ConfigError
        If the args are invalid or a model cannot be read (before any replica starts).
    """
    from pydantic import ValidationError

    if isinstance(args, ServeConfig):
        config = args
    else:
        try:
            config = ServeConfig.model_validate(dict(args))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, ServeConfig)) from None
    from viscy.config import absolute_paths

    config = absolute_paths(config)
    models = find_models(config.models)
    model_paths = {name: str(m.path) for name, m in models.items()}

    def options(settings) -> dict[str, Any]:
        return {
            "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": getattr(settings, "num_gpus", 0)},
            "max_ongoing_requests": settings.max_ongoing_requests,
            "autoscaling_config": settings.autoscaling.model_dump(),
        }

    ingress = config.ingress

    stainer = VirtualStainer.options(**options(config.stainer)).bind(
        model_paths, config.stainer.model_dump(mode="json")
    )
    segmenter = Segmenter.options(**options(config.segmenter)).bind(config.segmenter.model_dump(mode="json"))
    return Ingress.options(
        **options(ingress), max_queued_requests=ingress.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": ingress.retry_after_s},
    ).bind(stainer, segmenter, config.model_dump(mode="json"))
