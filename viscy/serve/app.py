"""The Ray Serve application: ``Ingress`` (FastAPI) composing ``VirtualStainer`` and ``Segmenter``.

* ``VirtualStainer`` holds one onnxruntime session per served model (CUDA when usable). Large images go
  through the shared tiling engine (:mod:`viscy.predict.tiling`: padding to the YX multiple, Gaussian
  blending, Z windows); every tile passes through one ``@serve.batch`` queue, so same-shaped tiles of
  concurrent requests run as one batch.
* ``Segmenter`` runs the segmenters of ``viscy evaluate`` (classical; Cellpose when configured).
* ``Ingress`` decodes and validates payloads, normalises with the model's metadata, composes the two
  through deployment handles and encodes the answer. Bad input gets a 4xx JSON answer naming the problem.

``build_app`` is the application builder that ``serve run``/``serve deploy`` and ``viscy serve`` use::

    applications:
      - name: viscy
        import_path: viscy.serve.app:build_app
        args: {models: [/models], stainer: {num_gpus: 1}}
"""

import asyncio
import base64
import hmac
import io
import logging
import math
import os
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

from viscy.config import (
    ConfigError,
    ServeConfig,
    StainerSettings,
    format_validation_error,
)
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
from viscy.serve.models import ServedModel, find_models

log = logging.getLogger("viscy.serve")
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

api = FastAPI(
    title="viscy serve",
    version=API_VERSION,
    description=(
        "Virtual staining (ONNX models exported by `viscy export`) and instance segmentation over HTTP.\n\n"
        "Send images as raw bytes (`application/octet-stream` with `X-Dtype` and `X-Shape`), `.npy` "
        "(`application/x-npy`), TIFF (`image/tiff`) or PNG. Answers follow `Accept` (default: the request's "
        "encoding); `/v1/stain-and-segment` answers `.npz` (`stain`, `masks`, `channels`). Errors are JSON "
        "`{\"detail\": ...}` naming the problem. With a token configured, send `Authorization: Bearer TOKEN`."
    ),
)


