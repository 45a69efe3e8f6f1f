"""Model registry and architectures: one interface ``(B, C_in, Z, Y, X) -> (B, C_out, Z_out, Y, X)``.

>>> from viscy.models import create_model
>>> model = create_model("VSCyto3D", checkpoint="epoch=48-step=18130.ckpt")  # doctest: +SKIP
>>> model.spec.yx_multiple  # doctest: +SKIP
32

Architectures: ``unet2d``, ``unet25d``, ``unet3d``, ``unext2``, ``fcmae``; presets: ``VSCyto2D``,
``VSCyto3D``, ``VSNeuromast``; a network of one's own by import path (``package.module:Class``) or an
installed package's ``viscy.models`` entry point (:mod:`viscy.models.registry`). Heavy modules (torch, timm,
MONAI) load on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viscy.errors import ModelError
from viscy.models.card import ModelCard, read_onnx_card
from viscy.models.presets import Preset, get_preset, is_preset, list_presets
from viscy.models.registry import ModelSpec, get_model_class, list_models, model_kwargs, register_model

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ModelCard",
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
    "model_spec",
    "read_card",
    "register_model",
    "resolve_model",
    "resolve_model_source",
    "training_kwargs",
]


def resolve_model(name: str, kwargs: dict[str, Any] | None = None) -> tuple[str, dict[str, Any], Preset | None]:
    """(model name as a card stores it, constructor kwargs, preset or None) for any model name or a preset.

    Imports an import path's (or entry point's) module, so a name that cannot be built fails here.
    """
    from viscy.models.registry import canonical_name

    kwargs = dict(kwargs or {})
    if is_preset(name):
        preset = get_preset(name)
        return preset.architecture, preset.model_kwargs(**kwargs), preset
    get_model_class(name)  # raises ModelError saying what was tried
    return canonical_name(name), kwargs, None


def create_model(name: str, checkpoint: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered architecture or a preset, optionally loading a checkpoint.

    Parameters
    ----------
    name
        Registry name (``list_models()``), preset name (``list_presets()``) or import path
        ``package.module:Class`` of a network of one's own.
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


def model_spec(name: str, kwargs: dict[str, Any] | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of ``name`` built with ``kwargs``, without allocating weights.

    The network is constructed on torch's ``meta`` device, so every constructor check runs (invalid kwargs
    raise :class:`ModelError`) in well under a second even for large models.
    """
    import torch

    with torch.device("meta"):
        return get_spec(create_model(name, **dict(kwargs or {})))


def resolve_model_source(
    name: str | None, kwargs: dict[str, Any] | None, checkpoint: str | Path | None
) -> tuple[str, dict[str, Any], ModelCard | None]:
    """(name, kwargs, card) of a model given by name and/or a checkpoint that carries a model card.

    A self-describing checkpoint (``viscy train``'s ``best_model.pt``) supplies the name and kwargs; explicit
    ``kwargs`` override the card's. A plain state dict needs ``name``. The name returned is the one a card
    stores (:func:`~viscy.models.registry.canonical_name`).
    """
    from viscy.models.checkpoint import read_checkpoint_card
    from viscy.models.registry import canonical_name, same_model

    # model.checkpoint is torch weights: an ONNX file given there is refused here, with the fix
    card = read_checkpoint_card(checkpoint) if checkpoint is not None else None
    kwargs = dict(kwargs or {})
    if name is None:
        if card is None:
            where = f"checkpoint {checkpoint} holds weights only (no viscy model card)" if checkpoint else "no model"
            raise ModelError(
                f"{where}; set model.name (an architecture or preset: {', '.join(list_models() + list_presets())}; "
                "or package.module:Class) and model.kwargs, or use a best_model.pt written by `viscy train`"
            )
        return card.name, {**card.kwargs, **kwargs}, card
    if card is not None and same_model(card.name, name):
        kwargs = {**card.kwargs, **kwargs}
    # an entry point is stored as its import path, so the card rebuilds the model where the module imports
    return (name if is_preset(name) else canonical_name(name)), kwargs, card


def training_kwargs(
    name: str, kwargs: dict[str, Any], pretraining: bool, mask_ratio: float, data_shape: dict[str, int] | None = None
) -> dict[str, Any]:
    """Constructor kwargs for training.

    An architecture (not a preset, whose kwargs are complete) gets the data arguments the config leaves out
    from ``data_shape`` (``in_channels``, ``out_channels``, ``z_window_size``, ``out_depth``; see
    :func:`~viscy.models.registry.fit_to_data`). Models with a masked pre-training mode get it switched on or off.
    """
    from viscy.models.registry import fit_to_data

    arch, _, preset = resolve_model(name, kwargs)
    accepts = model_kwargs(arch)
    kwargs = dict(kwargs)
    if data_shape is not None and preset is None:
        kwargs = fit_to_data(arch, kwargs, **data_shape)
    if "pretraining" not in accepts:
        if pretraining:
            raise ModelError(f"{name} has no masked pre-training mode; trainer.fcmae.pretraining needs model fcmae")
        return kwargs
    kwargs["pretraining"] = pretraining
    if pretraining:
        kwargs["mask_ratio"] = mask_ratio
    return kwargs


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


# Readers of exported formats by file suffix (one line per new export format); anything else is a torch checkpoint.
CARD_READERS: dict[str, Callable[[Path], ModelCard]] = {".onnx": read_onnx_card}


def read_card(path: str | Path) -> ModelCard | None:
    """The model card of a checkpoint or an exported model, whichever viscy version wrote it.

    ``.onnx`` files are read from their metadata; anything else as a torch checkpoint (``best_model.pt`` of
    ``viscy train``, a Lightning ``.ckpt`` or a plain state dict) with ``torch.load(weights_only=True)``.

    Returns
    -------
    ModelCard or None
        None for a checkpoint that holds weights only (it needs ``model.name`` and kwargs to be used).

    Raises
    ------
    ModelError
        If the file is missing, unreadable, or an export without viscy metadata, or its card is malformed.
    """
    path = Path(path)
    reader = CARD_READERS.get(path.suffix.lower())
    if reader is not None:
        return reader(path)
    from viscy.models.checkpoint import read_checkpoint_card

    return read_checkpoint_card(path)
