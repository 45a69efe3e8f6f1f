"""One typed configuration schema for every stage, loaded from YAML with dotted overrides.

Every section is a strict pydantic model (unknown keys are rejected). ``load_config`` merges a YAML file
and command-line overrides such as ``--data.yx_patch_size 256 256`` and validates the result; errors name
the full key path and, where the field is an enumeration, the allowed values.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

CONFIG_FILENAME = "viscy_config.yaml"
# Validation-context key: False skips the model checks, which import torch and the model's libraries.
CHECK_MODEL = "check_model"


class ConfigError(ValueError):
    """A configuration could not be loaded or validated; the message names the key and the fix."""


def _as_list(value: Any) -> Any:
    """A single value given where a list is expected (``--positions A/1/0``, ``--cols 1``) becomes a one-item list."""
    return value if value is None or isinstance(value, (list, tuple, set, frozenset)) else [value]


StrList = Annotated[list[str], BeforeValidator(_as_list)]
PathList = Annotated[list[Path], BeforeValidator(_as_list)]


def _leaf_types(annotation: Any) -> list[Any]:
    """The members of ``X | None`` / ``Annotated[X, ...]`` (``None`` left out)."""
    if get_origin(annotation) is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return [m for a in get_args(annotation) for m in _leaf_types(a)]
    return [] if annotation is type(None) else [annotation]


def _coerce_scalar(value: Any, types: list[Any]) -> Any:
    """A number (or YAML date) where the schema wants a string, a path or a string choice becomes that string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, _dt.date)):
        return value
    text = value.isoformat() if isinstance(value, _dt.date) else str(value)
    for t in types:
        if t is str or (isinstance(t, type) and issubclass(t, Path)):
            return text
        if get_origin(t) is Literal and text in get_args(t):
            return text
    return value


def _coerce_field(annotation: Any, value: Any) -> Any:
    """Command-line friendly coercion of one field's input, decided by its annotation only."""
    types = _leaf_types(annotation)
    lists = [t for t in types if get_origin(t) is list]
    if lists and value is not None and not isinstance(value, (list, tuple, set, frozenset, dict)):
        value = [value]
    elif lists and isinstance(value, dict) and any(_submodel(get_args(t)[0]) for t in lists):
        value = [value]  # one section where a list of sections is expected (e.g. one normalization group)
    if lists and isinstance(value, (list, tuple)):
        item_types = [i for t in lists for i in _leaf_types(get_args(t)[0])]
        return [_coerce_scalar(v, item_types) for v in value]
    return _coerce_scalar(value, types)


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated.

    Values typed on the command line are parsed as YAML without knowing the schema, so every section
    coerces them generically: a number (or date) where a string, path or string choice is expected
    becomes that string (``--cols 1 2 3``, ``--trainer.run_name 2024``, ``--trainer.precision 32``), and a
    single value where a list is expected becomes a one-item list (``--cols 1``, ``--positions A/1/0``).
    Tuples of fixed length (``yx``) are not filled from one value: ``--yx 512`` is an error naming the
    number of values to give, because a silent square guess would hide a missing value.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _coerce_command_line_values(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            if name in out:
                out[name] = _coerce_field(field.annotation, out[name])
        return out


# --------------------------------------------------------------------------------------------- synth
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

    data_path: PathList = Field(description="One or more OME-Zarr HCS plates (or FOV paths inside them).")
    source_channel: StrList = Field(["Phase3D"], min_length=1, description="Input (label-free) channels.")
    target_channel: StrList = Field(["Nuclei", "Membrane"], min_length=1, description="Channels to predict.")
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
            "in_channels": len(self.source_channel),
            "out_channels": len(self.source_channel if pretraining else self.target_channel),
            "in_depth": self.z_window_size,
            "out_depth": 1 if self.target_2d else self.z_window_size,
        }

    @model_validator(mode="after")
    def _channels_disjoint(self) -> DataConfig:
        both = set(self.source_channel) & set(self.target_channel)
        if both:
            raise ValueError(f"channels {sorted(both)} are both source and target; use each channel once")
        return self