# ---------------------------------------------------------------------------------------- stainer
@serve.deployment(name="VirtualStainer")
class VirtualStainer:
    """onnxruntime sessions of every served model; tiles of concurrent requests are batched together."""

    def __init__(self, model_paths: dict[str, str], settings: dict[str, Any]) -> None:
        from viscy.predict.backends import OnnxBackend
        from viscy.predict.tiling import TilingOptions

        self.settings = StainerSettings(**settings)
        self.models = {name: ServedModel.load(Path(p)) for name, p in model_paths.items()}
        threads = max(1, math.floor(self.settings.num_cpus + 0.5))
        self.backends = {
            name: OnnxBackend(Path(p), device=self.settings.device, threads=threads) for name, p in model_paths.items()
        }
        s = self.settings
        self.options = {
            name: TilingOptions.for_model(
                m.spec, s.tile_yx, overlap=s.tile_overlap, blend=s.blend, batch_size=s.max_batch_size
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
            "providers": {n: b.session.get_providers()[0] for n, b in self.backends.items()},
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
        """Predict a normalised ``(C, Z, Y, X)`` image; returns ``(C', Z, Y, X)`` float32."""
        from viscy.predict.tiling import predict_plane_stack

        loop = asyncio.get_running_loop()

        def predict_fn(batch: np.ndarray) -> np.ndarray:
            futures = [asyncio.run_coroutine_threadsafe(self._run_tiles((name, tile)), loop) for tile in batch]
            return np.stack([f.result() for f in futures])

        return await loop.run_in_executor(self.tiling_pool, predict_plane_stack, image, predict_fn, self.options[name])


# -------------------------------------------------------------------------------------- segmenter
@serve.deployment(name="Segmenter")
class Segmenter:
    """The segmenters of ``viscy evaluate``: classical always, Cellpose when a model is configured."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from viscy.config import SegmenterSettings
        from viscy.evaluate.segment import cached_cellpose

        self.settings = SegmenterSettings(**settings)
        self.methods = ["classical"]
        if self.settings.cellpose_model:
            cached_cellpose(self.settings.cellpose_model, self.settings.gpu)  # loaded before the replica is healthy
            self.methods.append("cellpose")

    def available(self) -> list[str]:
        """The methods this replica serves."""
        return list(self.methods)

    def segment(self, stack: np.ndarray, method: str, diameter: float | None) -> np.ndarray:
        """Label every slice of a ``(Z, Y, X)`` float image; returns int32 ``(Z, Y, X)``."""
        from viscy.config import SegmentationConfig
        from viscy.evaluate.segment import get_segmenter

        config = SegmentationConfig(
            method=method,
            model=self.settings.cellpose_model or "cpsam",
            diameter=diameter or self.settings.diameter,
            gpu=self.settings.gpu,
        )
        segment = get_segmenter(config)
        return np.stack([segment(plane) for plane in stack]).astype(np.int32)


# ---------------------------------------------------------------------------------------- previews
def _png(plane: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(plane).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _gray(plane: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(plane, [1, 99.5])
    return (np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _labels_rgb(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    colors = rng.integers(60, 256, size=(int(labels.max()) + 1, 3), dtype=np.uint8)
    colors[0] = 0
    return colors[labels]


def preview(image: np.ndarray, pred: np.ndarray, masks: np.ndarray, served: ServedModel, channel: str,
            timing: dict[str, float]) -> dict[str, Any]:
    """PNG previews (middle Z slice) of the input, every predicted channel and the masks, with timings."""
    def middle(a: np.ndarray) -> np.ndarray:
        while a.ndim > 2:
            a = a[a.shape[0] // 2] if a.ndim == 3 else a[0]
        return a

    src = image[0] if image.ndim == 4 else image
    return {
        "model": served.name,
        "shape": list(image.shape),
        "channels": served.target_channels,
        "segmented": channel,
        "objects": int(masks.max()),
        "timing_ms": {k: round(v * 1000, 1) for k, v in timing.items()},
        "images": {
            "input": _png(_gray(middle(np.asarray(src, dtype=np.float32)))),
            **{ch: _png(_gray(middle(pred[i]))) for i, ch in enumerate(served.target_channels)},
            "masks": _png(_labels_rgb(middle(masks))),
        },
    }


# ---------------------------------------------------------------------------------------- ingress
def read_token(config: ServeConfig) -> str | None:
    """The bearer token from ``auth_token_file`` or ``auth_token_env`` (None: auth off).

    Raises
    ------
    ConfigError
        If a token source is configured but missing or empty (never fall back to an open server).
    """
    if config.auth_token_file is not None:
        path = Path(config.auth_token_file)
        if not path.is_file():
            raise ConfigError(f"auth_token_file {path} does not exist on the server")
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"auth_token_file {path} is empty")
        return token
    if config.auth_token_env is not None:
        token = os.environ.get(config.auth_token_env, "").strip()
        if not token:
            raise ConfigError(
                f"auth_token_env is {config.auth_token_env} but that variable is unset or empty where the server runs"
            )
        return token
    return None


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _timing(parts: dict[str, float]) -> str:
    return ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in parts.items())


def _bool(value: str | None, name: str, default: bool) -> bool:
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise PayloadError(400, f"query parameter {name}={value!r} must be true or false")


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP front: auth, size limits, decoding, validation, normalisation and composition."""

    def __init__(self, stainer: DeploymentHandle, segmenter: DeploymentHandle, config: dict[str, Any]) -> None:
        self.config = ServeConfig(**config)
        self.stainer = stainer
        self.segmenter = segmenter
        self.models = find_models(self.config.models)
        self.token = read_token(self.config)
        self.max_bytes = int(self.config.max_request_mb * 1024 * 1024)

    # ------------------------------------------------------------------------------ plumbing
    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise PayloadError(401, "missing or wrong bearer token; send Authorization: Bearer <token>")

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
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
        self._authorize(request)
        body = await self._body(request)
        h = request.headers

        def decode() -> np.ndarray:
            image = decode_image(body, h.get("content-type"), h.get("x-dtype"), h.get("x-shape"))
            if image.size > self.config.max_image_pixels:
                raise PayloadError(413, f"image of {image.size} values is over max_image_pixels "
                                        f"({self.config.max_image_pixels}); send a smaller image or tile it")
            if image.dtype.kind == "f" and not np.isfinite(image).all():
                raise PayloadError(422, "the image holds NaN or infinite values; replace them before sending")
            return image

        return await asyncio.to_thread(decode)  # decoding large images must not stall the event loop

    def _model(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise PayloadError(400, f"name a model with ?model=NAME; served: {', '.join(self.models)}")
        if name not in self.models:
            raise PayloadError(404, f"unknown model {name!r}; served: {', '.join(self.models)} (GET /v1/models)")
        return self.models[name]

    async def _stain(self, request: Request, model: str | None) -> tuple[ServedModel, np.ndarray, dict, dict]:
        q = request.query_params
        served = self._model(model)
        normalize = _bool(q.get("normalize"), "normalize", True)
        denorm = _bool(q.get("denormalize"), "denormalize", False)
        stats = parse_statistics(request.headers.get("x-viscy-statistics"))
        t0 = time.perf_counter()
        image = await self._image(request)

        def prepare() -> tuple[np.ndarray, str]:
            x = served.as_czyx(image)
            if normalize:
                return served.normalize(x, stats)
            return x.astype(np.float32, copy=False), "none (sent normalised)"

        x, source = await asyncio.to_thread(prepare)
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
            "X-Viscy-Channels": ",".join(served.target_channels),
            "X-Viscy-Normalization": source,
            "X-Viscy-Units": "raw" if denorm else "normalized",
        }
        return served, pred, timing, {"image": image, "headers": headers}

    async def _segment(self, stack: np.ndarray, method: str | None, diameter: float | None) -> np.ndarray:
        methods = await self.segmenter.available.remote()
        method = method or self.config.segmenter.default_method
        if method not in methods:
            hint = " (set segmenter.cellpose_model in the serve config)" if method == "cellpose" else ""
            raise PayloadError(400, f"segmentation method {method!r} is not served; available: "
                                    f"{', '.join(methods)}{hint}")
        return await self.segmenter.segment.remote(stack.astype(np.float32, copy=False), method, diameter)

    @staticmethod
    def _diameter(request: Request) -> float | None:
        value = request.query_params.get("diameter")
        if value is None:
            return None
        try:
            d = float(value)
        except ValueError:
            raise PayloadError(400, f"diameter={value!r} must be a number of pixels") from None
        if not np.isfinite(d) or d <= 0:
            raise PayloadError(400, f"diameter={value!r} must be a positive number of pixels")
        return d

    @staticmethod
    async def _respond(arr: np.ndarray, accept: str, headers: dict[str, str], timing: dict[str, float]) -> Response:
        t0 = time.perf_counter()
        body, kind, extra = await asyncio.to_thread(encode_array, arr, accept)
        timing = {**timing, "encode": time.perf_counter() - t0}
        return Response(body, media_type=kind, headers={**headers, **extra, "Server-Timing": _timing(timing)})

    async def _guard(self, handler) -> Response:
        try:
            return await handler()
        except PayloadError as exc:
            return _error(exc.status, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must answer JSON, not crash the replica
            log.exception("request failed")
            return _error(500, f"internal error ({type(exc).__name__}: {exc}); details are in the serve replica log")

    # ------------------------------------------------------------------------------ endpoints
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The page: drop an image, see the stains and masks."""
        return HTMLResponse(resources.files("viscy.serve").joinpath("page.html").read_text())

    @api.get("/healthz")
    async def healthz(self) -> Response:
        """200 when every model and segmenter is loaded, else 503."""
        try:
            info = await asyncio.wait_for(self.stainer.info.remote(), timeout=10)
            methods = await asyncio.wait_for(self.segmenter.available.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001
            return _error(503, f"not ready: {type(exc).__name__}: {exc}")
        return JSONResponse({"status": "ok", "models": list(self.models), "providers": info["providers"],
                             "segmentation": methods, "auth": self.token is not None})

    @api.get(f"/{API_VERSION}/models")
    async def list_models(self, request: Request) -> Response:
        """Served models: name, channels, input/output depth, YX multiple and normalisation."""
        async def run() -> Response:
            self._authorize(request)
            methods = await self.segmenter.available.remote()
            return JSONResponse({"models": [m.describe() for m in self.models.values()], "segmentation": methods})

        return await self._guard(run)

    @api.post(f"/{API_VERSION}/stain", openapi_extra=BODY_DOC)
    async def stain(self, request: Request, model: str | None = None) -> Response:
        """Predict the model's target channels. Query: model, normalize (true), denormalize (false).

        Statistics for normalisation come from the ``X-Viscy-Statistics`` header (JSON, e.g. the plate's
        stored fov_statistics) or the image itself. Answer: ``(C', [Z,] Y, X)`` float32 in the Accept encoding.
        """
        async def run() -> Response:
            accept = negotiate(request.headers.get("accept"), media_type(request.headers.get("content-type")),
                               ARRAY_ANSWERS)
            _, pred, timing, extra = await self._stain(request, model)
            return await self._respond(pred, accept, extra["headers"], timing)

        return await self._guard(run)

    @api.post(f"/{API_VERSION}/segment", openapi_extra=BODY_DOC)
    async def segment(self, request: Request, method: str | None = None, channel: int = 0) -> Response:
        """Instance labels (int32, 0 = background) of an image: ``(Y, X)`` or ``(Z, Y, X)``.

        Query: method (classical | cellpose), diameter (pixels), channel (index for (C, Z, Y, X) input).
        """
        async def run() -> Response:
            accept = negotiate(request.headers.get("accept"), media_type(request.headers.get("content-type")),
                               ARRAY_ANSWERS)
            diameter = self._diameter(request)
            t0 = time.perf_counter()
            image = await self._image(request)
            if image.ndim == 4:
                if not 0 <= channel < image.shape[0]:
                    raise PayloadError(422, f"channel={channel} but the image has {image.shape[0]} channel(s)")
                stack = image[channel]
            elif image.ndim in (2, 3):
                stack = image[None] if image.ndim == 2 else image
            else:
                raise PayloadError(422, f"cannot segment an image of shape {image.shape}; send (Y, X), (Z, Y, X) "
                                        "or (C, Z, Y, X) with ?channel=")
            if min(stack.shape[-2:]) < 8:
                raise PayloadError(422, f"image YX {stack.shape[-2:]} is too small; send at least 8 x 8")
            t1 = time.perf_counter()
            masks = await self._segment(stack, method, diameter)
            t2 = time.perf_counter()
            masks = masks[0] if image.ndim == 2 else masks
            return await self._respond(masks, accept, {"X-Viscy-Objects": str(int(masks.max()))},
                                 {"decode": t1 - t0, "segment": t2 - t1})

        return await self._guard(run)

    @api.post(f"/{API_VERSION}/stain-and-segment", openapi_extra=BODY_DOC)
    async def stain_and_segment(self, request: Request, model: str | None = None, method: str | None = None,
                                segment_channel: str | None = None) -> Response:
        """Stain, then segment one predicted channel, in one request.

        Answer ``application/x-npz`` (default) with arrays ``stain`` (float32), ``masks`` (int32) and
        ``channels``; or ``application/json`` with PNG previews and timings (what the page shows).
        """
        async def run() -> Response:
            accept = negotiate(request.headers.get("accept"), NPZ, (NPZ, JSON))
            diameter = self._diameter(request)
            served, pred, timing, extra = await self._stain(request, model)
            channel = segment_channel or served.target_channels[0]
            if channel not in served.target_channels:
                raise PayloadError(422, f"segment_channel {channel!r} is not predicted by {served.name!r}; "
                                        f"choose one of {served.target_channels}")
            ci = served.target_channels.index(channel)
            plane = pred[ci] if pred.ndim == 4 else pred[ci][None]
            t0 = time.perf_counter()
            masks = await self._segment(plane, method, diameter)
            timing["segment"] = time.perf_counter() - t0
            masks = masks if pred.ndim == 4 else masks[0]
            headers = {**extra["headers"], "X-Viscy-Segmented": channel, "X-Viscy-Objects": str(int(masks.max()))}
            if accept == JSON:
                answer = await asyncio.to_thread(preview, extra["image"], pred, masks, served, channel, timing)
                return JSONResponse(answer, headers=headers)
            t1 = time.perf_counter()
            arrays = {"stain": pred, "masks": masks, "channels": np.array(served.target_channels)}
            body = await asyncio.to_thread(encode_npz, arrays)
            timing["encode"] = time.perf_counter() - t1
            return Response(body, media_type=NPZ, headers={**headers, "Server-Timing": _timing(timing)})

        return await self._guard(run)


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

    stainer = VirtualStainer.options(**options(config.stainer)).bind(
        model_paths, config.stainer.model_dump(mode="json")
    )
    segmenter = Segmenter.options(**options(config.segmenter)).bind(config.segmenter.model_dump(mode="json"))
    return Ingress.options(**options(config.ingress), max_queued_requests=config.ingress.max_queued_requests).bind(
        stainer, segmenter, config.model_dump(mode="json")
    )
