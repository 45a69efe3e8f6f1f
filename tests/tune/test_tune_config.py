"""``viscy tune`` configs: the space is checked by the training schema before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_kwargs
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


STAINING_METRICS = [f"val_{m}_{c}" for c in ("Nuclei", "Membrane") for m in ("pearson", "ssim", "psnr", "mae")]


@pytest.mark.parametrize(
    ("key", "param", "why"),
    [
        ("trainer.ms_dssim_alpha", {"uniform": [0.0, 1.0]}, "weights of the loss mixture"),
        ("trainer.l1_alpha", {"choice": [0.5, 1.0]}, "weights of the loss mixture"),
        ("trainer.l2_alpha", {"uniform": [0.0, 0.5]}, "weights of the loss mixture"),
        # 32 px gives MS-SSIM 2 scales, 64 px 3 (viscy.train.loss.ms_ssim_scales)
        ("data.yx_patch_size", {"choice": [[32, 32], [64, 64]]}, "how many scales the loss's MS-SSIM term has"),
    ],
)
def test_a_key_that_changes_the_loss_cannot_rank_by_the_loss(tmp_path, key, param, why):
    """The refusal names the key and every metric training reports that does not depend on it."""
    for metric in ("val_loss", "train_loss"):
        config = _config(tmp_path, metric=metric, space={"trainer.lr": {"loguniform": [1e-4, 1e-2]}, key: param})
        with pytest.raises(ConfigError) as err:
            check_metric(config)
        message = str(err.value)
        assert f"search.space.{key} changes what {metric} measures: " in message and why in message, message
        assert f"does not depend on it: {', '.join(STAINING_METRICS)}" in message, message
        assert "search.allow_incomparable_metric: true" in message and "trainer.lr" not in message
    # the per-channel metrics compare prediction and target whatever the loss, so they rank the same search
    check_metric(_config(tmp_path, metric="val_pearson_Nuclei", space={key: param}))


def test_allow_incomparable_metric_turns_the_refusal_into_a_warning(tmp_path):
    config = _config(tmp_path, metric="val_loss", allow_incomparable_metric=True,
                     space={"trainer.ms_dssim_alpha": {"uniform": [0.0, 1.0]}})
    with pytest.warns(UserWarning, match="ms_dssim_alpha changes what val_loss measures.*ranked anyway"):
        check_metric(config)
    assert TuneConfig.model_validate(tune_tree(tmp_path, tmp_path, "e")).search.allow_incomparable_metric is False


def test_a_key_that_changes_the_loss_weight_nothing_uses_is_comparable(tmp_path):
    """A fixed loss weight, or a mask ratio without pre-training, leaves every trial's loss the same."""
    space = {"trainer.lr": {"loguniform": [1e-4, 1e-2]}, "trainer.ms_dssim_alpha": {"fixed": 0.2},
             "trainer.fcmae.mask_ratio": {"uniform": [0.3, 0.7]}}
    check_metric(_config(tmp_path, metric="val_loss", space=space))


def test_fcmae_switch_and_mask_ratio_change_every_metric(tmp_path):
    tree = tune_tree(tmp_path, tmp_path, "e", metric="val_loss",
                     space={"trainer.fcmae.pretraining": {"choice": [False, True]}})
    tree["model"] = {"name": "fcmae", "kwargs": tiny_kwargs("fcmae")}
    with pytest.raises(ConfigError) as err:
        check_metric(TuneConfig.model_validate(tree))
    assert "search.space.trainer.fcmae.pretraining changes what val_loss measures: it switches FCMAE pre-training" \
        in str(err.value)
    assert "no metric training reports is independent of it" in str(err.value)
    # In pre-training the mask ratio sets how much of the input is hidden: every metric, val_pearson too.
    tree["trainer"]["fcmae"] = {"pretraining": True}
    tree["search"].update(metric="val_pearson_Phase3D", space={"trainer.fcmae.mask_ratio": {"uniform": [0.3, 0.7]}})
    with pytest.raises(ConfigError, match="fcmae.mask_ratio changes what val_pearson_Phase3D measures: the FCMAE mask"):
        check_metric(TuneConfig.model_validate(tree))


def test_the_demo_sweep_ranks_by_a_metric_its_space_leaves_alone():
    config = load_config(TuneConfig, REPO / "configs" / "tune_demo.yaml")
    assert "trainer.ms_dssim_alpha" in config.search.space
    assert (config.search.metric, config.search.metric_mode()) == ("val_ap50_Nuclei", "max")
    assert config.trainer.val_segmentation.labels == {"Nuclei": "nuclei"}  # scored against the ground truth
    check_metric(config)
    with pytest.raises(ConfigError, match="trainer.ms_dssim_alpha changes what val_loss measures"):
        check_metric(config.model_copy(update={"search": config.search.model_copy(update={"metric": "val_loss"})}))


def test_segmentation_scores_rank_a_search_whose_segmenter_is_fixed(tmp_path):
    """val_ap50_/val_f1_ exist where validation segments, rank upwards, and refuse a searched segmenter."""
    space = {"trainer.lr": {"loguniform": [1e-4, 1e-2]}, "trainer.ms_dssim_alpha": {"uniform": [0.0, 1.0]}}
    tree = tune_tree(tmp_path / "p.zarr", tmp_path, "e", metric="val_ap50_Nuclei", space=space)
    with pytest.raises(ConfigError, match="add Nuclei to trainer.val_segmentation.channels"):
        _check(TuneConfig.model_validate(tree))
    tree["trainer"]["val_segmentation"] = {"channels": ["Nuclei"], "labels": {"Nuclei": "nuclei"}}
    for metric in ("val_ap50_Nuclei", "val_f1_Nuclei"):
        tree["search"]["metric"] = metric
        config = TuneConfig.model_validate(tree)
        _check(config)  # the loss weights change the loss, not how the predictions' masks are scored
        assert config.search.metric_mode() == "max"
    tree["search"]["space"] = space | {"trainer.val_segmentation.diameter": {"uniform": [8.0, 20.0]}}
    with pytest.raises(ConfigError) as err:
        _check(TuneConfig.model_validate(tree))
    message = str(err.value)
    assert "search.space.trainer.val_segmentation.diameter changes what val_f1_Nuclei measures: it changes the " \
        "segmenter" in message, message
    assert "val_pearson_Nuclei" in message and "ms_dssim_alpha" not in message
