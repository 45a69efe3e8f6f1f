"""The Python API: one function per stage, the same functions the ``viscy`` CLI runs.

Each function takes a config object, a YAML path or a mapping, plus overrides as keyword arguments (nested
mappings or dotted keys), validates it exactly as the CLI does, runs the stage and returns a typed result::

    from viscy import api

    api.preprocess(data_path="plate.zarr")
    trained = api.train("configs/demo.yaml", trainer={"max_epochs": 2, "run_name": "try-1"})
    predicted = api.predict(model={"checkpoint": trained.best_model}, data_path="plate.zarr", output="pred.zarr")
    scores = api.evaluate(data_path="plate.zarr", prediction_path="pred.zarr", output_dir="eval")
    scores.mean["Nuclei"]["pearson"]

Relative paths are resolved against the current directory before anything runs (Ray workers run in
their own directories). A trained model carries its card (architecture, channels, normalisation), so
``predict`` and ``export`` need only the checkpoint. Errors are :class:`viscy.errors.ViscyError` (a bad
config: :class:`viscy.config.ConfigError`) and name the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from viscy.config import absolute_paths, load_config
from viscy.data.config import PreprocessConfig, SynthConfig
from viscy.evaluate.config import EvaluateConfig
from viscy.models.config import ExportConfig
from viscy.predict.config import PredictConfig
from viscy.serve.config import ServeConfig
from viscy.train.config import TrainConfig
from viscy.tune.config import TuneConfig

if TYPE_CHECKING:
    from viscy.data.preprocess import PreprocessResult
    from viscy.evaluate.run import EvaluateResult
    from viscy.models.export import ExportResult
    from viscy.predict.run import PredictResult
    from viscy.serve.run import ServeResult
    from viscy.train.trainer import TrainResult
    from viscy.tune.run import TuneResult

__all__ = ["evaluate", "export", "predict", "preprocess", "resolve_config", "serve", "synth", "train", "tune"]

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
    if isinstance(config, schema) and not overrides:
        return config
    tree: dict[str, Any] = {}
    if isinstance(config, BaseModel):
        tree = config.model_dump(mode="json")
    elif isinstance(config, Mapping):
        tree = dict(config)
    elif config is not None:
        return load_config(schema, config, _dotted(overrides))
    return load_config(schema, None, _dotted(tree) | _dotted(overrides))


def _run(entry: str, schema: type[TConfig], config: ConfigLike, overrides: dict[str, Any]) -> Any:
    """Validate, make paths absolute (Ray workers run elsewhere) and run ``entry`` ("module:function")."""
    import importlib

    module, _, function = entry.partition(":")
    resolved = absolute_paths(resolve_config(schema, config, **overrides))
    return getattr(importlib.import_module(module), function)(resolved)


def synth(config: ConfigLike = None, **overrides: Any) -> Path:
    """Write a synthetic HCS plate with ground-truth labels (``viscy synth``); return its path."""
    return _run("viscy.data.synth:run_synth", SynthConfig, config, overrides)


def preprocess(config: ConfigLike = None, **overrides: Any) -> PreprocessResult:
    """Write normalisation statistics into a plate's zattrs (``viscy preprocess``)."""
    return _run("viscy.data.preprocess:run_preprocess", PreprocessConfig, config, overrides)


def train(config: ConfigLike = None, **overrides: Any) -> TrainResult:
    """Train with Ray Train and write a self-describing ``best_model.pt`` (``viscy train``)."""
    return _run("viscy.train.trainer:run_train", TrainConfig, config, overrides)


def tune(config: ConfigLike = None, **overrides: Any) -> TuneResult:
    """Search hyper-parameters over real training runs (``viscy tune``); continue it by calling it again."""
    return _run("viscy.tune.run:run_tune", TuneConfig, config, overrides)


def export(config: ConfigLike = None, **overrides: Any) -> ExportResult:
    """Export a checkpoint or preset to ONNX with its model card, or to a bioimage.io package (``format=
    "bioimageio"``), with a parity check (``viscy export``)."""
    exporters = {"onnx": "viscy.models.export:run_export", "bioimageio": "viscy.models.bioimageio:run_package_export"}
    resolved = resolve_config(ExportConfig, config, **overrides)
    return _run(exporters[resolved.format], ExportConfig, resolved, {})


def predict(config: ConfigLike = None, **overrides: Any) -> PredictResult:
    """Predict whole plates with a checkpoint, ONNX model or bioimage.io package on Ray Data (``viscy predict``)."""
    return _run("viscy.predict.run:run_predict", PredictConfig, config, overrides)


def evaluate(config: ConfigLike = None, **overrides: Any) -> EvaluateResult:
    """Score predictions against their targets (``viscy evaluate``)."""
    return _run("viscy.evaluate.run:run_evaluate", EvaluateConfig, config, overrides)


def serve(config: ConfigLike = None, **overrides: Any) -> ServeResult:
    """Deploy the Serve application (``viscy serve``) and return once it is healthy; ``result.stop()`` removes it.

    ``api.serve(models="demo_output/model")`` serves on http://127.0.0.1:8000 while this Python process (or the
    cluster at ``RAY_ADDRESS``) runs; talk to it with :class:`viscy.serve.ServeClient`.
    """
    return _run("viscy.serve.run:run_serve", ServeConfig, config, overrides)
