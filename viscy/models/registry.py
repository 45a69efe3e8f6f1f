"""Model registry: architecture name -> constructor, plus the input constraint every model declares.

This module does not import torch; built-in architectures are resolved lazily so that config
validation (``viscy.config.ModelConfig``) can list names cheaply.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from viscy.errors import ModelError


@dataclass(frozen=True)
class ModelSpec:
    """What a model accepts and returns; tiling, serving and export read this instead of guessing.

    Input is ``(B, in_channels, in_depth, Y, X)`` with Y and X multiples of ``yx_multiple``; output is
    ``(B, out_channels, out_depth, Y, X)``.
    """

    architecture: str
    in_channels: int
    out_channels: int
    in_depth: int
    out_depth: int
    yx_multiple: int

    def check_input(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`~viscy.errors.ModelError` unless ``shape`` is a valid input shape."""
        if len(shape) != 5:
            raise ModelError(f"{self.architecture}: expected (B, C, Z, Y, X) input, got shape {tuple(shape)}")
        _, c, z, y, x = shape
        problems = []
        if c != self.in_channels:
            problems.append(f"{c} channels (expected {self.in_channels})")
        if z != self.in_depth:
            problems.append(f"Z depth {z} (expected {self.in_depth})")
        if y % self.yx_multiple or x % self.yx_multiple:
            problems.append(f"YX {y}x{x} (must be multiples of {self.yx_multiple}; pad first)")
        if problems:
            raise ModelError(f"{self.architecture}: invalid input {tuple(shape)}: " + ", ".join(problems))

    def check_data(
        self,
        source_channels: Sequence[str],
        target_channels: Sequence[str],
        z_window_size: int,
        target_depth: int,
        yx_patch_size: Sequence[int],
        target_key: str = "data.target_channel",
    ) -> list[str]:
        """Problems (empty if none) feeding this model with the given data settings; each names keys and a fix."""
        problems = []
        n_src, n_tgt = len(source_channels), len(target_channels)
        if self.in_channels != n_src:
            problems.append(
                f"the model takes {self.in_channels} input channel(s) but data.source_channel lists {n_src} "
                f"({', '.join(source_channels)}); set --model.kwargs.in_channels {n_src} or list "
                f"{self.in_channels} source channel(s)"
            )
        if self.out_channels != n_tgt:
            problems.append(
                f"the model predicts {self.out_channels} channel(s) but {target_key} lists {n_tgt} "
                f"({', '.join(target_channels)}); set --model.kwargs.out_channels {n_tgt} or list "
                f"{self.out_channels} target channel(s)"
            )
        if self.in_depth != z_window_size:
            problems.append(
                f"the model takes {self.in_depth} Z slice(s) but data.z_window_size is {z_window_size}; set "
                f"--data.z_window_size {self.in_depth} or --model.kwargs.in_stack_depth {z_window_size}"
            )
        elif self.out_depth != target_depth:
            fix = "--data.target_2d true" if self.out_depth == 1 else "--data.target_2d false"
            problems.append(
                f"the model predicts {self.out_depth} Z slice(s) but the target has {target_depth} (data.target_2d, "
                f"data.z_window_size {z_window_size}); set {fix}"
            )
        y, x = (int(v) for v in yx_patch_size)
        if y % self.yx_multiple or x % self.yx_multiple:
            py, px = self.padded_yx(y, x)
            problems.append(
                f"data.yx_patch_size {y}x{x} is not a multiple of the model's YX multiple {self.yx_multiple}; "
                f"set --data.yx_patch_size {py} {px}"
            )
        return problems

    def padded_yx(self, y: int, x: int) -> tuple[int, int]:
        """Smallest valid (Y, X) that is >= the given size."""
        m = self.yx_multiple
        return -(-y // m) * m, -(-x // m) * m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_BUILTIN: dict[str, str] = {
    "unet2d": "viscy.models.unet:UNet2D",
    "unet25d": "viscy.models.unet:UNet25D",
    "unet3d": "viscy.models.unet:UNet3D",
    "unext2": "viscy.models.unext2:UNeXt2",
    "fcmae": "viscy.models.fcmae:FullyConvolutionalMAE",
}
_REGISTRY: dict[str, Callable[..., Any]] = {}

