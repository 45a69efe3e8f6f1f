"""Config schema: YAML loading, dotted overrides, clear errors, resolved config saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from viscy.config import (
    CONFIG_FILENAME,
    ConfigError,
    DataConfig,
    PreprocessConfig,
    load_config,
    parse_overrides,
    save_config,
)


def test_overrides_parse_scalars_lists_and_equals():
    out = parse_overrides(["--data.yx_patch_size", "256", "128", "--data.z_window_size=5", "--flag"])
    assert out == {"data.yx_patch_size": [256, 128], "data.z_window_size": 5, "flag": True}


def test_overrides_reject_stray_tokens():
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["oops"])


def test_yaml_plus_overrides(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data_path": "p.zarr", "yx_patch_size": [64, 64]}))
    data = load_config(DataConfig, cfg, {"yx_patch_size": [128, 96], "z_window_size": 5})
    assert data.yx_patch_size == (128, 96)
    assert data.z_window_size == 5
    assert data.data_path == [Path("p.zarr")]


def test_unknown_key_names_full_path_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(DataConfig, None, {"data_path": "x", "augmentation.flipp_prob": 0.1})
    msg = str(err.value)
    assert "augmentation.flipp_prob" in msg
    assert "flip_prob" in msg  # the allowed keys are listed


def test_invalid_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(DataConfig, None, {"data_path": "x", "normalization": [{"level": "plate"}]})
    msg = str(err.value)
    assert "normalization.0.level" in msg and "fov_statistics" in msg and "dataset_statistics" in msg


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required key 'data_path'"):
        load_config(PreprocessConfig, None, {})


def test_invalid_number_and_relation_errors():
    with pytest.raises(ConfigError, match="grid_spacing"):
        load_config(PreprocessConfig, None, {"data_path": "x", "grid_spacing": 0})
    with pytest.raises(ConfigError, match="both source and target"):
        load_config(DataConfig, None, {"data_path": "x", "source_channel": ["Nuclei"]})


def test_bad_yaml_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DataConfig, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DataConfig, bad)


def test_saved_config_round_trips(tmp_path: Path):
    data = load_config(DataConfig, None, {"data_path": ["a.zarr", "b.zarr"], "yx_patch_size": [32, 48]})
    out = save_config(data, tmp_path, "test")
    assert out.name == CONFIG_FILENAME
    again = load_config(DataConfig, out)
    assert again == data
