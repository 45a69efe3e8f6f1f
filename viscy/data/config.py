"""Schemas of the data stages: ``viscy synth``, ``viscy preprocess`` and the ``data`` section of training."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from viscy.config import PathList, StrictModel, StrList

# Channel-list keys were singular in earlier viscy versions; configs saved by them still load.
RENAMED_CHANNEL_KEYS = {"source_channel": "source_channels", "target_channel": "target_channels"}


class SynthConfig(StrictModel):
    """Synthetic HCS plate: cells, nuclei, membranes and a phase image derived from them."""

    output: Path = Field(Path("synthetic.zarr"), description="Path of the OME-Zarr plate to write.")
    rows: StrList = Field(["A"], description="Well row names.")
    cols: StrList = Field(["1", "2"], description="Well column names.")
    fovs_per_well: int = Field(2, ge=1, description="Fields of view per well.")
    t: int = Field(1, ge=1, description="Time points.")
    z: int = Field(1, ge=1, description="Z slices (1 writes a 2D plate).")
    yx: tuple[int, int] = Field((256, 256), description="Image size in Y and X (pixels).")
    cell_diameter: float = Field(28.0, gt=4, description="Mean cell diameter in pixels.")
    confluence: float = Field(0.7, gt=0, le=1, description="Fraction of the field covered by cells.")
    noise: float = Field(0.03, ge=0, description="Phase noise, relative to the phase signal range.")
    seed: int = Field(0, description="Seed; the same seed and config give byte-identical plates.")
    chunk_yx: int | None = Field(None, ge=16, description="YX chunk edge; default: whole image (VisCy's chunking).")
    overwrite: bool = Field(False, description="Replace an existing store at `output`.")

    @field_validator("yx")
    @classmethod
    def _yx_positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 32:
            raise ValueError("yx must be at least 32 x 32 pixels")
        return v


# ------------------------------------------------------------------------------------- preprocess
class ForegroundMaskConfig(StrictModel):
    """Foreground mask computed by Otsu thresholding one channel during preprocessing."""

    channel: str = Field(description="Channel thresholded to find cells, e.g. 'Nuclei' or 'Phase3D'.")
    smoothing_sigma: float = Field(2.0, ge=0, description="Gaussian sigma (pixels) applied before thresholding.")


class PreprocessConfig(StrictModel):
    """Normalisation statistics (and optional foreground masks) written into the plate's zattrs."""

    data_path: Path = Field(description="OME-Zarr HCS plate to annotate (pixel data are never modified).")
    channels: StrList | None = Field(None, description="Channels to compute statistics for; default all.")
    positions: StrList = Field(["*"], description="FOV name patterns (fnmatch), e.g. ['A/1/*'].")
    grid_spacing: int = Field(32, ge=1, description="Sample every N-th pixel in Y and X (VisCy: 32).")
    fg_mask: ForegroundMaskConfig | None = Field(None, description="Also write a foreground mask per FOV.")
    num_cpus_per_task: float = Field(1.0, gt=0, description="CPUs reserved by each per-FOV Ray task.")


# ------------------------------------------------------------------------------------------- data
class NormalizationConfig(StrictModel):
    """How one group of channels is normalised: ``(x - subtrahend) / divisor`` from stored statistics."""

    channels: StrList | None = Field(None, description="Channels this applies to; None means all others.")
    level: Literal["fov_statistics", "dataset_statistics"] = Field(
        "fov_statistics", description="Statistics level in the zattrs."
    )
    subtrahend: Literal["mean", "median"] = "median"
    divisor: Literal["std", "iqr"] = "iqr"


