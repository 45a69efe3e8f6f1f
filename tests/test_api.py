"""The Python facade: configs from objects, YAML files or mappings with overrides, typed results."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from viscy import api
from viscy.config import ConfigError
from viscy.data.config import PreprocessConfig
from viscy.predict.config import PredictConfig


def test_resolve_config_accepts_objects_files_and_mappings(tmp_path):
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump({"data_path": ["a.zarr"], "onnx": "m.onnx", "tile_overlap": 0.25}))
    from_file = api.resolve_config(PredictConfig, path, output="out.zarr", **{"num_actors": 2})
    assert from_file.output == Path("out.zarr") and from_file.num_actors == 2 and from_file.tile_overlap == 0.25
    from_object = api.resolve_config(PredictConfig, from_file, overwrite=True)
    assert from_object.overwrite and from_object.output == Path("out.zarr")
    assert api.resolve_config(PredictConfig, from_file) is from_file
    nested = api.resolve_config(PredictConfig, {"data_path": "a.zarr"}, model={"checkpoint": "best.pt"})
    assert nested.model.checkpoint == Path("best.pt") and nested.data_path == [Path("a.zarr")]


def test_resolve_config_names_bad_keys():
    with pytest.raises(ConfigError, match="unknown key 'tile_overlapp'"):
        api.resolve_config(PredictConfig, {"data_path": "a.zarr"}, tile_overlapp=0.5)
    with pytest.raises(ConfigError, match="missing required key 'data_path'"):
        api.resolve_config(PreprocessConfig)


def test_preprocess_returns_a_typed_result(small_plate, ray_local):
    result = api.preprocess(data_path=small_plate, grid_spacing=4, channels=["Phase3D", "Nuclei"])
    assert result.plate == small_plate and result.fovs == ["A/1/0", "A/1/1", "B/2/0"] and not result.skipped
    assert set(result.dataset_statistics) == {"Phase3D", "Nuclei"}
    assert result.config == small_plate / "viscy_preprocess" / "viscy_config.yaml" and result.config.exists()


def test_stage_paths_are_made_absolute_for_ray_workers(tmp_path, monkeypatch):
    from viscy.config import absolute_paths
    from viscy.train.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    predict = absolute_paths(api.resolve_config(PredictConfig, {"data_path": ["a.zarr", "/data/b.zarr"]},
                                                onnx="m.onnx", output="out.zarr"))
    assert predict.data_path == [tmp_path / "a.zarr", Path("/data/b.zarr")]
    assert predict.onnx == tmp_path / "m.onnx" and predict.output == tmp_path / "out.zarr"
    train = absolute_paths(api.resolve_config(TrainConfig, {"data": {"data_path": "p.zarr"}}))
    assert train.data.data_path == [tmp_path / "p.zarr"]
    assert train.trainer.storage_path == "runs"  # a string that may be a URI: resolved (if local) by train itself
