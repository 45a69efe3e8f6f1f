"""Self-describing models: the card that travels with the weights from training to export, predict and serve.

A :class:`ModelCard` says how to build the network (registry or preset name and kwargs), what it accepts
(its :class:`~viscy.models.registry.ModelSpec`, with the Z window and output depth), which channels go in
and come out, and the normalisation of every channel. ``viscy train`` writes it into ``best_model.pt`` next
to the weights (``{"state_dict": ..., "viscy_model_card": {...}}``, readable with
``torch.load(weights_only=True)``); ``viscy export`` writes it into the ONNX file's metadata
(``viscy.model_card``). :func:`viscy.models.read_card` reads it back from either, so nothing is retyped. No torch import
here.

Formats: ``viscy-model-card/2`` is written. ``viscy-model-card/1`` (viscy before the naming pass: the spec's
Z window was ``in_depth``, and the card repeated it as ``z_window_size`` next to a ``target_depth``) and ONNX
files exported before the card was stored whole (flat ``viscy.in_depth``, ``viscy.source_channels``, ...
keys) are still read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from viscy.errors import ModelError
from viscy.models.registry import ModelSpec

CARD_KEY = "viscy_model_card"  # key of the card in a checkpoint
CARD_FORMAT = "viscy-model-card/2"
_OLD_FORMATS = ("viscy-model-card/1",)
ONNX_PREFIX = "viscy."  # prefix of viscy's keys in an ONNX file's metadata_props
ONNX_CARD_KEY = ONNX_PREFIX + "model_card"


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
        What the network accepts and returns (channels, ``z_window_size``, ``out_depth``, YX multiple).
    source_channels, target_channels
        Channel names in and out (targets are the source channels for FCMAE pre-training). Empty when
        unknown: an architecture exported without a card or names; ``viscy predict`` then asks for them.
    normalization
        ``NormalizationConfig`` dicts (``channels``, ``level``, ``subtrahend``, ``divisor``) covering the sources
        and, where training normalised them, the targets.
    training
        Provenance: run name, epoch, metrics of the chosen checkpoint, git commit.
    """

    name: str
    kwargs: dict[str, Any]
    spec: ModelSpec
    source_channels: list[str]
    target_channels: list[str]
    normalization: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what, names, n in (
            ("source", self.source_channels, self.spec.in_channels),
            ("target", self.target_channels, self.spec.out_channels),
        ):
            if names and len(names) != n:
                where = "input" if what == "source" else "output"
                raise ModelError(
                    f"model card: {len(names)} {what} channel names {list(names)} for a model with {n} {where} "
                    "channel(s)"
                )

    @property
    def z_window_size(self) -> int:
        """Z slices per input sample (the spec's)."""
        return self.spec.z_window_size

    @property
    def names_channels(self) -> bool:
        """Whether the card names both its source and its target channels."""
        return bool(self.source_channels and self.target_channels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (what is stored in checkpoints and ONNX metadata)."""
        out = asdict(self)
        out["format"] = CARD_FORMAT
        # JSON round trip: tuples become lists, so the dict loads with torch's weights-only unpickler.
        return json.loads(json.dumps(out, default=str))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "model card") -> ModelCard:
        """Inverse of :meth:`to_dict`, also for cards of earlier formats; :class:`ModelError` names ``source``."""
        fields = dict(data)
        fmt = fields.pop("format", None)
        if fmt in _OLD_FORMATS or fmt is None:
            fields = _upgrade_v1(fields)
        elif fmt != CARD_FORMAT:
            raise ModelError(
                f"{source} has format {fmt!r}; this viscy reads {CARD_FORMAT} and earlier. Upgrade viscy to read it"
            )
        try:
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
        """One line for consoles: name (and architecture, where it differs), channels and depths."""
        s = self.spec
        channels = (
            f"{', '.join(self.source_channels)} -> {', '.join(self.target_channels)}"
            if self.names_channels
            else f"{s.in_channels} -> {s.out_channels} unnamed channel(s)"
        )
        depths = f"Z {s.z_window_size}->{s.out_depth}, YX multiple {s.yx_multiple}"
        label = self.name if s.architecture == self.name else f"{self.name} ({s.architecture})"
        return f"{label}: {channels}, {depths}"


def _upgrade_v1(fields: dict[str, Any]) -> dict[str, Any]:
    """A ``viscy-model-card/1`` dict in the current layout (its depth copies dropped, ``in_depth`` renamed)."""
    fields = {k: v for k, v in fields.items() if k not in ("z_window_size", "target_depth")}
    spec = fields.get("spec")
    if isinstance(spec, Mapping) and "in_depth" in spec:
        spec = dict(spec)
        spec["z_window_size"] = spec.pop("in_depth")
        fields["spec"] = spec
    return fields


def card_for_model(
    name: str, kwargs: Mapping[str, Any], spec: ModelSpec, checkpoint_card: ModelCard | None = None
) -> ModelCard:
    """The card of ``name`` built with ``kwargs`` (whose spec is ``spec``).

    A checkpoint's card that describes exactly this network is returned as is. Otherwise channel names,
    normalisation and provenance come from ``checkpoint_card``, else from the preset ``name``; channel names
    whose count does not fit ``spec`` are left unknown (empty) rather than guessed.
    """
    if checkpoint_card is not None and (checkpoint_card.name, checkpoint_card.kwargs, checkpoint_card.spec) == (
        name,
        dict(kwargs),
        spec,
    ):
        return checkpoint_card
    from viscy.models.presets import get_preset, is_preset

    base = checkpoint_card or (get_preset(name) if is_preset(name) else None)
    sources = list(base.source_channels) if base else []
    targets = list(base.target_channels) if base else []
    return ModelCard(
        name=name,
        kwargs=dict(kwargs),
        spec=spec,
        source_channels=sources if len(sources) == spec.in_channels else [],
        target_channels=targets if len(targets) == spec.out_channels else [],
        normalization=[dict(n) for n in base.normalization] if base else [],
        training=dict(checkpoint_card.training) if checkpoint_card else {},
    )


# ----------------------------------------------------------------------------------------------- ONNX
def onnx_metadata_props(card: ModelCard) -> dict[str, str]:
    """The metadata_props ``viscy export`` writes: the card (JSON) and the input layout."""
    return {ONNX_CARD_KEY: json.dumps(card.to_dict()), ONNX_PREFIX + "input_layout": "BCZYX"}


def card_from_onnx_props(props: Mapping[str, str], source: str = "ONNX metadata") -> ModelCard | None:
    """The card in an exported file's metadata_props (None if it has no viscy keys).

    Files exported before the card was stored whole carry flat keys (``viscy.architecture``,
    ``viscy.in_depth``, ``viscy.source_channels`` when known, normalisation as ``{channel: spec}`` in the
    first exports); the card is rebuilt from them.
    """
    meta = {k[len(ONNX_PREFIX) :]: v for k, v in props.items() if k.startswith(ONNX_PREFIX)}
    if not meta:
        return None
    try:
        if "model_card" in meta:
            return ModelCard.from_dict(json.loads(meta["model_card"]), source=source)
        spec = ModelSpec(
            architecture=meta["architecture"],
            in_channels=int(meta["in_channels"]),
            out_channels=int(meta["out_channels"]),
            z_window_size=int(meta["z_window_size"] if "z_window_size" in meta else meta["in_depth"]),
            out_depth=int(meta["out_depth"]),
            yx_multiple=int(meta["yx_multiple"]),
        )
        norm = json.loads(meta.get("normalization") or "[]")
        if isinstance(norm, dict):  # the first exports: {channel: {level, subtrahend, divisor}}
            norm = [{"channels": [ch], **group} for ch, group in norm.items()]
        return ModelCard(
            name=meta.get("model_name") or spec.architecture,
            kwargs=json.loads(meta.get("kwargs") or "{}"),
            spec=spec,
            source_channels=json.loads(meta.get("source_channels") or "null") or [],
            target_channels=json.loads(meta.get("target_channels") or "null") or [],
            normalization=norm,
        )
    except KeyError as exc:
        raise ModelError(f"{source} lacks {exc}; re-export it with `viscy export`") from None
    except (ValueError, TypeError) as exc:  # JSON or int parsing
        raise ModelError(f"{source} is malformed ({exc}); re-export it with `viscy export`") from None


def read_onnx_props(path: str | Path) -> tuple[dict[str, str], int | None]:
    """An ONNX file's metadata_props and its ``ai.onnx`` opset (the weights are parsed but not kept)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX file {path} does not exist; export one with `viscy export`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"cannot read ONNX file {path}: {exc}") from exc
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    return {p.key: p.value for p in proto.metadata_props}, opsets.get("ai.onnx")


def read_onnx_card(path: Path) -> ModelCard:
    """The model card in an ONNX file's metadata (any viscy version's); use :func:`viscy.models.read_card`."""
    card = card_from_onnx_props(read_onnx_props(path)[0], source=f"metadata of {path}")
    if card is None:
        raise ModelError(f"{path} carries no viscy metadata; export it with `viscy export`")
    return card
