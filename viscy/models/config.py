"""Schemas of a model (``model`` sections) and of ``viscy export``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from viscy.config import StrictModel, StrList
from viscy.data.config import RENAMED_CHANNEL_KEYS, NormalizationConfig


class ModelConfig(StrictModel):
    """A model: registry architecture or named preset, constructor kwargs and optional weights."""

    name: str | None = Field(
        None,
        description="Architecture (unet2d, unet25d, unet3d, unext2, fcmae), preset (VSCyto2D, VSCyto3D, "
        "VSNeuromast), an installed package's entry point (group viscy.models) or the import path "
        "package.module:Class of a network of your own (importable on every node). Default: the model card of "
        "`checkpoint` (a best_model.pt written by viscy train); training without a checkpoint defaults to unext2.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Constructor arguments (for a preset: overrides of its own)."
    )
    checkpoint: Path | None = Field(
        None, description="best_model.pt from viscy train (self-describing), or a plain/Lightning state dict."
    )


class ExportConfig(StrictModel):
    """``viscy export``: write a model to ONNX with metadata and check it against torch."""

    renamed_keys: ClassVar[dict[str, str]] = RENAMED_CHANNEL_KEYS

    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="The model to export: --model.checkpoint runs/<run>/best_model.pt alone is enough.",
    )
    output: Path = Field(
        ..., description="File to write: .onnx (format onnx) or a .zip package (format bioimageio; '.zip' is added)."
    )
    format: Literal["onnx", "bioimageio"] = Field(
        "onnx",
        description="onnx: one ONNX file carrying the model card (viscy predict/serve). bioimageio: a bioimage.io "
        "model package (spec 0.5: ONNX + PyTorch weights, pre/postprocessing, test images from the training plate, "
        "cover, README) for napari, Fiji (deepImageJ), BiaPy and bioimageio.core, tested by bioimageio.core.",
    )
    overwrite: bool = Field(False, description="Replace an existing file that viscy exported (others are refused).")
    source_channels: StrList | None = Field(None, description="Input channel names; default: the model card/preset.")
    target_channels: StrList | None = Field(None, description="Output channel names; default: the model card/preset.")
    normalization: list[NormalizationConfig] | None = Field(
        None, description="Normalisation recorded in the file; default: the model card's/preset's."
    )
    opset: int = Field(18, ge=18, description="ONNX opset (>= 18).")
    example_yx: tuple[int, int] = Field(
        (256, 256), description="YX size used for tracing and the parity check (rounded up to the model's multiple)."
    )
    check_parity: bool = Field(True, description="Compare onnxruntime with torch at example_yx.")
    data_path: Path | None = Field(
        None,
        description="bioimageio: the plate whose dataset statistics and held-out FOV the package uses; default: the "
        "training plate named in the run's viscy_config.yaml (beside best_model.pt).",
    )
    name: str | None = Field(None, description="bioimageio: the package's name; default: viscy <model> <targets>.")
    description: str | None = Field(None, description="bioimageio: one sentence; default: what it predicts from what.")
    authors: StrList = Field(["viscy user"], description="bioimageio: the model's authors (names).")
    license: str = Field("CC-BY-4.0", description="bioimageio: an SPDX license id for the weights.")
    version: str = Field("0.1.0", description="bioimageio: the package's version.")

    @field_validator("example_yx")
    @classmethod
    def _positive_yx(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"example_yx must be positive, got {value}")
        return value
