"""Model backends behind one ``predict_fn(np.ndarray (B, C, Z, Y, X)) -> np.ndarray``: torch, onnxruntime and
bioimage.io packages.

``describe_model`` resolves, on the driver and without loading weights into an actor, the
:class:`~viscy.models.card.ModelCard` of what prediction runs: spec, channel names and normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from viscy.errors import ModelError
from viscy.models import read_card
from viscy.models.card import ModelCard

if TYPE_CHECKING:
    from viscy.models.bioimageio import PackageBackend


def describe_model(model: Any = None, onnx: Path | None = None) -> ModelCard:
    """The card of a ``ModelConfig`` or an exported ONNX file (no weights loaded).

    A torch model's card is its checkpoint's (``best_model.pt`` of ``viscy train``) when the config builds
    the same network, else one made for the resolved name and kwargs, with channel names and normalisation
    from the checkpoint's card or the preset where they fit (empty where unknown).
    """
    if onnx is not None:
        from viscy.models.bioimageio import is_package, package_card

        return package_card(onnx) if is_package(onnx) else read_card(onnx)
    if model is None:
        raise ModelError("set exactly one of 'model' and 'onnx'")
    from viscy.models import model_spec, resolve_model_source
    from viscy.models.card import card_for_model

    name, kwargs, card = resolve_model_source(model.name, model.kwargs, model.checkpoint)
    same = card is not None and card.name == name and kwargs == card.kwargs
    return card_for_model(name, kwargs, card.spec if same else model_spec(name, kwargs), card)


class TorchBackend:
    """A torch model in eval mode, built from its card; ``__call__`` maps a numpy batch to a numpy prediction."""

    def __init__(
        self, card: ModelCard, checkpoint: str | Path | None = None, device: str = "cpu", threads: int | None = None
    ) -> None:
        import torch

        from viscy.models import create_model

        if threads:
            torch.set_num_threads(threads)
        self.card = card
        self.torch = torch
        self.device = torch.device(device)
        self.net = create_model(card.name, checkpoint=checkpoint, **card.kwargs).eval().to(self.device)

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


def load_backend(
    card: ModelCard,
    checkpoint: str | Path | None = None,
    onnx: Path | None = None,
    device: str = "cpu",
    threads: int | None = None,
    block_yx: tuple[int, int] | None = None,
) -> TorchBackend | OnnxBackend | PackageBackend:
    """The backend for an ONNX file or a bioimage.io package (cut in blocks of ``block_yx`` where given), else
    for ``card`` built with the weights of ``checkpoint``."""
    if onnx is not None:
        from viscy.models.bioimageio import PackageBackend, is_package

        if is_package(onnx):
            return PackageBackend(onnx, device=device, threads=threads, block_yx=block_yx)
        return OnnxBackend(onnx, device=device, threads=threads)
    return TorchBackend(card, checkpoint, device=device, threads=threads)
