"""Config schema: YAML loading, dotted overrides, clear errors, renamed keys, resolved config saved; the base
imports no stage."""

from __future__ import annotations

from pathlib import Path
from typing import get_args, get_origin

import pytest
import yaml

from viscy.config import (
    CONFIG_FILENAME,
    ConfigError,
    DeprecatedKeyWarning,
    describe_schema,
    load_config,
    parse_overrides,
    save_config,
)
from viscy.data.config import DataConfig, PreprocessConfig, SynthConfig
from viscy.train.config import TrainConfig


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
        load_config(DataConfig, None, {"data_path": "x", "source_channels": ["Nuclei"]})


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


# ------------------------------------------------------------------------ command-line coercion, every verb
def _cli(schema, *args: str):
    """Validate ``args`` exactly as ``viscy VERB args`` does (YAML-typed tokens, then the schema)."""
    return load_config(schema, None, parse_overrides(list(args)))


def test_readme_synth_example_and_single_values():
    cfg = _cli(SynthConfig, "--output", "plate.zarr", "--cols", "1", "2", "3", "--fovs_per_well", "4", "--z", "16",
               "--yx", "512", "512", "--seed", "7")
    assert cfg.cols == ["1", "2", "3"] and cfg.yx == (512, 512) and cfg.z == 16
    assert _cli(SynthConfig, "--cols", "1").cols == ["1"]
    assert _cli(SynthConfig, "--rows", "B", "--cols", "12").rows == ["B"]
    assert _cli(SynthConfig, "--output", "2024").output == Path("2024")


def test_numbers_and_single_values_for_train_predict_evaluate_info():
    from viscy.data.plate import InfoConfig
    from viscy.evaluate.config import EvaluateConfig
    from viscy.predict.config import PredictConfig

    train = _cli(TrainConfig, "--data.data_path", "p.zarr", "--data.positions", "A/1/0", "--trainer.run_name", "2024",
                 "--trainer.precision", "32", "--logging.group", "7", "--data.val_positions", "A/2/0")
    assert train.data.data_path == [Path("p.zarr")] and train.data.positions == ["A/1/0"]
    assert train.trainer.run_name == "2024" and train.trainer.precision == "32" and train.logging.group == "7"
    assert train.data.val_positions == ["A/2/0"]
    # A YAML date is a string to a string field, written back as typed.
    dated = _cli(TrainConfig, "--data.data_path", "p", "--trainer.run_name", "2024-01-31")
    assert dated.trainer.run_name == "2024-01-31"
    # One section where a list of sections is expected.
    one = _cli(TrainConfig, "--data.data_path", "p", "--data.normalization", "{channels: Phase3D, divisor: std}")
    assert [(n.channels, n.divisor) for n in one.data.normalization] == [(["Phase3D"], "std")]

    pred = _cli(PredictConfig, "--data_path", "p.zarr", "--onnx", "m.onnx", "--positions", "A/1/0",
                "--source_channels", "Phase3D", "--target_channels", "1")
    assert pred.positions == ["A/1/0"] and pred.source_channels == ["Phase3D"] and pred.target_channels == ["1"]
    ev = _cli(EvaluateConfig, "--data_path", "p.zarr", "--positions", "A/2/*", "--target_channels", "Nuclei")
    assert ev.positions == ["A/2/*"] and ev.target_channels == ["Nuclei"]
    assert _cli(InfoConfig, "--data_path", "p.zarr", "--positions", "A/*").positions == ["A/*"]
    assert _cli(PreprocessConfig, "--data_path", "p", "--channels", "Nuclei").channels == ["Nuclei"]


