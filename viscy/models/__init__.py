"""Model registry and architectures: one interface ``(B, C_in, Z, Y, X) -> (B, C_out, Z_out, Y, X)``.

>>> from viscy.models import create_model
>>> model = create_model("VSCyto3D", checkpoint="epoch=48-step=18130.ckpt")  # doctest: +SKIP
>>> model.spec.yx_multiple  # doctest: +SKIP
32

Architectures: ``unet2d``, ``unet25d``, ``unet3d``, ``unext2``, ``fcmae``; presets: ``VSCyto2D``,
``VSCyto3D``, ``VSNeuromast``. Heavy modules (torch, timm, MONAI) load on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from viscy.errors import ModelError
from viscy.models.presets import Preset, get_preset, is_preset, list_presets
from viscy.models.registry import ModelSpec, get_model_class, list_models, model_kwargs, register_model

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ModelError",
    "ModelSpec",
    "Preset",
    "create_model",
    "get_model_class",
    "get_preset",
    "get_spec",
    "is_preset",
    "list_models",
    "list_presets",
    "load_checkpoint",
    "model_kwargs",
    "register_model",
    "resolve_model",
]


def resolve_model(name: str, kwargs: dict[str, Any] | None = None) -> tuple[str, dict[str, Any], Preset | None]:
    """(architecture, constructor kwargs, preset or None) for a registry name or a preset name."""
    kwargs = dict(kwargs or {})
    if is_preset(name):
        preset = get_preset(name)
        return preset.architecture, preset.model_kwargs(**kwargs), preset
    get_model_class(name)  # raises ModelError listing the allowed names
    return name.lower(), kwargs, None


def create_model(name: str, checkpoint: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered architecture or a preset, optionally loading a checkpoint.

    Parameters
    ----------
    name
        Registry name (``list_models()``) or preset name (``list_presets()``).
    checkpoint
        Plain state dict or Lightning checkpoint to load strictly.
    **kwargs
        Constructor arguments (for a preset: overrides of its kwargs).
    """
    from viscy.models.registry import create_architecture

    arch, kw, preset = resolve_model(name, kwargs)
    model = create_architecture(arch, **kw)
    model.preset = preset  # type: ignore[attr-defined]
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def get_spec(model: nn.Module) -> ModelSpec:
    """The :class:`ModelSpec` a model declares."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, ModelSpec):
        raise ModelError(f"{type(model).__name__} declares no ModelSpec (attribute 'spec')")
    return spec


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a plain or Lightning checkpoint into ``model`` strictly (see :mod:`viscy.models.checkpoint`)."""
    from viscy.models.checkpoint import load_checkpoint as _load

    return _load(model, path)
