"""Self-describing models: the card that travels with the weights from training to export, predict and serve.

A :class:`ModelCard` says how to build the network (registry or preset name and kwargs), what it accepts
(its :class:`~viscy.models.registry.ModelSpec`), which channels go in and come out, the Z window and target
depth it was trained with, and the normalisation of every channel. ``viscy train`` writes it into
``best_model.pt`` next to the weights (``{"state_dict": ..., "viscy_model_card": {...}}``, readable with
``torch.load(weights_only=True)``); ``viscy export`` copies it into the ONNX file's metadata; ``viscy predict``
and serving read it from either, so nothing is retyped. No torch import here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from viscy.errors import ModelError
from viscy.models.registry import ModelSpec

CARD_KEY = "viscy_model_card"
CARD_FORMAT = "viscy-model-card/1"


@dataclass(frozen=True)
class ModelCard:
    """Everything besides the weights that export, prediction and serving need.

    Parameters
    ----------
    name
        Registry architecture (``unet2d``, ...) or preset (``VSCyto3D``, ...) to build.
    kwargs
        Constructor arguments (for a preset: its overrides).
    spec
        What the network accepts and returns.
    source_channels, target_channels
        Channel names in and out (targets are the source channels for FCMAE pre-training).
    normalization
        ``NormalizationConfig`` dicts (``channels``, ``level``, ``subtrahend``, ``divisor``) covering the sources
        and, where training normalised them, the targets.
    z_window_size, target_depth
        Input Z slices per sample and Z depth of the target the model was trained on.
    training
        Provenance: run name, epoch, metrics of the chosen checkpoint, git commit.
    """

    name: str
    kwargs: dict[str, Any]
    spec: ModelSpec
    source_channels: list[str]
    target_channels: list[str]
    normalization: list[dict[str, Any]] = field(default_factory=list)
    z_window_size: int = 1
    target_depth: int = 1
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.source_channels) != self.spec.in_channels:
            raise ModelError(
                f"model card: {len(self.source_channels)} source channel names {self.source_channels} for a model "
                f"with {self.spec.in_channels} input channel(s)"
            )
        if len(self.target_channels) != self.spec.out_channels:
            raise ModelError(
                f"model card: {len(self.target_channels)} target channel names {self.target_channels} for a model "
                f"with {self.spec.out_channels} output channel(s)"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (what is stored in checkpoints and ONNX metadata)."""
        out = asdict(self)
        out["format"] = CARD_FORMAT
        # JSON round trip: tuples become lists, so the dict loads with torch's weights-only unpickler.
        return json.loads(json.dumps(out, default=str))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "model card") -> ModelCard:
        """Inverse of :meth:`to_dict`; raises :class:`ModelError` naming ``source`` when malformed."""
        try:
            fields = {k: v for k, v in data.items() if k != "format"}
            fields["spec"] = ModelSpec(**fields["spec"])
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ModelError(f"{source} is malformed ({exc}); re-create it with `viscy train`") from None

    @property
    def normalization_by_channel(self) -> dict[str, dict[str, str]]:
        """``{channel: {level, subtrahend, divisor}}`` for every channel a group names explicitly."""
        out: dict[str, dict[str, str]] = {}
        for group in self.normalization:
            for ch in group.get("channels") or []:
                out.setdefault(ch, {k: group[k] for k in ("level", "subtrahend", "divisor") if k in group})
        return out

    def describe(self) -> str:
        """One line for consoles: name, channels and depths."""
        s = self.spec
        return (
            f"{self.name} ({s.architecture}): {', '.join(self.source_channels)} -> {', '.join(self.target_channels)}, "
            f"Z {s.in_depth}->{s.out_depth}, YX multiple {s.yx_multiple}"
        )
