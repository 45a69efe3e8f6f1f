"""Schema of ``viscy predict``."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from viscy.config import PathList, StrictModel, StrList
from viscy.data.config import RENAMED_CHANNEL_KEYS, NormalizationConfig
from viscy.models.config import ModelConfig
from viscy.segment.config import SegmenterConfig


class PredictSegmentConfig(SegmenterConfig):
    """``viscy predict``'s segmentation stage: the segmenter of ``evaluate`` and ``serve`` plus what to segment,
    what to measure, and the stage's own Ray actors."""

    channels: StrList | None = Field(
        None, description="Predicted target channels to segment (e.g. Nuclei); null: the first target channel."
    )
    dims: Literal["2d", "3d"] = Field(
        "2d", description="2d: each Z slice on its own (ids unique per FOV and time point); 3d: the stack as a volume."
    )
    measure_channels: StrList = Field(
        [], description="Input channels whose mean intensity inside each object goes into the object table."
    )
    num_actors: int = Field(1, ge=1, description="Segmentation actors (each builds the segmenter once).")
    num_cpus_per_actor: float = Field(
        1.0, gt=0, description="CPUs reserved (and torch threads) per segmentation actor."
    )
    num_gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs per segmentation actor (a fraction shares one, e.g. 0.5 for Cellpose)."
    )

    @model_validator(mode="after")
    def _gpus(self) -> PredictSegmentConfig:
        if self.num_gpus_per_actor > 1 and not float(self.num_gpus_per_actor).is_integer():
            raise ValueError("segment.num_gpus_per_actor above 1 must be a whole number of GPUs (Ray's rule)")
        if self.gpu is True and self.num_gpus_per_actor == 0:
            raise ValueError(
                "segment.gpu: true needs a GPU for the segmentation actors: set segment.num_gpus_per_actor (e.g. "
                "0.5), or gpu: auto / false"
            )
        return self


class PredictConfig(StrictModel):
    """``viscy predict``: whole plates through a torch or ONNX model on Ray Data, resumable."""

    renamed_keys: ClassVar[dict[str, str]] = RENAMED_CHANNEL_KEYS

    data_path: PathList = Field(description="One or more OME-Zarr HCS plates (or FOV paths inside them).")
    positions: StrList = Field(["*"], description="FOV name patterns (fnmatch) to predict.")
    model: ModelConfig | None = Field(None, description="Torch model (architecture or preset plus checkpoint).")
    onnx: Path | None = Field(
        None,
        description="Exported ONNX file (its metadata gives channels and depths), or a bioimage.io model package "
        "(.zip or folder: its description gives channels, axes, sizes and its own pre/postprocessing).",
    )
    output: Path | None = Field(
        None,
        description="New OME-Zarr store; null appends '<target>_prediction' channels to the input plate. "
        "With several plates: a directory receiving one store per plate.",
    )
    overwrite: bool = Field(False, description="Replace existing predictions (else a rerun resumes the same job).")
    ngff_version: Literal["auto", "0.4", "0.5"] = Field(
        "auto",
        description="NGFF version of a new output store: auto keeps the input plate's (0.4: zarr v2, 0.5: zarr v3); "
        "appending keeps the plate's.",
    )
    source_channels: StrList | None = Field(None, description="Input channels; default from the preset/ONNX.")
    target_channels: StrList | None = Field(None, description="Predicted channels; default from the preset/ONNX.")
    normalization: list[NormalizationConfig] | None = Field(
        None, description="Normalisation; default from the preset/ONNX, else fov median/iqr of the sources."
    )
    denormalize: bool = Field(False, description="Rescale predictions with the target channels' stored statistics.")
    tile_yx: tuple[int, int] | None = Field(None, description="YX tile size; null predicts whole FOVs.")
    tile_overlap: float = Field(0.25, ge=0, lt=1, description="Fraction of a tile overlapping its neighbour.")
    blend: Literal["gaussian", "constant"] = Field("gaussian", description="Tile merge weights.")
    tta: Literal["none", "rot90", "flips", "all"] = Field("none", description="Test-time augmentation.")
    tta_reduction: Literal["mean", "median"] = Field("mean", description="Reduction of the TTA predictions.")
    z_stride: int = Field(1, ge=1, description="Stride of the Z windows of 3D models (1 = VisCy).")
    z_block: int | None = Field(8, ge=1, description="Output Z slices per task (bounds memory); null: whole stack.")
    num_actors: int = Field(1, ge=1, description="Model replicas (Ray actors), each loading the model once.")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved (and torch threads) per actor.")
    batch_size: int = Field(4, ge=1, description="Tiles per model call.")
    use_gpu: Literal["auto"] | bool = Field("auto", description="One GPU per actor: auto uses one if the cluster has.")
    progress: bool = Field(True, description="Show a progress bar.")
    segment: PredictSegmentConfig | None = Field(
        None,
        description="Segment predicted channels in the same pass (NGFF label images '<channel>_masks' next to the "
        "predictions and a per-object table viscy_objects.parquet/.csv); null: off.",
    )

    @field_validator("tile_yx")
    @classmethod
    def _tile_positive(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and min(v) < 8:
            raise ValueError("tile_yx must be at least 8 x 8")
        return v

    @model_validator(mode="after")
    def _one_model(self) -> PredictConfig:
        if (self.model is None) == (self.onnx is None):
            raise ValueError("set exactly one of 'model' (torch) and 'onnx' (exported file)")
        return self