# Tiny configurations of every built-in architecture (seconds to build, export and run on a CPU);
# for tests of tiling, serving and export elsewhere in the code base.
TINY_KWARGS: dict[str, dict[str, Any]] = {
    "unet2d": {"in_channels": 2, "out_channels": 3, "num_blocks": 3, "num_filters": 4},
    "unet25d": {"in_channels": 1, "out_channels": 2, "in_stack_depth": 3, "num_blocks": 3, "num_filters": 4},
    "unet3d": {"in_channels": 1, "out_channels": 2, "in_stack_depth": 4, "num_blocks": 3, "num_filters": 4},
    "unext2": {
        "in_channels": 1,
        "out_channels": 2,
        "in_stack_depth": 4,
        "stem_kernel_size": (2, 4, 4),
        "backbone": "convnextv2_atto",
        "backbone_kwargs": {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)},
        "decoder_conv_blocks": 1,
        "head_expansion_ratio": 1,
        "head_pool": True,
    },
    "fcmae": {
        "in_channels": 1,
        "out_channels": 2,
        "encoder_blocks": (1, 1, 1, 1),
        "dims": (16, 32, 64, 128),
        "stem_kernel_size": (2, 2, 2),
        "in_stack_depth": 4,
        "decoder_conv_blocks": 1,
        "pretraining": False,
    },
}


def tiny_kwargs(name: str) -> dict[str, Any]:
    """A deep copy of the tiny kwargs of built-in architecture ``name``."""
    import copy

    if name not in TINY_KWARGS:
        raise ModelError(f"no tiny configuration for {name!r}; choose from: {', '.join(TINY_KWARGS)}")
    return copy.deepcopy(TINY_KWARGS[name])


def register_model(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a constructor (class or function) under ``name``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise ModelError(f"model {name!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Registered architecture names (built-in and user-registered), sorted."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_model_class(name: str) -> Callable[..., Any]:
    """The constructor registered under ``name``."""
    key = name.lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in _BUILTIN:
        module, _, attr = _BUILTIN[key].partition(":")
        fn = getattr(importlib.import_module(module), attr)
        _REGISTRY.setdefault(key, fn)
        return fn
    raise ModelError(f"unknown model {name!r}; choose from: {', '.join(list_models())}")


def model_kwargs(name: str) -> dict[str, Any]:
    """Constructor keyword arguments of ``name`` with their defaults (``inspect.Parameter.empty`` if none)."""
    sig = inspect.signature(get_model_class(name))
    return {p.name: p.default for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


# Constructor arguments that describe the data rather than the network, and the ModelSpec field each sets.
DATA_KWARGS = {"in_channels": "in_channels", "out_channels": "out_channels", "in_stack_depth": "in_depth",
               "out_stack_depth": "out_depth"}


def fit_to_data(name: str, kwargs: dict[str, Any], **shape: int) -> dict[str, Any]:
    """``kwargs`` of architecture ``name`` with the data arguments it leaves out taken from the data.

    ``shape`` holds ``in_channels``, ``out_channels``, ``in_depth`` and ``out_depth``. Given arguments are kept
    (a mismatch is then reported by :meth:`ModelSpec.check_data`); an architecture may complete others that
    depend on them (its ``fit_kwargs``, e.g. UNeXt2's stem for the Z window).
    """
    accepts = model_kwargs(name)
    out = dict(kwargs)
    for key, field in DATA_KWARGS.items():
        if key in accepts and key not in out:
            out[key] = int(shape[field])
    fit = getattr(get_model_class(name), "fit_kwargs", None)
    return fit(out) if fit is not None else out


def create_architecture(name: str, **kwargs: Any):
    """Build registered architecture ``name``; unknown kwargs raise :class:`ModelError`."""
    cls = get_model_class(name)
    allowed = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ModelError(f"{name}: unknown argument(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        return cls(**kwargs)
    except ModelError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{name}: cannot build with {kwargs}: {exc}") from exc