# --------------------------------------------------------------------------------------------- models
class ModelConfig(StrictModel):
    """A model: registry architecture or named preset, constructor kwargs and optional weights."""

    name: str | None = Field(
        None,
        description="Architecture (unet2d, unet25d, unet3d, unext2, fcmae) or preset (VSCyto2D, VSCyto3D, "
        "VSNeuromast). Default: the model card of `checkpoint` (a best_model.pt written by viscy train); "
        "training without a checkpoint defaults to unext2.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Constructor arguments (for a preset: overrides of its own)."
    )
    checkpoint: Path | None = Field(
        None, description="best_model.pt from viscy train (self-describing), or a plain/Lightning state dict."
    )

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str | None) -> str | None:
        from viscy.models.presets import is_preset, list_presets
        from viscy.models.registry import list_models

        if value is None:
            return value
        if value.lower() not in list_models() and not is_preset(value):
            allowed = list_models() + list_presets()
            raise ValueError(f"unknown model {value!r}; allowed: {', '.join(allowed)}")
        return value


class ExportConfig(StrictModel):
    """``viscy export``: write a model to ONNX with metadata and check it against torch."""

    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="The model to export: --model.checkpoint runs/<run>/best_model.pt alone is enough.",
    )
    output: Path = Field(..., description="Path of the .onnx file to write.")
    overwrite: bool = Field(False, description="Replace an existing file that viscy exported (others are refused).")
    source_channel: StrList | None = Field(None, description="Input channel names; default: the model card/preset.")
    target_channel: StrList | None = Field(None, description="Output channel names; default: the model card/preset.")
    normalization: list[NormalizationConfig] | None = Field(
        None, description="Normalisation recorded in the file; default: the model card's/preset's."
    )
    opset: int = Field(18, ge=18, description="ONNX opset (>= 18).")
    example_yx: tuple[int, int] = Field(
        (256, 256), description="YX size used for tracing and the parity check (rounded up to the model's multiple)."
    )
    check_parity: bool = Field(True, description="Compare onnxruntime with torch at example_yx.")

    @field_validator("example_yx")
    @classmethod
    def _positive_yx(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"example_yx must be positive, got {value}")
        return value


# ------------------------------------------------------------------------------------------- training
class FcmaeTrainConfig(StrictModel):
    """FCMAE pre-training (masked reconstruction of the source) or fine-tuning from a pre-trained encoder."""

    pretraining: bool = Field(False, description="Masked pre-training: reconstruct the source (model: fcmae).")
    mask_ratio: float = Field(0.5, ge=0, lt=1, description="Fraction of patches masked in pre-training.")
    encoder_checkpoint: Path | None = Field(
        None, description="Pre-trained FCMAE checkpoint whose encoder initialises the model (fine-tuning)."
    )


