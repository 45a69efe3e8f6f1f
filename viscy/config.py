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
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_FILENAME = "viscy_config.yaml"


class ConfigError(ValueError):
    """A configuration could not be loaded or validated; the message names the key and the fix."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- synth
class SynthConfig(StrictModel):
    """Synthetic HCS plate: cells, nuclei, membranes and a phase image derived from them."""

    output: Path = Field(Path("synthetic.zarr"), description="Path of the OME-Zarr plate to write.")
    rows: list[str] = Field(["A"], description="Well row names.")
    cols: list[str] = Field(["1", "2"], description="Well column names.")
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
    channels: list[str] | None = Field(None, description="Channels to compute statistics for; default all.")
    positions: list[str] = Field(["*"], description="FOV name patterns (fnmatch), e.g. ['A/1/*'].")
    grid_spacing: int = Field(32, ge=1, description="Sample every N-th pixel in Y and X (VisCy: 32).")
    fg_mask: ForegroundMaskConfig | None = Field(None, description="Also write a foreground mask per FOV.")
    num_cpus_per_task: float = Field(1.0, gt=0, description="CPUs reserved by each per-FOV Ray task.")


# ------------------------------------------------------------------------------------------- data
class NormalizationConfig(StrictModel):
    """How one group of channels is normalised: ``(x - subtrahend) / divisor`` from stored statistics."""

    channels: list[str] | None = Field(None, description="Channels this applies to; None means all others.")
    level: Literal["fov_statistics", "dataset_statistics"] = Field(
        "fov_statistics", description="Statistics level in the zattrs."
    )
    subtrahend: Literal["mean", "median"] = "median"
    divisor: Literal["std", "iqr"] = "iqr"


class AugmentationConfig(StrictModel):
    """MONAI dictionary augmentations applied to training patches (probabilities 0 disable one)."""

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

    data_path: list[Path] = Field(description="One or more OME-Zarr HCS plates (or FOV paths inside them).")
    source_channel: list[str] = Field(["Phase3D"], min_length=1, description="Input (label-free) channels.")
    target_channel: list[str] = Field(["Nuclei", "Membrane"], min_length=1, description="Channels to predict.")
    positions: list[str] = Field(["*"], description="FOV name patterns (fnmatch) to use.")
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
    fg_mask_min_fraction: float = Field(
        0.0, ge=0, le=1, description="Reject patches whose foreground fraction is below this (needs fg_mask)."
    )
    fg_weighted_crops: bool = Field(False, description="Centre crops on foreground pixels (needs fg_mask).")
    batch_size: int = Field(16, ge=1, description="Patches per batch per worker.")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="Fraction of FOVs held out for validation.")
    val_positions: list[str] | None = Field(None, description="Explicit validation FOVs (overrides fraction).")
    split_seed: int = Field(0, description="Seed of the train/validation split by FOV.")

    @field_validator("data_path", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v

    @field_validator("yx_patch_size")
    @classmethod
    def _patch_positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 8:
            raise ValueError("yx_patch_size must be at least 8 x 8")
        return v

    @model_validator(mode="after")
    def _channels_disjoint(self) -> DataConfig:
        both = set(self.source_channel) & set(self.target_channel)
        if both:
            raise ValueError(f"channels {sorted(both)} are both source and target; use each channel once")
        return self


class DemoConfig(StrictModel):
    """The embedded default job: synthesise a plate, preprocess it and summarise it."""

    workdir: Path = Field(Path("demo_output"), description="Directory for the plate and every result.")
    synth: SynthConfig = Field(default_factory=SynthConfig)
    fg_mask_channel: str | None = Field("Nuclei", description="Channel for the foreground mask; null: none.")


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
        elif kind == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            lines.append(f"invalid value {e.get('input')!r} for '{path}'; allowed values: {allowed}")
        else:
            lines.append(f"invalid value {e.get('input')!r} for '{path}': {e['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(
    schema: type[TConfig],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TConfig:
    """Load a YAML file (optional), apply dotted overrides, validate against ``schema``.

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
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, schema)) from None


def config_to_yaml(config: BaseModel) -> str:
    """Serialise a config to YAML (paths and tuples as plain strings and lists)."""
    return yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)


def save_config(config: BaseModel, directory: str | Path, command: str | None = None) -> Path:
    """Write the resolved config as ``viscy_config.yaml`` next to a command's outputs."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = f"# resolved config written by viscy {command or ''} at {_dt.datetime.now().isoformat()}\n"
    out = directory / CONFIG_FILENAME
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
