"""What the server knows about each exported model: found on disk, described by its model card.

Everything a request needs (channels, Z window, YX multiple, normalisation) comes from the card that
``viscy export`` writes into the file (the model card of training), so nothing is retyped in the serve config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from viscy.data.config import NormalizationConfig
from viscy.data.patches import denormalize, normalization_for_channel, normalize
from viscy.errors import ModelError
from viscy.models import read_card
from viscy.models.bioimageio import (
    PACKAGE_ARCHITECTURE,
    input_yx_sizes,
    is_package,
    load_package,
    padded_yx,
    read_layout,
)
from viscy.models.card import ModelCard, read_onnx_props
from viscy.serve.codecs import PayloadError

MIN_YX = 8
# Image statistics use at most this many pixels per channel (a regular grid, as `viscy preprocess` samples).
MAX_STAT_SAMPLES = 1 << 20


@dataclass(frozen=True)
class ServedModel:
    """One exported model as served: its name (the file stem), file and card."""

    name: str
    path: Path
    card: ModelCard
    opset: int | None = None
    package_sizes: dict[str, Any] | None = field(default=None, repr=False)  # a package's input y/x sizes
    normalization: list[NormalizationConfig] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.card.names_channels:
            raise ModelError(
                f"{self.path} does not name its channels; export it from a trained best_model.pt (its model card), "
                "or pass --source_channels/--target_channels to `viscy export`"
            )
        norms = [NormalizationConfig(**group) for group in self.card.normalization]
        object.__setattr__(self, "normalization", norms)  # parsed once, here

    @classmethod
    def load(cls, path: Path) -> ServedModel:
        """Read the card of an ONNX file exported by ``viscy export``, or of a bioimage.io package (nothing is
        loaded)."""
        path = Path(path)
        if is_package(path):
            descr = load_package(path)
            return cls(path.name.split(".")[0], path, read_layout(descr, path)[1], None, input_yx_sizes(descr))
        return cls(path.stem, path, read_card(path), read_onnx_props(path)[1])

    @property
    def package(self) -> bool:
        """Whether this is a bioimage.io package (its own pre/postprocessing, whole images)."""
        return self.card.spec.architecture == PACKAGE_ARCHITECTURE

    def describe(self) -> dict[str, Any]:
        """The public description served by ``GET /v1/models`` (no server paths)."""
        card, spec = self.card, self.card.spec
        return {
            "name": self.name,
            "file": self.path.name,
            "model_name": card.name,
            "architecture": spec.architecture,
            "source_channels": card.source_channels,
            "target_channels": card.target_channels,
            "z_window_size": spec.z_window_size,
            "out_depth": spec.out_depth,
            "yx_multiple": spec.yx_multiple,
            "normalization": [n.model_dump(mode="json") for n in self.normalization],
            "training": card.training,
            "opset": self.opset,
            "format": "bioimageio" if self.package else "onnx",
        }

    # ------------------------------------------------------------------------------------ requests
    def as_czyx(self, image: np.ndarray) -> np.ndarray:
        """The request image as ``(C, Z, Y, X)``; 422 names the shape this model needs.

        ``(Y, X)`` and ``(Z, Y, X)`` are single-channel images; ``(C, Z, Y, X)`` must have the model's channels.
        """
        c, d = self.card.spec.in_channels, self.card.spec.z_window_size
        sources = self.card.source_channels
        needs = "send (Y, X) or (Z, Y, X)" if c == 1 else f"send (C={c}, Z, Y, X) with channels {sources}"
        if image.ndim == 2 and c == 1:
            x = image[None, None]
        elif image.ndim == 3 and c == 1:
            x = image[None]
        elif image.ndim == 4:
            x = image
        else:
            raise PayloadError(422, f"model {self.name!r} cannot take an image of shape {image.shape}; {needs}")
        if x.shape[0] != c:
            raise PayloadError(
                422, f"model {self.name!r} takes {c} channel(s) {sources}, the image has {x.shape[0]}"
            )
        if x.shape[1] < d:
            raise PayloadError(
                422,
                f"model {self.name!r} reads {d} Z slices per prediction but the image has {x.shape[1]}; "
                f"send a stack of at least {d} slices (Z, Y, X)",
            )
        if min(x.shape[-2:]) < MIN_YX:
            raise PayloadError(422, f"image YX {x.shape[-2:]} is too small; send at least {MIN_YX} x {MIN_YX}")
        return x

    def _stats_for(
        self, channels: list[str], groups: list[NormalizationConfig], image: np.ndarray | None,
        sent: dict[str, dict[str, float]] | None,
    ) -> tuple[np.ndarray, str]:
        """``(C, 2)`` (subtrahend, divisor) per channel from the sent statistics or the image itself."""
        params = np.zeros((len(channels), 2), dtype=np.float32)
        params[:, 1] = 1.0
        sources = set()
        for i, ch in enumerate(channels):
            group = normalization_for_channel(ch, groups)
            if group is None:
                continue
            if sent is not None and ch in sent:
                missing = [k for k in (group.subtrahend, group.divisor) if k not in sent[ch]]
                if missing:
                    raise PayloadError(
                        422, f"X-Viscy-Statistics for {ch!r} lacks {missing}; model {self.name!r} normalises "
                             f"{ch} with {group.subtrahend}/{group.divisor}",
                    )
                params[i] = (sent[ch][group.subtrahend], sent[ch][group.divisor])
                sources.add("request")
            elif image is not None:
                from viscy.data.preprocess import compute_statistics

                stats = compute_statistics(_grid_sample(image[i]))
                params[i] = (stats[group.subtrahend], stats[group.divisor])
                sources.add("image")
            else:
                raise PayloadError(
                    422, f"denormalize needs the statistics of {ch!r} in X-Viscy-Statistics, e.g. "
                         f'{{"{ch}": {{"{group.subtrahend}": 0.0, "{group.divisor}": 1.0}}}}',
                )
        return params, "+".join(sorted(sources)) or "none"

    def normalize(self, x: np.ndarray, sent: dict[str, dict[str, float]] | None) -> tuple[np.ndarray, str]:
        """Normalise a ``(C, Z, Y, X)`` source image as training did; returns it and where the statistics came from.

        Statistics sent with the request (the plate's stored ``fov_statistics`` for an exact match with
        ``viscy predict``) win; otherwise they are computed from the image itself.
        """
        if self.package:
            return x.astype(np.float32, copy=False), "the package's own preprocessing"
        params, source = self._stats_for(self.card.source_channels, self.normalization, x, sent)
        return normalize(x.astype(np.float32, copy=False), params), source

    def check_padding(self, shape: tuple[int, ...], max_values: int, block_yx: tuple[int, int] | None) -> None:
        """413 before any work when a package would pad a ``(C, Z, Y, X)`` image to more than ``max_values``
        values (a thin image and a package whose minimum size is large)."""
        if self.package_sizes is None:
            return
        (py, px), _ = padded_yx(self.package_sizes, shape[-2], shape[-1], block_yx)
        values = math.prod(shape[:-2]) * py * px
        if values > max_values:
            raise PayloadError(
                413, f"model {self.name!r} pads an image of shape {tuple(shape)} to {py} x {px} ({values} values), "
                     f"over max_image_pixels ({max_values}); send an image closer to square, or fewer planes",
            )

    def check_denormalize(self, denormalize: bool) -> None:
        """422 before any work when a bioimage.io package is asked to denormalise (its postprocessing sets units)."""
        if denormalize and self.package:
            raise PayloadError(
                422, f"model {self.name!r} is a bioimage.io package: its own postprocessing sets the output's units; "
                     "leave denormalize unset",
            )

    def denormalize(self, pred: np.ndarray, sent: dict[str, dict[str, float]] | None) -> np.ndarray:
        """Rescale a prediction to the targets' units with their statistics (sent with the request)."""
        self.check_denormalize(True)
        groups = list(self.normalization) + [NormalizationConfig()]
        params, _ = self._stats_for(self.card.target_channels, groups, None, sent)
        return denormalize(pred, params)


