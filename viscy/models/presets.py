"""Named presets of VisCy's published virtual-staining models (architecture, kwargs, channels, normalisation).

A preset carries everything prediction needs besides the weights, so a config can say
``model: VSCyto3D`` plus a checkpoint path. No torch import here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from viscy.errors import ModelError

_PHASE_NORM = [{"channels": ["Phase3D"], "level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"}]
# UNeXt2 settings shared by VisCy's 3D presets; each adds its depth and stem kernel.
_UNEXT2_KWARGS = {
    "in_channels": 1,
    "out_channels": 2,
    "backbone": "convnextv2_tiny",
    "decoder_mode": "pixelshuffle",
    "head_expansion_ratio": 4,
    "head_pool": True,
}


@dataclass(frozen=True)
class Preset:
    """A published model: how to build it and what data it expects."""

    name: str
    architecture: str
    kwargs: dict[str, Any]
    source_channels: list[str]
    target_channels: list[str]
    z_window_size: int
    out_depth: int
    normalization: list[dict[str, Any]]  # NormalizationConfig dicts
    description: str = ""
    checkpoint_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def model_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Constructor kwargs (a copy), with ``overrides`` applied."""
        kw = copy.deepcopy(self.kwargs)
        kw.update(overrides)
        return kw


_PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="VSCyto2D",
            architecture="fcmae",
            kwargs={
                "in_channels": 1,
                "out_channels": 2,
                "encoder_blocks": [3, 3, 9, 3],
                "dims": [96, 192, 384, 768],
                "decoder_conv_blocks": 2,
                "stem_kernel_size": [1, 2, 2],
                "in_stack_depth": 1,
                "pretraining": False,
            },
            source_channels=["Phase3D"],
            target_channels=["Nuclei", "Membrane"],
            z_window_size=1,
            out_depth=1,
            normalization=copy.deepcopy(_PHASE_NORM),
            description="2D virtual staining of nuclei and membrane from phase (FCMAE-pretrained UNeXt2_2D).",
            checkpoint_name="VSCyto2D/epoch=399-step=23200.ckpt",
        ),
        Preset(
            name="VSCyto3D",
            architecture="unext2",
            kwargs=dict(_UNEXT2_KWARGS, in_stack_depth=5, stem_kernel_size=[5, 4, 4]),
            source_channels=["Phase3D"],
            target_channels=["Nuclei", "Membrane"],
            z_window_size=5,
            out_depth=5,
            normalization=copy.deepcopy(_PHASE_NORM),
            description="3D virtual staining of nuclei and membrane in cultured cells (UNeXt2, 5-slice window).",
            checkpoint_name="VSCyto3D/epoch=48-step=18130.ckpt",
        ),
        Preset(
            name="VSNeuromast",
            architecture="unext2",
            kwargs=dict(_UNEXT2_KWARGS, in_stack_depth=21, stem_kernel_size=[7, 4, 4]),
            source_channels=["Phase3D"],
            target_channels=["Nuclei", "Membrane"],
            z_window_size=21,
            out_depth=21,
            normalization=copy.deepcopy(_PHASE_NORM),
            description="3D virtual staining of nuclei and membrane in zebrafish neuromasts (UNeXt2, 21 slices).",
            checkpoint_name="VSNeuromast/epoch=44-step=1215.ckpt",
        ),
    )
}


def list_presets() -> list[str]:
    """Names of the built-in presets."""
    return list(_PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive)."""
    for key, preset in _PRESETS.items():
        if key.lower() == name.lower():
            return preset
    raise ModelError(f"unknown preset {name!r}; choose from: {', '.join(_PRESETS)}")


def is_preset(name: str) -> bool:
    return any(key.lower() == name.lower() for key in _PRESETS)