class AugmentationConfig(StrictModel):
    """YX augmentations of training patches, drawn per patch (a probability of 0 disables one)."""

    flip_prob: float = Field(0.5, ge=0, le=1, description="Probability of a flip along Y and along X.")
    rot90_prob: float = Field(0.5, ge=0, le=1, description="Probability of a random 90-degree YX rotation.")
    affine_prob: float = Field(0.5, ge=0, le=1, description="Probability of a random YX affine.")
    rotate_range: float = Field(3.14159, ge=0, description="Max rotation (radians) of the affine.")
    scale_range: tuple[float, float] = Field((0.8, 1.2), description="Zoom range of the affine.")
    shear_range: float = Field(0.05, ge=0, description="Max shear of the affine.")
    contrast_prob: float = Field(0.3, ge=0, le=1, description="Probability of a gamma contrast change.")
    contrast_gamma: tuple[float, float] = Field((0.8, 1.2), description="Gamma range.")
    intensity_scale_prob: float = Field(0.3, ge=0, le=1, description="Probability of an intensity scale.")
    intensity_scale_factors: float = Field(0.3, ge=0, description="Scale by 1 + U(-f, f).")
    noise_prob: float = Field(0.3, ge=0, le=1, description="Probability of Gaussian noise on the source.")
    noise_std: float = Field(0.2, ge=0, description="Std of the Gaussian noise (normalised units).")
    smooth_prob: float = Field(0.2, ge=0, le=1, description="Probability of Gaussian smoothing of the source.")
    smooth_sigma: tuple[float, float] = Field((0.25, 1.0), description="Sigma range (pixels) of the smoothing.")


class DataConfig(StrictModel):
    """Which plates, channels and patches a model sees."""

    renamed_keys: ClassVar[dict[str, str]] = RENAMED_CHANNEL_KEYS

    data_path: PathList = Field(description="One or more OME-Zarr HCS plates (or FOV paths inside them).")
    source_channels: StrList = Field(["Phase3D"], min_length=1, description="Input (label-free) channels.")
    target_channels: StrList = Field(["Nuclei", "Membrane"], min_length=1, description="Channels to predict.")
    positions: StrList = Field(["*"], description="FOV name patterns (fnmatch) to use.")
    z_window_size: int = Field(1, ge=1, description="Z slices per sample (the model's input depth).")
    target_2d: bool = Field(True, description="Target is the centre slice only (2D and 2.5D models).")
    yx_patch_size: tuple[int, int] = Field((256, 256), description="Patch size in Y and X.")
    normalization: list[NormalizationConfig] = Field(
        default_factory=lambda: [NormalizationConfig()], description="Normalisation per channel group."
    )
    augmentation: AugmentationConfig | None = Field(
        default_factory=AugmentationConfig, description="Training augmentations; null disables them."
    )
    patches_per_stack: int = Field(8, ge=1, description="Patches cut from each region read (VisCy idea).")
    reads_per_task: int = Field(
        8,
        ge=1,
        description="Most region reads per Ray Data read task (amortises Ray's per-task cost; "
        "never fewer tasks than cluster CPUs).",
    )
    fg_mask_min_fraction: float = Field(
        0.0, ge=0, le=1, description="Reject patches whose foreground fraction is below this (needs fg_mask)."
    )
    fg_weighted_crops: bool = Field(False, description="Centre crops on foreground pixels (needs fg_mask).")
    batch_size: int = Field(16, ge=1, description="Patches per batch per worker.")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="Fraction of FOVs held out for validation.")
    val_positions: StrList | None = Field(None, description="Explicit validation FOVs (overrides fraction).")
    split_seed: int = Field(0, description="Seed of the train/validation split by FOV.")

    @field_validator("yx_patch_size")
    @classmethod
    def _patch_positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 8:
            raise ValueError("yx_patch_size must be at least 8 x 8")
        return v

    def model_shape(self, pretraining: bool = False) -> dict[str, int]:
        """Channels and depths a model trained on this data takes and returns (pre-training: the sources)."""
        return {
            "in_channels": len(self.source_channels),
            "out_channels": len(self.source_channels if pretraining else self.target_channels),
            "z_window_size": self.z_window_size,
            "out_depth": 1 if self.target_2d else self.z_window_size,
        }

    @model_validator(mode="after")
    def _channels_disjoint(self) -> DataConfig:
        both = set(self.source_channels) & set(self.target_channels)
        if both:
            raise ValueError(f"channels {sorted(both)} are both source and target; use each channel once")
        return self
