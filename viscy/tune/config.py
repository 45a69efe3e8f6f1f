"""Schema of ``viscy tune``: a training config plus the ``search`` section."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from viscy.config import StrictModel
from viscy.train.config import TrainConfig


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
        value = {
            "int": self.int_range,
            "loguniform": self.loguniform,
            "uniform": self.uniform,
            "choice": self.choice,
            "fixed": self.fixed,
        }[kind]
        return {kind: list(value) if isinstance(value, tuple) else value}

    def extremes(self) -> list[Any]:
        """Values that bound what a trial can get: both ends of a range, every choice, the fixed value."""
        kind = self.kind
        if kind == "choice":
            return list(self.choice or [])
        if kind == "fixed":
            return [self.fixed]
        return list({"int": self.int_range, "loguniform": self.loguniform, "uniform": self.uniform}[kind] or ())


METRIC_MODES = {"loss": "min", "mae": "min", "pearson": "max", "ssim": "max", "psnr": "max", "ap50": "max", "f1": "max"}


class SchedulerConfig(StrictModel):
    """Early stopping of poor trials (ASHA) or none (FIFO)."""

    name: Literal["asha", "fifo"] = Field("asha", description="asha: stop poor trials early; fifo: run all fully.")
    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before ASHA may stop it.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps 1/reduction_factor of trials at each rung.")


class SearchConfig(StrictModel):
    """The ``search`` section of a ``viscy tune`` config: space, searcher, scheduler and budget."""

    experiment: str | None = Field(
        None,
        description="Experiment name (storage_path/experiment); rerunning a name continues it. Default: "
        "tune-<model>-<time>.",
    )
    storage_path: str | None = Field(
        None, description="Directory or URI holding experiments; default: trainer.storage_path."
    )
    space: dict[str, SearchParam] = Field(
        ...,
        min_length=1,
        description="Dotted training-config keys to search, e.g. trainer.lr: {loguniform: [1e-4, 1e-2]}.",
    )
    metric: str = Field(
        "val_loss",
        description="Validation metric to optimise: val_loss, train_loss, val_<pearson|ssim|psnr|mae>_"
        "<target channel>, or val_<ap50|f1>_<channel> for channels trainer.val_segmentation scores.",
    )
    mode: Literal["min", "max"] | None = Field(None, description="min or max; default: from the metric's name.")
    allow_incomparable_metric: bool = Field(
        False,
        description="Search keys that change what the metric measures (e.g. the loss weights while ranking by "
        "val_loss) with a warning instead of an error.",
    )
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
