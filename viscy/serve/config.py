"""Schemas of ``viscy serve`` (the application and its deployments) and ``viscy infer``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from viscy.config import PathList, StrictModel
from viscy.segment.config import SegmenterConfig

RAY_SERVE_KEYS = ("proxy_location", "http_options", "grpc_options", "logging_config", "applications")
SERVE_IMPORT_PATH = "viscy.serve.app:build_app"


class AutoscalingSettings(StrictModel):
    """Ray Serve autoscaling of one deployment (replicas follow the requests in flight per replica)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(1, ge=1, description="Most replicas started under load.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests in flight per replica to aim for.")
    upscale_delay_s: float = Field(5.0, ge=0, description="Load must last this long before a replica is added.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Idle this long before a replica is removed.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window over which the load is averaged.")
    metrics_interval_s: float = Field(
        10.0, gt=0, description="How often replicas report their load (below look_back_period_s)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.metrics_interval_s >= self.look_back_period_s:
            raise ValueError(
                f"autoscaling.metrics_interval_s ({self.metrics_interval_s}) must be below look_back_period_s "
                f"({self.look_back_period_s})"
            )
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"autoscaling.max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self


class StainerSettings(StrictModel):
    """The ``VirtualStainer`` deployment: onnxruntime sessions of every served model."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (also onnxruntime's threads).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (0.5 packs two replicas on one GPU).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="onnxruntime device: auto uses CUDA when a GPU and the CUDA provider are usable."
    )
    max_ongoing_requests: int = Field(8, ge=1, description="Requests one replica works on at once.")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    max_batch_size: int = Field(8, ge=1, description="Same-shaped tiles run together across requests.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits for more tiles.")
    tile_yx: tuple[int, int] | None = Field(
        (512, 512), description="Tile size of large images (null: whole images, padded to the YX multiple)."
    )
    tile_overlap: float = Field(0.25, ge=0, lt=1, description="Fraction of a tile overlapping its neighbour.")
    blend: Literal["gaussian", "constant"] = Field("gaussian", description="Tile merge weights.")


class SegmenterSettings(SegmenterConfig):
    """The ``Segmenter`` deployment: the segmenter of ``evaluate`` and ``predict`` (its ``method``, ``model``,
    ``diameter`` and ``gpu`` are the defaults of requests), classical always served, Cellpose when ``model`` is set.
    """

    renamed_keys: ClassVar[dict[str, str]] = {"default_method": "method", "cellpose_model": "model"}

    method: Literal["classical", "cellpose"] = Field(
        "classical", description="Method used when a request names none ('cellpose' needs model)."
    )
    model: str | None = Field(
        None, description="Cellpose >= 4 model name (e.g. cpsam) or checkpoint file; null serves classical only."
    )
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (for Cellpose).")
    max_ongoing_requests: int = Field(4, ge=1, description="Requests one replica works on at once.")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    min_diameter: float = Field(
        4.0, gt=0, description="Smallest diameter a request may ask for (Cellpose upsamples by 30/diameter)."
    )
    max_diameter: float = Field(
        400.0, gt=0, description="Largest diameter a request may ask for (classical smoothing grows with it)."
    )

    @model_validator(mode="after")
    def _diameter_range(self) -> SegmenterSettings:
        if self.min_diameter > self.max_diameter:
            raise ValueError(
                f"segmenter.min_diameter ({self.min_diameter}) is above max_diameter ({self.max_diameter})"
            )
        if self.diameter is not None and not self.min_diameter <= self.diameter <= self.max_diameter:
            raise ValueError(
                f"segmenter.diameter ({self.diameter}) is outside [min_diameter, max_diameter] "
                f"([{self.min_diameter}, {self.max_diameter}])"
            )
        if self.method == "cellpose" and self.model is None:
            raise ValueError(
                "segmenter.method is cellpose but no Cellpose model is served; set segmenter.model (e.g. cpsam or a "
                "checkpoint path) or method: classical"
            )
        return self

    def for_request(self, method: str | None, diameter: float | None) -> SegmenterConfig:
        """The segmenter of one request: its method and diameter, else these defaults."""
        return SegmenterConfig(method=method or self.method, model=self.model or "cpsam",
                               diameter=diameter or self.diameter, gpu=self.gpu)


class IngressSettings(StrictModel):
    """The HTTP ``Ingress`` deployment (decoding, validation, composition)."""

    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per replica.")
    max_ongoing_requests: int = Field(
        4, ge=1, description="Requests one replica handles at once (each may hold one image in memory)."
    )
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests waiting beyond that before 503 answers (-1: no limit)."
    )
    retry_after_s: float = Field(5.0, ge=0, description="Retry-After of the 503 answered when the queue is full.")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)


class ServeConfig(StrictModel):
    """``viscy serve``: ONNX virtual staining and segmentation behind one HTTP API on Ray Serve.

    The file may also be a Ray Serve config (``serve deploy``/``serve run`` read the same file): then the
    settings are the ``args`` of the application whose import_path is ``viscy.serve.app:build_app``, with
    host and port from ``http_options``; keys given beside them (command-line overrides) win.
    """

    models: PathList = Field(
        description="ONNX files exported by `viscy export`, bioimage.io packages (.zip or folder), or directories of "
        "them."
    )
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds (0.0.0.0 exposes it to the network).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    app_name: str = Field("viscy", description="Ray Serve application name.")
    route_prefix: str = Field("/", description="URL prefix of the application.")
    auth_token_env: str | None = Field(
        None, description="Environment variable holding a bearer token; requests without it get 401."
    )
    auth_token_file: Path | None = Field(None, description="File holding the bearer token (e.g. a mounted secret).")
    allow_unauthenticated_network: bool = Field(
        False, description="Allow a non-loopback host without a token (anyone who reaches the port can use it)."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Extra Host header names accepted on a loopback bind (e.g. a reverse proxy's); other names "
        "get 403, so web pages cannot reach the server through DNS rebinding.",
    )
    max_request_mb: float = Field(
        256.0, gt=0, description="Largest request body; larger ones get 413 (default: the largest image as float64)."
    )
    max_image_pixels: int = Field(
        8 * 2048 * 2048, ge=1, description="Largest image (C x Z x Y x X values); larger ones get 413."
    )
    max_planes: int = Field(
        64, ge=1, description="Most Z planes one request may send (each plane is stained and segmented on its own)."
    )
    max_tiles: int = Field(
        2048, ge=1, description="Most model tiles one request may make (Z windows x YX tiles); more get 413."
    )
    request_timeout_s: float | None = Field(
        300.0, gt=0, description="End-to-end limit of one HTTP request (Serve's proxy answers 408 and cancels it)."
    )
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    stainer: StainerSettings = Field(default_factory=StainerSettings)
    segmenter: SegmenterSettings = Field(default_factory=SegmenterSettings)
    detach: bool = Field(
        False, description="Deploy to the cluster at RAY_ADDRESS and return (default: serve until Ctrl-C)."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_ray_serve_config(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "applications" not in data:
            return data
        data = dict(data)
        apps = data.pop("applications") or []
        ours = [a for a in apps if isinstance(a, dict) and a.get("import_path") == SERVE_IMPORT_PATH]
        if len(ours) != 1:
            raise ValueError(
                f"the Ray Serve config must hold exactly one application with import_path {SERVE_IMPORT_PATH}"
            )
        app = ours[0]
        if app.get("deployments"):
            raise ValueError(
                "put deployment settings under the application's args (ingress, stainer, segmenter), not "
                "'deployments', so viscy serve and serve deploy run the same settings"
            )
        http = data.pop("http_options", None) or {}
        for key in RAY_SERVE_KEYS:
            data.pop(key, None)
        merged: dict[str, Any] = dict(app.get("args") or {})
        merged.setdefault("app_name", app.get("name", "viscy"))
        merged.setdefault("route_prefix", app.get("route_prefix", "/"))
        for key in ("host", "port", "request_timeout_s"):
            if key in http:
                merged.setdefault(key, http[key])
        for key, value in data.items():  # overrides beside the Ray layout win over args
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return merged

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("route_prefix must start with '/', e.g. / or /viscy")
        return value.rstrip("/") or "/"

    @model_validator(mode="after")
    def _no_open_network_bind(self) -> ServeConfig:
        has_token = self.auth_token_env is not None or self.auth_token_file is not None
        if not is_loopback(self.host) and not has_token and not self.allow_unauthenticated_network:
            raise ValueError(
                f"host {self.host} exposes the API to the network without a token; set auth_token_env or "
                "auth_token_file, or bind 127.0.0.1, or (on a network you trust) allow_unauthenticated_network: true"
            )
        return self


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class InferConfig(StrictModel):
    """``viscy infer``: send an image to a running ``viscy serve`` and save the answer."""

    image: Path = Field(description="Input image: .tif/.tiff, .npy or .png ((Y, X), (Z, Y, X) or (C, Z, Y, X)).")
    url: str = Field("http://127.0.0.1:8000", description="Base URL of the server.")
    model: str | None = Field(None, description="Model name (GET /v1/models lists them); default: the only one.")
    output: Path | None = Field(
        None,
        description="New output file (.tif, .npy, or .npz with --segment; an existing file is never replaced); "
        "default: <image stem>_viscy.<suffix> next to the image.",
    )
    segment: bool = Field(False, description="Also segment a predicted channel (stain-and-segment; .npz or .tif).")
    segment_only: bool = Field(False, description="Only segment the image itself (no staining).")
    method: Literal["classical", "cellpose"] | None = Field(None, description="Segmentation method (server default).")
    segment_channel: str | None = Field(None, description="Predicted channel to segment; default: the first.")
    token_env: str = Field("VISCY_SERVE_TOKEN", description="Environment variable holding the bearer token, if any.")
    timeout_s: float = Field(300.0, gt=0, description="HTTP timeout.")