class TrainerConfig(StrictModel):
    """Optimisation, loss, precision, Ray Train scaling, checkpointing and fault tolerance."""

    max_epochs: int = Field(50, ge=1, description="Epochs to train (a resumed run continues up to this).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_epochs: int = Field(3, ge=0, description="Linear warm-up epochs of the WarmupCosine schedule.")
    schedule: Literal["WarmupCosine", "Constant"] = Field("WarmupCosine", description="Learning-rate schedule.")
    l1_alpha: float = Field(0.5, ge=0, description="Weight of the L1 loss.")
    l2_alpha: float = Field(0.0, ge=0, description="Weight of the L2 (MSE) loss.")
    ms_dssim_alpha: float = Field(0.5, ge=0, description="Weight of 1 - MS-SSIM (per YX slice).")
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        "32", description="Lightning precision; 16-mixed falls back to 32 on CPU with a warning."
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one DDP rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); false: CPU with gloo.")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs reserved per worker (leave some for Ray Data).")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker when use_gpu is true.")
    placement: Literal["pack", "spread", "strict_spread"] = Field(
        "pack",
        description="Where workers go: pack (fewest nodes), spread (different nodes where possible), "
        "strict_spread (one worker per node, or wait for nodes).",
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the latest checkpoint (-1: inf).")
    check_resources: bool = Field(
        True,
        description="Fail at once if the cluster cannot host the worker group (false: an autoscaling cluster "
        "will add the nodes).",
    )
    num_to_keep: int = Field(2, ge=1, description="Best checkpoints kept (by validation loss).")
    storage_path: str = Field(
        "runs",
        description="Directory or URI (s3://, gs://, file://) holding runs; on several nodes a shared filesystem "
        "or a URI.",
    )
    run_name: str | None = Field(None, description="Run name (storage_path/run_name); default: model + time.")
    resume: bool = Field(False, description="Continue the run storage_path/run_name from its last checkpoint.")
    log_every_n_epochs: int = Field(5, ge=1, description="Epochs between input/target/prediction figures.")
    fcmae: FcmaeTrainConfig = Field(default_factory=FcmaeTrainConfig)
    train_steps_per_epoch: int | None = Field(
        None, ge=1, description="Batches per worker per epoch; default: reads_per_fov reads of every train FOV."
    )
    val_steps: int | None = Field(None, ge=1, description="Validation batches per worker; default: all crops.")
    reads_per_fov: int = Field(
        4, ge=1, description="Region reads per training FOV per epoch (each cuts data.patches_per_stack patches)."
    )
    val_reads_per_fov: int = Field(2, ge=1, description="Fixed region reads per validation FOV.")
    seed: int = Field(42, description="Seed of weights initialisation and validation crops.")


class LoggingConfig(StrictModel):
    """Experiment tracking: Weights & Biases when enabled, TensorBoard otherwise."""

    wandb: bool = Field(False, description="Log to W&B (Lightning WandbLogger); false: TensorBoard.")
    project: str = Field("viscy", description="W&B project.")
    group: str | None = Field(None, description="W&B group.")
    run_name: str | None = Field(None, description="W&B run name; default: the trainer's run name.")
    offline: bool = Field(True, description="W&B offline mode (sync later with `wandb sync`).")


DEFAULT_TRAIN_MODEL = "unext2"


class TrainConfig(StrictModel):
    """``viscy train``: data, model, trainer and logging sections."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _resume_names_its_run(self) -> TrainConfig:
        if self.trainer.resume and self.trainer.run_name is None:
            raise ValueError("trainer.resume needs trainer.run_name (the run to continue)")
        return self

    @model_validator(mode="after")
    def _model_matches_data(self, info: ValidationInfo) -> TrainConfig:
        """The model's spec (built on the meta device, no weights) must fit the data section.

        Skipped under the validation context ``{"check_model": False}`` (:func:`load_config`'s first pass).
        """
        if (info.context or {}).get(CHECK_MODEL, True) is False:
            return self
        from viscy.errors import ModelError
        from viscy.models import model_spec, resolve_model_source, training_kwargs

        mc, data, fcmae = self.model, self.data, self.trainer.fcmae
        try:
            name, kwargs, _ = resolve_model_source(
                mc.name or (None if mc.checkpoint else DEFAULT_TRAIN_MODEL), mc.kwargs, mc.checkpoint
            )
            shape = data.model_shape(fcmae.pretraining)
            kwargs = training_kwargs(name, kwargs, fcmae.pretraining, fcmae.mask_ratio, shape)
            spec = model_spec(name, kwargs)
        except ModelError as exc:
            raise ValueError(f"model {mc.name or mc.checkpoint or DEFAULT_TRAIN_MODEL}: {exc}") from None
        targets, key = (
            (data.source_channel, "data.source_channel (pre-training reconstructs the sources)")
            if fcmae.pretraining
            else (data.target_channel, "data.target_channel")
        )
        target_depth = data.model_shape(fcmae.pretraining)["out_depth"]
        problems = spec.check_data(
            data.source_channel, targets, data.z_window_size, target_depth, data.yx_patch_size, key
        )
        if problems:
            raise ValueError(f"model {name} does not fit the data:\n    - " + "\n    - ".join(problems))
        return self


# ----------------------------------------------------------------------------------------------- tune
class SearchParam(StrictModel):
    """One searched key: exactly one of ``loguniform``, ``uniform``, ``int``, ``choice`` or ``fixed``."""

    loguniform: tuple[float, float] | None = Field(None, description="[low, high], sampled on a log scale.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], sampled uniformly.")
    int_range: tuple[int, int] | None = Field(
        None, alias="int", description="[low, high], an integer range (both ends included)."
    )
    choice: list[Any] | None = Field(None, min_length=1, description="Values to choose from (any YAML value).")
    fixed: Any = Field(None, description="Not searched: this value for every trial.")

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        kinds = ("loguniform", "uniform", "int", "choice", "fixed")
        if isinstance(data, dict) and len(data) == 1 and next(iter(data)) not in kinds:
            raise ValueError(f"unknown kind {next(iter(data))!r}; give one of {', '.join(kinds)}")
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(
                "give exactly one of loguniform: [low, high], uniform: [low, high], int: [low, high], "
                "choice: [v1, v2, ...], fixed: value"
            )
        return data

    @model_validator(mode="after")
    def _ordered(self) -> SearchParam:
        for kind, bounds in (("loguniform", self.loguniform), ("uniform", self.uniform), ("int", self.int_range)):
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind}: low {bounds[0]} must be below high {bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low {self.loguniform[0]} must be positive")
        return self

    @property
    def kind(self) -> str:
        """Which of the five kinds this is (``loguniform``, ``uniform``, ``int``, ``choice``, ``fixed``)."""
        field = next(iter(self.model_fields_set))
        return "int" if field == "int_range" else field

    @model_serializer(mode="plain")
    def _as_one_kind(self) -> dict[str, Any]:
        """Saved as written: ``{kind: value}`` only."""
        kind = self.kind
        value = {"int": self.int_range, "loguniform": self.loguniform, "uniform": self.uniform,
                 "choice": self.choice, "fixed": self.fixed}[kind]
        return {kind: list(value) if isinstance(value, tuple) else value}

    def extremes(self) -> list[Any]:
        """Values that bound what a trial can get: both ends of a range, every choice, the fixed value."""
        kind = self.kind
        if kind == "choice":
            return list(self.choice or [])
        if kind == "fixed":
            return [self.fixed]
        return list({"int": self.int_range, "loguniform": self.loguniform, "uniform": self.uniform}[kind] or ())


METRIC_MODES = {"loss": "min", "mae": "min", "pearson": "max", "ssim": "max", "psnr": "max"}


class SchedulerConfig(StrictModel):
    """Early stopping of poor trials (ASHA) or none (FIFO)."""

    name: Literal["asha", "fifo"] = Field("asha", description="asha: stop poor trials early; fifo: run all fully.")
    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before ASHA may stop it.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps 1/reduction_factor of trials at each rung.")


class SearchConfig(StrictModel):
    """The ``search`` section of a ``viscy tune`` config: space, searcher, scheduler and budget."""

    experiment: str | None = Field(
        None, description="Experiment name (storage_path/experiment); rerunning a name continues it. Default: "
        "tune-<model>-<time>."
    )
    storage_path: str | None = Field(
        None, description="Directory or URI holding experiments; default: trainer.storage_path."
    )
    space: dict[str, SearchParam] = Field(
        ..., min_length=1, description="Dotted training-config keys to search, e.g. trainer.lr: {loguniform: "
        "[1e-4, 1e-2]}."
    )
    metric: str = Field(
        "val_loss", description="Validation metric to optimise: val_loss, train_loss or val_<pearson|ssim|psnr|mae>_"
        "<target channel>."
    )
    mode: Literal["min", "max"] | None = Field(None, description="min or max; default: from the metric's name.")
    num_samples: int = Field(8, ge=1, description="Trials to run.")
    max_concurrent_trials: int = Field(2, ge=1, description="Trials running at the same time.")
    seed: int = Field(0, description="Seed of Optuna's TPE sampler.")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="Known-good starting points (dotted key -> value), tried first."
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)

    @field_validator("space", mode="before")
    @classmethod
    def _flatten_space(cls, value: Any) -> Any:
        """Accept nested keys too (``trainer: {lr: {loguniform: ...}}``, or ``--search.space.trainer.lr.int 1 4``)."""
        if not isinstance(value, dict):
            return value
        kinds = {"loguniform", "uniform", "int", "choice", "fixed"}
        flat: dict[str, Any] = {}

        def walk(node: dict[str, Any], prefix: str) -> None:
            for key, item in node.items():
                dotted = f"{prefix}{key}"
                nested = isinstance(item, dict) and item and all(isinstance(v, dict) for v in item.values())
                if nested and not (set(item) & kinds):
                    walk(item, dotted + ".")
                else:
                    flat[dotted] = item

        walk(value, "")
        return flat

    @field_validator("experiment")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "/" in value or value in (".", "..")):
            raise ValueError("must be a plain directory name (no '/'), e.g. tune-lr")
        return value

    def metric_mode(self) -> Literal["min", "max"]:
        """``mode``, or the direction implied by the metric's name."""
        if self.mode is not None:
            return self.mode
        kind = self.metric.split("_")[1] if self.metric.count("_") >= 1 else ""
        return METRIC_MODES.get(kind, "min")  # type: ignore[return-value]


class TuneConfig(TrainConfig):
    """``viscy tune``: a full training config plus a ``search`` section."""

    search: SearchConfig
    resume: bool = Field(
        False, description="Continue the interrupted experiment search.experiment (rerunning its name does too)."
    )


# -------------------------------------------------------------------------------------------- predict
class PredictConfig(StrictModel):
    """``viscy predict``: whole plates through a torch or ONNX model on Ray Data, resumable."""

    data_path: PathList = Field(description="One or more OME-Zarr HCS plates (or FOV paths inside them).")
    positions: StrList = Field(["*"], description="FOV name patterns (fnmatch) to predict.")
    model: ModelConfig | None = Field(None, description="Torch model (architecture or preset plus checkpoint).")
    onnx: Path | None = Field(None, description="Exported ONNX file (its metadata gives channels and depths).")
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
    source_channel: StrList | None = Field(None, description="Input channels; default from the preset/ONNX.")
    target_channel: StrList | None = Field(None, description="Predicted channels; default from the preset/ONNX.")
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


# ------------------------------------------------------------------------------------------- evaluate
class SegmentationConfig(StrictModel):
    """How instances are segmented for the segmentation metrics of ``viscy evaluate``."""

    method: Literal["classical", "cellpose"] = Field(
        "classical", description="'classical' (Gaussian + Otsu + watershed, no weights) or 'cellpose'."
    )
    channel: str | None = Field(
        None, description="Target channel to segment (its prediction is segmented too); None: the first target channel."
    )
    model: str = Field("cpsam", description="Cellpose pretrained model name or path to a Cellpose 4 checkpoint.")
    diameter: float | None = Field(
        None, gt=0, description="Object diameter in pixels; None: Cellpose's default / 15 px for 'classical'."
    )
    use_ground_truth_labels: str | None = Field(
        None, description="Label image (e.g. 'nuclei') used as reference masks instead of segmenting the target."
    )
    gpu: Literal["auto", True, False] = Field("auto", description="Run Cellpose on CUDA: auto, true or false.")


class EvaluateConfig(StrictModel):
    """Score predicted channels against targets: regression and instance-segmentation metrics."""

    data_path: Path = Field(description="OME-Zarr HCS plate holding the targets (and predictions by default).")
    prediction_path: Path | None = Field(
        None, description="Plate holding the predictions (same positions); None: predictions are in data_path."
    )
    positions: StrList = Field(["*"], description="FOV name patterns (fnmatch) to evaluate.")
    target_channel: StrList | None = Field(
        None,
        min_length=1,
        description="Target channels; None: every <target><prediction_suffix> channel of the prediction plate.",
    )
    prediction_suffix: str = Field("_prediction", description="Prediction channel = target channel + suffix.")
    source_channel: str | None = Field(
        None, description="Input channel shown in example panels; None: the prediction job's first source (if any)."
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


# ----------------------------------------------------------------------------------------------- serve
RAY_SERVE_KEYS = ("proxy_location", "http_options", "grpc_options", "logging_config", "applications")
SERVE_IMPORT_PATH = "viscy.serve.app:build_app"


class AutoscalingSettings(StrictModel):
    """Ray Serve autoscaling of one deployment (replicas follow the requests in flight per replica)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(1, ge=1, description="Most replicas started under load.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests in flight per replica to aim for.")
    upscale_delay_s: float = Field(5.0, ge=0, description="Load must last this long before a replica is added.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Idle this long before a replica is removed.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window over which the load is averaged.")
    metrics_interval_s: float = Field(
        10.0, gt=0, description="How often replicas report their load (below look_back_period_s)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.metrics_interval_s >= self.look_back_period_s:
            raise ValueError(
                f"autoscaling.metrics_interval_s ({self.metrics_interval_s}) must be below look_back_period_s "
                f"({self.look_back_period_s})"
            )
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"autoscaling.max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self


class StainerSettings(StrictModel):
    """The ``VirtualStainer`` deployment: onnxruntime sessions of every served model."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (also onnxruntime's threads).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (0.5 packs two replicas on one GPU).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="onnxruntime device: auto uses CUDA when a GPU and the CUDA provider are usable."
    )
    max_ongoing_requests: int = Field(8, ge=1, description="Requests one replica works on at once.")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    max_batch_size: int = Field(8, ge=1, description="Same-shaped tiles run together across requests.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits for more tiles.")
    tile_yx: tuple[int, int] | None = Field(
        (512, 512), description="Tile size of large images (null: whole images, padded to the YX multiple)."
    )
    tile_overlap: float = Field(0.25, ge=0, lt=1, description="Fraction of a tile overlapping its neighbour.")
    blend: Literal["gaussian", "constant"] = Field("gaussian", description="Tile merge weights.")


class SegmenterSettings(StrictModel):
    """The ``Segmenter`` deployment: the classical segmenter, and Cellpose when a model is configured."""

    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (for Cellpose).")
    max_ongoing_requests: int = Field(4, ge=1, description="Requests one replica works on at once.")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    cellpose_model: str | None = Field(
        None, description="Cellpose >= 4 model name (e.g. cpsam) or checkpoint file; null serves classical only."
    )
    gpu: Literal["auto", True, False] = Field("auto", description="Run Cellpose on CUDA: auto, true or false.")
    default_method: Literal["classical", "cellpose"] = Field(
        "classical", description="Method used when a request names none."
    )
    diameter: float | None = Field(
        None, gt=0, description="Default object diameter in pixels (null: Cellpose's default / 15 px classical)."
    )
    min_diameter: float = Field(
        4.0, gt=0, description="Smallest diameter a request may ask for (Cellpose upsamples by 30/diameter)."
    )
    max_diameter: float = Field(
        400.0, gt=0, description="Largest diameter a request may ask for (classical smoothing grows with it)."
    )

    @model_validator(mode="after")
    def _diameter_range(self) -> SegmenterSettings:
        if self.min_diameter > self.max_diameter:
            raise ValueError(
                f"segmenter.min_diameter ({self.min_diameter}) is above max_diameter ({self.max_diameter})"
            )
        if self.diameter is not None and not self.min_diameter <= self.diameter <= self.max_diameter:
            raise ValueError(f"segmenter.diameter ({self.diameter}) is outside [min_diameter, max_diameter] "
                             f"([{self.min_diameter}, {self.max_diameter}])")
        return self


class IngressSettings(StrictModel):
    """The HTTP ``Ingress`` deployment (decoding, validation, composition)."""

    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per replica.")
    max_ongoing_requests: int = Field(
        4, ge=1, description="Requests one replica handles at once (each may hold one image in memory)."
    )
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests waiting beyond that before 503 answers (-1: no limit)."
    )
    retry_after_s: float = Field(5.0, ge=0, description="Retry-After of the 503 answered when the queue is full.")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)