def test_one_value_for_a_pair_names_the_fix():
    with pytest.raises(ConfigError, match=r"invalid value 512 for 'yx': give 2 values, e.g. --yx 512 512"):
        _cli(SynthConfig, "--yx", "512")
    with pytest.raises(ConfigError, match=r"'data.yx_patch_size': give 2 values, e.g. --data.yx_patch_size 64 64"):
        _cli(TrainConfig, "--data.data_path", "p", "--data.yx_patch_size", "64")
    with pytest.raises(ConfigError, match="at most 2 items"):
        _cli(SynthConfig, "--yx", "64", "64", "64")


def test_numbers_still_rejected_where_they_cannot_mean_anything():
    with pytest.raises(ConfigError, match=r"invalid value 64 for 'trainer.precision'; allowed values"):
        _cli(TrainConfig, "--data.data_path", "p", "--trainer.precision", "64")
    with pytest.raises(ConfigError, match="'fovs_per_well': Input should be a valid integer"):
        _cli(SynthConfig, "--fovs_per_well", "A")
    with pytest.raises(ConfigError, match="'cols.0': Input should be a valid string"):
        _cli(SynthConfig, "--cols", "true")  # a boolean is not a well name


def _string_keys(model, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, 'str' | 'path' | 'strs' | 'paths') of every string, path or list field of a schema."""
    from viscy.config import _leaf_types, _submodel

    out = []
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is not None:
            out += _string_keys(sub, prefix + name + ".")
            continue
        for t in _leaf_types(field.annotation):
            inner = _leaf_types(get_args(t)[0]) if get_origin(t) is list else None
            kind = {str: "str", Path: "path"}.get(inner[0] if inner else t)
            if kind:
                out.append((prefix + name, kind + ("s" if inner else "")))
                break
    return out


# Required keys of each verb (and what each needs to be valid besides the key under test).
VERB_BASE = {
    "demo": [], "synth": [], "preprocess": ["--data_path", "p.zarr"], "info": ["--data_path", "p.zarr"],
    "train": ["--data.data_path", "p.zarr"],
    "tune": ["--data.data_path", "p.zarr", "--search.space.trainer.lr.loguniform", "1e-4", "1e-2"],
    "export": ["--output", "m.onnx"],
    "predict": ["--data_path", "p.zarr", "--onnx", "m.onnx"], "evaluate": ["--data_path", "p.zarr"],
    "serve": ["--models", "m.onnx"], "infer": ["--image", "x.tif"],
}


@pytest.mark.parametrize("verb", list(VERB_BASE))
def test_every_verb_coerces_numbers_and_single_values(verb):
    """Every string, path and list key of every verb takes a number (``--key 7``) as its string."""
    from viscy.cli import VERBS, _load

    assert {v.name for v in VERBS} == set(VERB_BASE), "a new verb needs an entry in VERB_BASE"
    schema = _load(next(v.schema for v in VERBS if v.name == verb))
    keys = _string_keys(schema)
    assert keys, f"{verb} has no string or list keys?"
    checked = 0
    for key, kind in keys:
        try:
            cfg = _cli(schema, *VERB_BASE[verb], f"--{key}", "7")
        except ConfigError as exc:  # rejected for what 7 means (e.g. an unknown model), never for its type
            assert "valid string" not in str(exc) and "valid list" not in str(exc) and "valid path" not in str(exc), (
                key, str(exc))
            continue
        value = cfg
        for part in key.split("."):
            value = getattr(value[0] if isinstance(value, list) else value, part)  # list of sections: the one
        expected = {"str": "7", "path": Path("7"), "strs": ["7"], "paths": [Path("7")]}[kind]
        assert value == expected, (key, value)
        checked += 1
    assert checked >= len(keys) // 2, f"{verb}: only {checked} of {len(keys)} keys could be checked"


# ------------------------------------------------------------------------------------------- renamed keys
def test_old_channel_keys_load_from_yaml_with_a_warning_naming_the_new_key(tmp_path: Path):
    """A config saved by an earlier viscy (singular channel keys) loads; it is saved back under the new names."""
    old = tmp_path / CONFIG_FILENAME
    old.write_text(yaml.safe_dump({"data": {"data_path": "p", "source_channel": ["BF"], "target_channel": "DAPI"}}))
    with pytest.warns(DeprecatedKeyWarning, match=r"'data.source_channel' is deprecated; use 'data.source_channels'"):
        config = load_config(TrainConfig, old)
    assert config.data.source_channels == ["BF"] and config.data.target_channels == ["DAPI"]
    saved = yaml.safe_load(save_config(config, tmp_path / "again", "test").read_text())
    assert "source_channels" in saved["data"] and "source_channel" not in saved["data"]
    with pytest.warns(DeprecatedKeyWarning, match="use 'target_channels'"):  # validated directly, no key path
        assert DataConfig.model_validate({"data_path": "p", "target_channel": ["x"]}).target_channels == ["x"]


def test_old_channel_keys_on_the_command_line_and_every_schema_that_has_them(tmp_path: Path):
    from viscy.evaluate.config import EvaluateConfig
    from viscy.models.config import ExportConfig
    from viscy.predict.config import PredictConfig

    with pytest.warns(DeprecatedKeyWarning, match=r"'data.source_channel' is deprecated; use 'data.source_channels'"):
        train = _cli(TrainConfig, "--data.data_path", "p", "--data.source_channel", "Phase3D")
    assert train.data.source_channels == ["Phase3D"]
    with pytest.warns(DeprecatedKeyWarning):
        assert _cli(ExportConfig, "--output", "m.onnx", "--target_channel", "a", "b").target_channels == ["a", "b"]
        assert _cli(PredictConfig, "--data_path", "p", "--onnx", "m", "--source_channel", "B").source_channels == ["B"]
        assert _cli(EvaluateConfig, "--data_path", "p", "--source_channel", "BF").source_channels == ["BF"]
    # an override replaces the file's value whichever name either of them uses
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump({"data": {"data_path": "p", "source_channels": ["BF"]}}))
    with pytest.warns(DeprecatedKeyWarning):
        assert load_config(TrainConfig, new, {"data.source_channel": "DPC"}).data.source_channels == ["DPC"]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"data": {"data_path": "p", "source_channel": ["BF"]}}))
    with pytest.warns(DeprecatedKeyWarning):
        assert load_config(TrainConfig, old, {"data.source_channels": "DPC"}).data.source_channels == ["DPC"]
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"data": {"data_path": "p", "source_channel": ["BF"], "source_channels": ["BF"]}}))
    with pytest.raises(ConfigError, match="'data.source_channel' and 'data.source_channels' are both set"):
        load_config(TrainConfig, both)


def test_help_lists_only_the_new_names():
    keys = [key for key, _, _ in describe_schema(TrainConfig)]
    assert "data.source_channels" in keys and "data.target_channels" in keys
    assert "data.source_channel" not in keys and "data.target_channel" not in keys


def test_config_error_is_a_viscy_error_and_a_value_error():
    from viscy.errors import ViscyError

    with pytest.raises(ViscyError) as err:
        load_config(DataConfig, None, {})
    assert isinstance(err.value, ConfigError) and isinstance(err.value, ValueError)


def test_the_base_imports_no_stage_module():
    """viscy.config is the shared base: it may import viscy.errors, never a stage (no cycles, nothing above it)."""
    import ast

    import viscy.config

    tree = ast.parse(Path(viscy.config.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.startswith("viscy")} <= {"viscy.errors"}, imported


def test_validation_builds_no_model(monkeypatch):
    """Checking values never resolves or builds a model: an unknown name passes validation (check_model names it)."""
    import viscy.models

    def refuse(*args, **kwargs):
        raise AssertionError("validation built a model")

    monkeypatch.setattr(viscy.models, "model_spec", refuse)
    monkeypatch.setattr(viscy.models, "resolve_model_source", refuse)
    config = _cli(TrainConfig, "--data.data_path", "p", "--model.name", "unet9d")
    assert config.model.name == "unet9d"
