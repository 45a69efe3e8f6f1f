"""One checkpoint loader for plain state dicts and Lightning checkpoints (VisCy's ``model.`` prefix)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from viscy.errors import ModelError
from viscy.models.card import CARD_KEY, ModelCard

_PREFIXES = ("model.", "module.", "_orig_mod.")


def _load(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist; check model.checkpoint")
    if path.suffix.lower() == ".zip":
        raise ModelError(
            f"{path} is a zip archive, not torch weights; a bioimage.io package goes to predict or serve as `onnx` "
            "(viscy.models.bioimageio.read_package_card reads its model card)"
        )
    if path.suffix.lower() == ".onnx":
        raise ModelError(
            f"{path} is an ONNX export, not torch weights; give it as `onnx` to predict or serve, or use the "
            "best_model.pt it was exported from"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all mean "unreadable"
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from exc


def read_checkpoint_card(path: str | Path) -> ModelCard | None:
    """The model card stored in a checkpoint (None for weights only); use :func:`viscy.models.read_card`."""
    obj = _load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get(CARD_KEY), Mapping):
        return ModelCard.from_dict(obj[CARD_KEY], source=f"model card of {path}")
    return None


def save_model(model_state: Mapping[str, Tensor], card: ModelCard, path: str | Path) -> Path:
    """Write weights and their model card as one file (``{"state_dict", "viscy_model_card"}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save({"state_dict": strip_prefixes(model_state), CARD_KEY: card.to_dict()}, tmp)
    tmp.replace(path)
    return path


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read the tensors of a checkpoint (``torch.load(weights_only=True)``), stripping wrapper prefixes.

    Accepts a plain state dict, ``{"state_dict": ...}`` (Lightning, or viscy's self-describing model) or
    ``{"model": ...}``.
    """
    obj = _load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint {path} holds no state dict (got {type(obj).__name__})")
    return strip_prefixes(obj)


def strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove a wrapper prefix (``model.``, ``module.``, ``_orig_mod.``) shared by every key."""
    out = dict(state)
    changed = True
    while changed and out:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def load_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str = "state dict") -> nn.Module:
    """Strictly load ``state`` into ``model``; mismatches raise :class:`ModelError` listing the keys."""
    state = strip_prefixes(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches ({len(wrong)}): {_short(wrong)}")
        raise ModelError(
            f"{source} does not match {type(model).__name__}: "
            + "; ".join(parts)
            + ". Check the architecture and its kwargs (e.g. in_stack_depth, out_channels)."
        )
    model.load_state_dict(state, strict=True)
    return model


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights from ``path`` into ``model`` (in place) and return it."""
    return load_state_dict(model, read_state_dict(path), source=f"checkpoint {path}")


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