def _grid_sample(channel: np.ndarray) -> np.ndarray:
    """At most ``MAX_STAT_SAMPLES`` values of a ``(Z, Y, X)`` channel on a regular YX grid."""
    step = max(1, math.ceil(math.sqrt(channel.size / MAX_STAT_SAMPLES)))
    return channel[:, ::step, ::step].ravel()


def find_models(paths: list[Path]) -> dict[str, ServedModel]:
    """Every ONNX model and bioimage.io package of the given paths and directories, by name (the file stem).

    Raises
    ------
    ModelError
        If a path does not exist, a directory holds no ``.onnx`` file, two files share a name, or a file
        lacks viscy metadata.
    """
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if is_package(p):
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix == ".onnx" or (f.suffix == ".zip" and is_package(f))
                           or (f.is_dir() and is_package(f)))
            if not found:
                raise ModelError(
                    f"{p} holds no .onnx file or bioimage.io package; export one with `viscy export` or name a file"
                )
            files.extend(found)
        elif p.is_file():
            if p.suffix != ".onnx":
                raise ModelError(
                    f"{p} is neither an .onnx file nor a bioimage.io package; serve exports of `viscy export` or "
                    "bioimage.io packages (.zip or folder)"
                )
            files.append(p)
        else:
            raise ModelError(
                f"model path {p} does not exist; give an .onnx file, a bioimage.io package or a directory of them"
            )
    models: dict[str, ServedModel] = {}
    for f in files:
        model = ServedModel.load(f)
        if model.name in models:
            raise ModelError(
                f"two models are named {model.name!r} ({models[model.name].path} and {f}); rename one file"
            )
        models[model.name] = model
    return models