class ServeConfig(StrictModel):
    """``viscy serve``: ONNX virtual staining and segmentation behind one HTTP API on Ray Serve.

    The file may also be a Ray Serve config (``serve deploy``/``serve run`` read the same file): then the
    settings are the ``args`` of the application whose import_path is ``viscy.serve.app:build_app``, with
    host and port from ``http_options``; keys given beside them (command-line overrides) win.
    """

    models: PathList = Field(description="ONNX files exported by `viscy export`, or directories of them.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds (0.0.0.0 exposes it to the network).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    app_name: str = Field("viscy", description="Ray Serve application name.")
    route_prefix: str = Field("/", description="URL prefix of the application.")
    auth_token_env: str | None = Field(
        None, description="Environment variable holding a bearer token; requests without it get 401."
    )
    auth_token_file: Path | None = Field(None, description="File holding the bearer token (e.g. a mounted secret).")
    allow_unauthenticated_network: bool = Field(
        False, description="Allow a non-loopback host without a token (anyone who reaches the port can use it)."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Extra Host header names accepted on a loopback bind (e.g. a reverse proxy's); other names "
        "get 403, so web pages cannot reach the server through DNS rebinding.",
    )
    max_request_mb: float = Field(
        256.0, gt=0, description="Largest request body; larger ones get 413 (default: the largest image as float64)."
    )
    max_image_pixels: int = Field(
        8 * 2048 * 2048, ge=1, description="Largest image (C x Z x Y x X values); larger ones get 413."
    )
    max_planes: int = Field(
        64, ge=1, description="Most Z planes one request may send (each plane is stained and segmented on its own)."
    )
    max_tiles: int = Field(
        2048, ge=1, description="Most model tiles one request may make (Z windows x YX tiles); more get 413."
    )
    request_timeout_s: float | None = Field(
        300.0, gt=0, description="End-to-end limit of one HTTP request (Serve's proxy answers 408 and cancels it)."
    )
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    stainer: StainerSettings = Field(default_factory=StainerSettings)
    segmenter: SegmenterSettings = Field(default_factory=SegmenterSettings)
    detach: bool = Field(
        False, description="Deploy to the cluster at RAY_ADDRESS and return (default: serve until Ctrl-C)."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_ray_serve_config(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "applications" not in data:
            return data
        data = dict(data)
        apps = data.pop("applications") or []
        ours = [a for a in apps if isinstance(a, dict) and a.get("import_path") == SERVE_IMPORT_PATH]
        if len(ours) != 1:
            raise ValueError(
                f"the Ray Serve config must hold exactly one application with import_path {SERVE_IMPORT_PATH}"
            )
        app = ours[0]
        if app.get("deployments"):
            raise ValueError(
                "put deployment settings under the application's args (ingress, stainer, segmenter), not "
                "'deployments', so viscy serve and serve deploy run the same settings"
            )
        http = data.pop("http_options", None) or {}
        for key in RAY_SERVE_KEYS:
            data.pop(key, None)
        merged: dict[str, Any] = dict(app.get("args") or {})
        merged.setdefault("app_name", app.get("name", "viscy"))
        merged.setdefault("route_prefix", app.get("route_prefix", "/"))
        for key in ("host", "port", "request_timeout_s"):
            if key in http:
                merged.setdefault(key, http[key])
        for key, value in data.items():  # overrides beside the Ray layout win over args
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return merged

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("route_prefix must start with '/', e.g. / or /viscy")
        return value.rstrip("/") or "/"

    @model_validator(mode="after")
    def _no_open_network_bind(self) -> ServeConfig:
        has_token = self.auth_token_env is not None or self.auth_token_file is not None
        if not is_loopback(self.host) and not has_token and not self.allow_unauthenticated_network:
            raise ValueError(
                f"host {self.host} exposes the API to the network without a token; set auth_token_env or "
                "auth_token_file, or bind 127.0.0.1, or (on a network you trust) allow_unauthenticated_network: true"
            )
        return self


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class InferConfig(StrictModel):
    """``viscy infer``: send an image to a running ``viscy serve`` and save the answer."""

    image: Path = Field(description="Input image: .tif/.tiff, .npy or .png ((Y, X), (Z, Y, X) or (C, Z, Y, X)).")
    url: str = Field("http://127.0.0.1:8000", description="Base URL of the server.")
    model: str | None = Field(None, description="Model name (GET /v1/models lists them); default: the only one.")
    output: Path | None = Field(
        None,
        description="New output file (.tif, .npy, or .npz with --segment; an existing file is never replaced); "
        "default: <image stem>_viscy.<suffix> next to the image.",
    )
    segment: bool = Field(False, description="Also segment a predicted channel (stain-and-segment; .npz or .tif).")
    segment_only: bool = Field(False, description="Only segment the image itself (no staining).")
    method: Literal["classical", "cellpose"] | None = Field(None, description="Segmentation method (server default).")
    segment_channel: str | None = Field(None, description="Predicted channel to segment; default: the first.")
    token_env: str = Field("VISCY_SERVE_TOKEN", description="Environment variable holding the bearer token, if any.")
    timeout_s: float = Field(300.0, gt=0, description="HTTP timeout.")


# ----------------------------------------------------------------------------------------------- demo
class DemoConfig(StrictModel):
    """The embedded default job: synthesise, preprocess, train, export, predict held-out FOVs, evaluate."""

    workdir: Path = Field(Path("demo_output"), description="Directory for the plate and every result.")
    synth: SynthConfig = Field(default_factory=SynthConfig)
    fg_mask_channel: str | None = Field("Nuclei", description="Channel for the foreground mask; null: none.")
    train: bool = Field(
        True, description="Train a small model with Ray Train, then export, predict and evaluate held-out FOVs."
    )
    train_epochs: int = Field(16, ge=1, description="Training epochs of the demo model.")
    train_workers: int = Field(2, ge=1, description="Ray Train workers of the demo (CPU, gloo).")


# ------------------------------------------------------------------------------------------ loading
TConfig = TypeVar("TConfig", bound=BaseModel)


def parse_override_value(tokens: list[str]) -> Any:
    """Turn the tokens after ``--key`` into a YAML value: one token is a scalar, several a list."""
    values = [yaml.safe_load(t) if t != "" else "" for t in tokens]
    if not values:
        return True
    return values[0] if len(values) == 1 else values


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Parse ``--a.b v1 [v2 ...]`` pairs into ``{"a.b": value}``.

    Raises
    ------
    ConfigError
        If a token does not belong to any ``--key``.
    """
    out: dict[str, Any] = {}
    key: str | None = None
    tokens: list[str] = []
    for arg in args:
        if arg.startswith("--") and len(arg) > 2 and not re.match(r"^--\d", arg):
            if key is not None:
                out[key] = parse_override_value(tokens)
            key, tokens = arg[2:], []
            if "=" in key:
                key, value = key.split("=", 1)
                tokens = [value]
        elif key is None:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        else:
            tokens.append(arg)
    if key is not None:
        out[key] = parse_override_value(tokens)
    return out


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = _submodel(field.annotation)
        if sub is not None:
            keys.extend(_known_keys(sub, prefix + name + "."))
    return keys


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``X``, ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b] = value`` for ``dotted == "a.b"``, creating sections as needed."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _tuple_length(schema: type[BaseModel], loc: tuple[Any, ...]) -> int | None:
    """Number of items of the fixed-length tuple field at ``loc`` (``None`` if it is not one)."""
    model: type[BaseModel] | None = schema
    annotation: Any = None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = _submodel(annotation)
    tuples = [t for t in _leaf_types(annotation) if get_origin(t) is tuple]
    args = get_args(tuples[0]) if tuples else ()
    return len(args) if args and Ellipsis not in args else None


def format_validation_error(err: ValidationError, schema: type[BaseModel]) -> str:
    """One line per problem: full key path, what is wrong, and how to fix it."""
    lines = []
    known = _known_keys(schema)
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        kind = e["type"]
        if kind == "extra_forbidden":
            parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
            siblings = [k[len(parent) :] for k in known if k.startswith(parent) and "." not in k[len(parent) :]]
            lines.append(f"unknown key '{path}'; allowed keys here: {', '.join(sorted(siblings))}")
        elif kind == "missing":
            lines.append(f"missing required key '{path}'; set it in the YAML or with --{path} VALUE")
        elif kind == "tuple_type" and _tuple_length(schema, e["loc"]):
            n = _tuple_length(schema, e["loc"])
            example = " ".join([str(e.get("input"))] * n)
            lines.append(f"invalid value {e.get('input')!r} for '{path}': give {n} values, e.g. --{path} {example}")
        elif kind == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            lines.append(f"invalid value {e.get('input')!r} for '{path}'; allowed values: {allowed}")
        elif not path:  # a check across sections: its message names the keys
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"invalid value {e.get('input')!r} for '{path}': {e['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(
    schema: type[TConfig],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    check_model: bool = True,
) -> TConfig:
    """Load a YAML file (optional), apply dotted overrides, validate against ``schema``.

    ``check_model=False`` checks everything but whether the model fits the data (which builds the model, so
    imports torch and its libraries): a fast first pass that names key and value errors within a second.

    Raises
    ------
    ConfigError
        With every problem named by its full key path.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML with --config")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
        tree = copy.deepcopy(loaded)
    for dotted, value in (overrides or {}).items():
        set_dotted(tree, dotted, value)
    try:
        return schema.model_validate(tree, context={CHECK_MODEL: check_model})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, schema)) from None


def absolute_paths(config: TConfig) -> TConfig:
    """``config`` with every relative path made absolute against the current directory.

    Ray tasks and actors run in their own working directories (on a cluster, on other nodes), so paths are
    resolved once, in the driver, before anything is sent to them; the saved config then records them too.
    """
    def fix(value: Any) -> Any:
        if isinstance(value, Path):
            return value if value.is_absolute() else Path.cwd() / value.expanduser()
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, BaseModel):
            return absolute_paths(value)
        return value

    update = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        fixed = fix(value)
        if fixed is not value:
            update[name] = fixed
    return config.model_copy(update=update) if update else config


def config_to_yaml(config: BaseModel) -> str:
    """Serialise a config to YAML (paths and tuples as plain strings and lists)."""
    return yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)


def save_config(
    config: BaseModel, directory: str | Path, command: str | None = None, filename: str = CONFIG_FILENAME
) -> Path:
    """Write the resolved config (``viscy_config.yaml``) into a directory the command owns.

    Commands that write a single file (``export``) pass ``filename`` so the config sits beside that file
    without replacing another command's config in the same directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = f"# resolved config written by viscy {command or ''} at {_dt.datetime.now().isoformat()}\n"
    out = directory / filename
    out.write_text(header + config_to_yaml(config))
    return out


def describe_schema(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) rows for ``--help``."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = prefix + name
        sub = _submodel(field.annotation)
        if field.is_required():
            default = "REQUIRED"
        elif field.default_factory is not None:
            default = "(section)" if sub is not None else str(field.default_factory())
        else:
            default = json.dumps(field.default, default=str)
        ann = field.annotation
        allowed = ""
        if getattr(ann, "__origin__", None) is Literal:
            allowed = " Allowed: " + ", ".join(map(str, ann.__args__)) + "."
        rows.append((key, default, (field.description or "") + allowed))
        if sub is not None:
            rows.extend(describe_schema(sub, key + "."))
    return rows
