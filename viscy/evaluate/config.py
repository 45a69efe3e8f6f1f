"""Schema of ``viscy evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from viscy.config import StrictModel, StrList
from viscy.data.config import RENAMED_CHANNEL_KEYS, NormalizationConfig
from viscy.segment.config import SegmenterConfig


class SegmentationConfig(SegmenterConfig):
    """How instances are segmented for ``viscy evaluate``'s segmentation metrics."""

    channel: str | None = Field(
        None, description="Target channel to segment (its prediction is segmented too); None: the first target channel."
    )
    use_ground_truth_labels: str | None = Field(
        None, description="Label image (e.g. 'nuclei') used as reference masks instead of segmenting the target."
    )


class EvaluateConfig(StrictModel):
    """Score predicted channels against targets: regression and instance-segmentation metrics."""

    renamed_keys: ClassVar[dict[str, str]] = RENAMED_CHANNEL_KEYS

    data_path: Path = Field(description="OME-Zarr HCS plate holding the targets (and predictions by default).")
    prediction_path: Path | None = Field(
        None, description="Plate holding the predictions (same positions); None: predictions are in data_path."
    )
    positions: StrList = Field(["*"], description="FOV name patterns (fnmatch) to evaluate.")
    target_channels: StrList | None = Field(
        None,
        min_length=1,
        description="Target channels; None: every <target><prediction_suffix> channel of the prediction plate.",
    )
    prediction_suffix: str = Field("_prediction", description="Prediction channel = target channel + suffix.")
    source_channels: StrList | None = Field(
        None,
        description="Input channels; the first is shown in example panels. None: the prediction job's sources "
        "that the plate holds (if any).",
    )
    prediction_units: Literal["auto", "normalized", "raw"] = Field(
        "auto",
        description="Units of the predictions: auto reads the metadata `viscy predict` stores; set normalized or "
        "raw for predictions written by other tools (normalized: the targets are normalised to match).",
    )
    target_normalization: list[NormalizationConfig] | None = Field(
        None,
        description="How targets are normalised when prediction_units is normalized and the predictions carry "
        "no viscy metadata; None: fov_statistics median/iqr (VisCy's default).",
    )
    z_slices: Literal["center", "all"] = Field("center", description="Score the centre Z slice or every slice.")
    segmentation: SegmentationConfig | None = Field(None, description="Segmentation metrics; null disables them.")
    output_dir: Path = Field(Path("evaluation"), description="Directory for tables, summary JSON and figures.")
    num_example_panels: int = Field(2, ge=0, description="FOVs drawn as example panels.")
    num_cpus_per_task: float = Field(1.0, gt=0, description="CPUs reserved by each per-FOV/time-point Ray task.")
