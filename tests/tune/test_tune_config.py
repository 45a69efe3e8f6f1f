"""``viscy tune`` configs: the space is checked by the training schema before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tune.tune_helpers import tune_tree
from viscy.config import ConfigError, load_config
from viscy.tune.config import TuneConfig
from viscy.tune.space import check_metric, check_space, decode_params, encode_point, trial_config, tune_domains

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **search) -> TuneConfig:
    return TuneConfig.model_validate(tune_tree(tmp_path / "p.zarr", tmp_path, "exp", **search))


def _check(config: TuneConfig) -> None:
    check_space(config)
    check_metric(config)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"trainer.lrr": {"loguniform": [1e-4, 1e-2]}}, "unknown key 'trainer.lrr'; allowed keys here: "),
        ({"trainer.precision": {"choice": ["32", "64"]}}, "trainer.precision value '64'"),
        ({"trainer.max_epochs": {"int": [0, 4]}}, "search.space.trainer.max_epochs value 0"),
        ({"model.kwargs.num_filterz": {"choice": [4, 8]}}, "model.kwargs.num_filterz"),
        ({"data.yx_patch_size": {"choice": [[32, 32], [30, 30]]}}, "data.yx_patch_size value [30, 30]"),
        ({"lr": {"uniform": [0.1, 0.2]}}, "'lr' is not a training-config key"),
        ({"trainer.lr": {"fixed": 0.1}}, "only fixed values"),
    ],
)
def test_bad_space_is_refused_with_the_training_schemas_message(tmp_path, space, message):
    config = _config(tmp_path, space=space)
    with pytest.raises(ConfigError) as err:
        _check(config)
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"metric": "val_pearson_DAPI"}, "search.metric 'val_pearson_DAPI' is not reported by training; choose one"),
        ({"points_to_evaluate": [{"trainer.l1_alpha": 0.5}]}, "trainer.l1_alpha not searched"),
        ({"points_to_evaluate": [{"trainer.lr": 5.0}]}, "gives trainer.lr=5.0, outside search.space.trainer.lr"),
        ({"points_to_evaluate": [{"model.kwargs.num_filters": 6}]}, "outside search.space.model.kwargs.num_filters"),
    ],
)
def test_bad_metric_or_starting_point_is_refused(tmp_path, search, message):
    with pytest.raises(ConfigError) as err:
        _check(_config(tmp_path, **search))
    assert message in str(err.value), str(err.value)


def test_bad_kind_and_bounds_are_refused_at_load(tmp_path):
    tree = tune_tree(tmp_path / "p.zarr", tmp_path, "exp")
    for param, message in [({"logscale": [1, 2]}, "unknown kind 'logscale'"),
                           ({"int": [4, 1]}, "low 4 must be below high 1"),
                           ({"loguniform": [0, 1]}, "must be positive")]:
        tree["search"]["space"] = {"trainer.lr": param}
        path = tmp_path / "t.yaml"
        path.write_text(yaml.safe_dump(tree))
        with pytest.raises(ConfigError, match=message):
            load_config(TuneConfig, path)


def test_metric_mode_space_encoding_and_nested_cli_keys(tmp_path):
    config = _config(tmp_path, metric="val_pearson_Nuclei", points_to_evaluate=[{"trainer.lr": 1e-3}],
                     space={"trainer.lr": {"loguniform": [1e-4, 1e-2]},
                            "data.yx_patch_size": {"choice": [[32, 32], [64, 64]]},
                            "trainer.warmup_epochs": {"int": [0, 2]}, "trainer.max_epochs": {"fixed": 5}})
    _check(config)
    assert config.search.metric_mode() == "max" and _config(tmp_path).search.metric_mode() == "min"
    domains = tune_domains(config)
    assert set(domains) == {"trainer.lr", "data.yx_patch_size", "trainer.warmup_epochs"}  # fixed is not searched
    assert domains["data.yx_patch_size"].categories == ["[32, 32]", "[64, 64]"]
    assert domains["trainer.warmup_epochs"].upper == 3  # int ranges include their upper bound
    # a starting point takes the base config's value for keys it omits
    assert encode_point({"trainer.lr": 1e-3}, config) == {
        "trainer.lr": 1e-3, "data.yx_patch_size": "[32, 32]", "trainer.warmup_epochs": 0}
    values = decode_params({"data.yx_patch_size": "[64, 64]", "trainer.lr": 0.002}, config.search.space)
    from viscy.tune.space import base_tree

    trial = trial_config(base_tree(config), values)
    assert trial.data.yx_patch_size == (64, 64) and trial.trainer.max_epochs == 5 and trial.trainer.lr == 0.002
    # the CLI's dotted overrides reach into the space
    from viscy.config import parse_overrides

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(tune_tree(tmp_path / "p.zarr", tmp_path, "exp")))
    loaded = load_config(TuneConfig, path, parse_overrides(["--search.space.trainer.weight_decay.uniform", "0", "0.1"]))
    assert loaded.search.space["trainer.weight_decay"].uniform == (0.0, 0.1)
    assert "trainer.lr" in loaded.search.space


def test_cli_refuses_a_bad_key_before_ray_starts(tmp_path):
    """The error comes from the schema check, in seconds, and no Ray cluster was started."""
    tree = tune_tree(tmp_path / "missing.zarr", tmp_path, "exp")
    tree["search"]["space"]["trainer.learning_rate"] = {"loguniform": [1e-4, 1e-2]}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(tree))
    out = subprocess.run([sys.executable, "-m", "viscy.cli", "tune", "--config", str(path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    assert "unknown key 'trainer.learning_rate'" in out.stderr, out.stderr
    assert "Started a local Ray" not in out.stdout + out.stderr
    assert not (tmp_path / "exp").exists()
