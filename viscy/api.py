"""The Python API: one function per stage, the same functions the ``viscy`` CLI runs.

Each function takes a config object, a YAML path or a mapping, plus overrides as keyword arguments (nested
mappings or dotted keys), validates it exactly as the CLI does, runs the stage and returns a typed result::

    from viscy import api

    api.preprocess(data_path="plate.zarr")
    trained = api.train("configs/demo.yaml", trainer={"max_epochs": 2, "run_name": "try-1"})
    predicted = api.predict(model={"checkpoint": trained.best_model}, data_path=["plate.zarr"], output="pred.zarr")
    scores = api.evaluate(data_path="plate.zarr", prediction_path="pred.zarr", output_dir="eval")
    scores.mean["Nuclei"]["pearson"]

A trained model carries its card (architecture, channels, normalisation), so ``predict`` and ``export`` need
only the checkpoint. Errors are :class:`viscy.errors.ViscyError` or :class:`viscy.config.ConfigError` and
name the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from viscy.config import (
    EvaluateConfig,
    ExportConfig,
    PredictConfig,
    PreprocessConfig,
    SynthConfig,
    TrainConfig,
    config_to_yaml,
    load_config,
)

if TYPE_CHECKING:
    from viscy.data.preprocess import PreprocessResult
    from viscy.evaluate.run import EvaluateResult
    from viscy.models.export import ExportResult
    from viscy.predict.run import PredictResult
    from viscy.train.trainer import TrainResult

__all__ = ["evaluate", "export", "predict", "preprocess", "resolve_config", "synth", "train"]

ConfigLike = BaseModel | Mapping[str, Any] | str | Path | None
TConfig = TypeVar("TConfig", bound=BaseModel)


def _dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out |= _dotted(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolve_config(schema: type[TConfig], config: ConfigLike = None, **overrides: Any) -> TConfig:
    """Validate ``config`` (object, YAML path or mapping) with ``overrides`` applied, as the CLI does.

    Raises
    ------
    ConfigError
        Naming every bad key and how to fix it.
    """
    import yaml

    if isinstance(config, schema) and not overrides:
        return config
    tree: dict[str, Any] = {}
    if isinstance(config, BaseModel):
        tree = yaml.safe_load(config_to_yaml(config))
    elif isinstance(config, Mapping):
        tree = dict(config)
    elif config is not None:
        return load_config(schema, config, _dotted(overrides))
    return load_config(schema, None, _dotted(tree) | _dotted(overrides))


def synth(config: ConfigLike = None, **overrides: Any) -> Path:
    """Write a synthetic HCS plate with ground-truth labels (``viscy synth``); return its path."""
    from viscy.data.synth import run_synth

    return run_synth(resolve_config(SynthConfig, config, **overrides))


def preprocess(config: ConfigLike = None, **overrides: Any) -> PreprocessResult:
    """Write normalisation statistics into a plate's zattrs (``viscy preprocess``)."""
    from viscy.data.preprocess import run_preprocess

    return run_preprocess(resolve_config(PreprocessConfig, config, **overrides))


def train(config: ConfigLike = None, **overrides: Any) -> TrainResult:
    """Train with Ray Train and write a self-describing ``best_model.pt`` (``viscy train``)."""
    from viscy.train.trainer import run_train

    return run_train(resolve_config(TrainConfig, config, **overrides))


def export(config: ConfigLike = None, **overrides: Any) -> ExportResult:
    """Export a checkpoint or preset to ONNX with its model card and a parity check (``viscy export``)."""
    from viscy.models.export import run_export

    return run_export(resolve_config(ExportConfig, config, **overrides))


def predict(config: ConfigLike = None, **overrides: Any) -> PredictResult:
    """Predict whole plates with a checkpoint or ONNX model on Ray Data (``viscy predict``)."""
    from viscy.predict.run import run_predict

    return run_predict(resolve_config(PredictConfig, config, **overrides))


def evaluate(config: ConfigLike = None, **overrides: Any) -> EvaluateResult:
    """Score predictions against their targets (``viscy evaluate``)."""
    from viscy.evaluate.run import run_evaluate

    return run_evaluate(resolve_config(EvaluateConfig, config, **overrides))
