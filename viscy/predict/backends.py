"""Model backends behind one ``predict_fn(np.ndarray (B, C, Z, Y, X)) -> np.ndarray``: torch and onnxruntime.

``describe_model`` resolves, on the driver and without loading weights into an actor, what prediction needs
to know: the :class:`~viscy.models.registry.ModelSpec`, default channel names and normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from viscy.errors import ModelError
from viscy.models.registry import ModelSpec


@dataclass(frozen=True)
class ModelInfo:
    """What the driver knows about a model before any actor loads it.

    ``name``/``kwargs`` are the resolved constructor (torch models); channel names and normalisation come from
    the model card (a ``best_model.pt`` from ``viscy train`` or an exported file), else the preset.
    """

    kind: str  # "torch" or "onnx"
    spec: ModelSpec
    source_channels: list[str] | None = None
    target_channels: list[str] | None = None
    normalization: list[dict[str, Any]] | None = None
    name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def describe_model(model: Any = None, onnx: Path | None = None) -> ModelInfo:
    """Spec, channels and normalisation of a ``ModelConfig`` or an exported ONNX file (no weights loaded)."""
    if onnx is not None:
        from viscy.models.export import read_onnx_metadata, spec_from_metadata

        if not Path(onnx).is_file():
            raise ModelError(f"ONNX file {onnx} does not exist; export one with `viscy export`")
        meta = read_onnx_metadata(onnx)
        try:
            spec = spec_from_metadata(meta)
        except KeyError as exc:
            raise ModelError(f"{onnx} metadata lacks {exc}; re-export it with `viscy export`") from None
        return ModelInfo(
            "onnx",
            spec,
            meta.get("source_channels"),
            meta.get("target_channels"),
            meta.get("normalization") or None,
            meta.get("model_name"),
        )
    if model is None:
        raise ModelError("set exactly one of 'model' and 'onnx'")
    from viscy.models import model_spec, resolve_model_source
    from viscy.models.presets import get_preset, is_preset

    name, kwargs, card = resolve_model_source(model.name, model.kwargs, model.checkpoint)
    if card is not None and card.name == name and kwargs == card.kwargs:
        spec = card.spec
    else:
        spec = model_spec(name, kwargs)
    preset = get_preset(name) if is_preset(name) else None
    sources = card.source_channels if card else preset.source_channels if preset else None
    targets = card.target_channels if card else preset.target_channels if preset else None
    norm = card.normalization if card else preset.normalization if preset else None
    return ModelInfo("torch", spec, sources, targets, norm, name, kwargs)


class TorchBackend:
    """A torch model in eval mode; ``__call__`` maps a numpy batch to a numpy prediction."""

    def __init__(self, model: Any, device: str = "cpu", threads: int | None = None) -> None:
        import torch

        from viscy.models import create_model, resolve_model_source

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device(device)
        name, kwargs, _ = resolve_model_source(model.name, model.kwargs, model.checkpoint)
        self.net = create_model(name, checkpoint=model.checkpoint, **kwargs).eval().to(self.device)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.net(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            return out.float().cpu().numpy()


class OnnxBackend:
    """An onnxruntime session (CUDA when asked and usable, else CPU)."""

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None) -> None:
        from viscy.models.export import create_ort_session

        self.session = create_ort_session(path, device=device, threads=threads)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def load_backend(model: Any = None, onnx: Path | None = None, device: str = "cpu", threads: int | None = None):
    """The backend for a ``ModelConfig`` or an ONNX path."""
    if onnx is not None:
        return OnnxBackend(onnx, device=device, threads=threads)
    return TorchBackend(model, device=device, threads=threads)
