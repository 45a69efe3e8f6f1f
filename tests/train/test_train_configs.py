"""Every YAML in configs/ loads through the schema and its model fits its data; model/data consistency errors
name the fix; CLI verb."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from viscy.cli import main
from viscy.config import ConfigError, load_config
from viscy.train.check import check_model
from viscy.train.config import TrainConfig
from viscy.train.demo_settings import demo_train_dict

# training recipes: every YAML of configs/ except the Serve application (tests/serve/test_serve_codecs.py loads it)
# and the tune configs (test_tune_configs_load below)
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")
                 if p.name != "serve.yaml" and not p.name.startswith("tune"))
TUNE_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("tune*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "vscyto2d_finetune.yaml", "vscyto3d.yaml", "vsneuromast.yaml", "fcmae_pretrain.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.trainer.max_epochs >= 1
    check_model(cfg)


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_tune_configs_load_and_their_space_is_valid(path):
    from viscy.tune.config import TuneConfig
    from viscy.tune.space import check_metric, check_space

    cfg = load_config(TuneConfig, path)
    check_space(cfg)
    check_metric(cfg)
    assert TUNE_CONFIGS, "configs/tune_demo.yaml is the README's example"


def test_demo_yaml_matches_demo_settings():
    tree = yaml.safe_load((CONFIGS[0].parent / "demo.yaml").read_text())
    expected = demo_train_dict("demo_output/synthetic.zarr", "demo_output/runs")
    assert TrainConfig.model_validate(tree) == TrainConfig.model_validate(expected)


def test_recipes():
    d = Path(CONFIGS[0].parent)
    c2 = load_config(TrainConfig, d / "vscyto2d_finetune.yaml")
    assert (c2.trainer.lr, c2.trainer.precision, c2.data.batch_size) == (2e-4, "16-mixed", 32)
    assert c2.trainer.num_workers == 4 and c2.trainer.use_gpu
    c3 = load_config(TrainConfig, d / "vscyto3d.yaml")
    assert (c3.trainer.precision, c3.data.z_window_size, c3.data.yx_patch_size) == ("bf16-mixed", 5, (256, 256))
    cn = load_config(TrainConfig, d / "vsneuromast.yaml")
    assert (cn.trainer.lr, cn.trainer.schedule, cn.data.batch_size) == (1e-3, "Constant", 2)
    cf = load_config(TrainConfig, d / "fcmae_pretrain.yaml")
    assert cf.trainer.fcmae.pretraining and cf.trainer.fcmae.mask_ratio == 0.5 and cf.trainer.max_epochs == 400


@pytest.mark.parametrize(
    ("tree", "fix"),
    [
        ({"model": {"name": "VSCyto3D"}}, "--data.z_window_size 5"),
        ({"model": {"name": "VSCyto3D"}, "data": {"z_window_size": 5}}, "--data.target_2d false"),
        ({"model": {"name": "unet2d", "kwargs": {"out_channels": 3}}}, "out_channels 2"),
        ({"model": {"name": "unet2d"}, "trainer": {"fcmae": {"pretraining": True}}}, "needs model fcmae"),
    ],
)
def test_inconsistent_model_and_data(tree, fix):
    base = {"data": {"data_path": "x.zarr"}}
    base["data"].update(tree.pop("data", {}))
    config = load_config(TrainConfig, None, {"data": base["data"], **tree})
    with pytest.raises(ConfigError, match=fix.replace(".", r"\.")):
        check_model(config)


def test_cli_train_help_and_resume_error(capsys, tmp_path):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--trainer.resume" in out and "Ray Train" in out
    code = main(["train", "--data.data_path", str(tmp_path / "p.zarr"), "--trainer.resume", "true"])
    assert code in (1, 2)
    assert "run_name" in capsys.readouterr().err


def test_default_model_takes_its_shape_from_the_data():
    two_d = check_model(load_config(TrainConfig, None, {"data.data_path": "x.zarr"}))
    assert two_d.name == "unext2" and two_d.spec.z_window_size == 1 and two_d.spec.out_channels == 2
    assert two_d.kwargs["stem_kernel_size"] == [1, 4, 4]  # the stem folds the whole (1-slice) window
    three_d = check_model(load_config(TrainConfig, None, {
        "data.data_path": "x.zarr", "data.z_window_size": 5, "data.target_2d": False,
        "data.source_channels": ["BF", "DPC"], "data.target_channels": ["DAPI"]}))
    s = three_d.spec
    assert (s.in_channels, s.out_channels, s.z_window_size, s.out_depth) == (2, 1, 5, 5)
    assert "stem_kernel_size" not in three_d.kwargs  # VisCy's (5, 4, 4) fits
