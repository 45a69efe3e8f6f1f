"""Every verb on plates written by ome-zarr-py: NGFF 0.5 / zarr v3 (plain and sharded), NGFF 0.4 with ``s0`` pyramids.

``viscy info``, ``preprocess``, ``train`` (one short epoch), ``predict`` with the trained ``best_model.pt`` into a
new store and ``evaluate`` of those predictions, through Ray, on copies of the stores in ``tests/data/stores``
(``make_fixtures.py``: 2 wells, T=2, C=3 ``Phase3D``/``Nuclei``/``Membrane``, Z=5, 48x64 uint16). One local Ray
cluster serves the module; the stores are preprocessed once, one training run reads all three, and one predict
job writes a store per plate (in the input's NGFF version, the default) that evaluate scores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.data.make_fixtures import CHANNELS, SHAPE
from viscy.data.config import PreprocessConfig
from viscy.data.plate import Plate
from viscy.evaluate.config import EvaluateConfig
from viscy.models.config import ModelConfig
from viscy.predict.config import PredictConfig
from viscy.train.config import TrainConfig

pytestmark = pytest.mark.slow

STORES = Path(__file__).resolve().parent / "stores"
PLATES = {  # store: (NGFF version, zarr format)
    "ngff05.zarr": ("0.5", 3),
    "ngff05_sharded.zarr": ("0.5", 3),
    "ngff04_pyramid.zarr": ("0.4", 2),
}
UNET = {"in_channels": 1, "out_channels": 2, "num_blocks": 2, "num_filters": 4}


@pytest.fixture(scope="module")
def plates(tmp_path_factory, ray_local) -> dict[str, Path]:
    """Writable copies of the three stores, preprocessed (statistics and a ``Nuclei`` foreground mask)."""
    from viscy.data.preprocess import run_preprocess

    root = tmp_path_factory.mktemp("ngff_verbs")
    out = {}
    for name in PLATES:
        path = Path(shutil.copytree(STORES / name, root / name))
        cfg = {"data_path": str(path), "grid_spacing": 4, "fg_mask": {"channel": "Nuclei"}}
        run_preprocess(PreprocessConfig.model_validate(cfg), progress=False)
        out[name] = path
    return out


def _attrs(group: Path) -> tuple[int, dict]:
    """The zarr format and attributes of a group, read from its metadata file (v3 ``zarr.json``, v2 ``.zattrs``)."""
    if (group / "zarr.json").is_file():
        meta = json.loads((group / "zarr.json").read_text())
        return meta["zarr_format"], meta["attributes"]
    return 2, json.loads((group / ".zattrs").read_text())


@pytest.mark.parametrize("store", sorted(PLATES))
def test_info_and_preprocess(plates, store, capsys):
    from viscy.cli import main

    path = plates[store]
    version, zarr_format = PLATES[store]
    assert main(["info", "--data_path", str(path)]) == 0
    printed = capsys.readouterr().out
    assert f"NGFF {version}, zarr v{zarr_format}" in printed and "Phase3D, Nuclei, Membrane" in printed
    assert "dataset statistics" in printed and "fg_mask" in printed
    # the statistics sit where iohub 0.3 / VisCy put them: top-level attributes (beside NGFF 0.5's "ome")
    for group in (path, path / "A/1/0", path / "A/2/0"):
        fmt, attrs = _attrs(group)
        assert fmt == zarr_format and set(attrs["normalization"]) == set(CHANNELS)
        if zarr_format == 3:
            assert attrs["ome"]["version"] == "0.5"  # the NGFF metadata are intact
    fmt, mask = _attrs(path / "A/1/0/fg_mask")
    assert fmt == zarr_format and mask["channel"] == "Nuclei"
    with Plate(path) as plate:
        assert plate.version == version and plate.image_key("A/1/0") == "s0"
        assert plate.array("A/2/0", "fg_mask").shape == (SHAPE[0], 1, *SHAPE[2:])
        fov = plate.normalization("A/1/0")["Phase3D"]
        assert fov["fov_statistics"]["iqr"] > 0 and set(fov["timepoint_statistics"]) == {"0", "1"}


def _predict_config(**kw) -> PredictConfig:
    return PredictConfig(progress=False, **kw)


@pytest.fixture(scope="module")
def trained(plates, tmp_path_factory) -> Path:
    """One short training run reading all three stores at once (A/1/0 of each trains, A/2/0 validates)."""
    from viscy.train.trainer import run_train

    storage = tmp_path_factory.mktemp("runs")
    config = TrainConfig.model_validate({
        "data": {"data_path": [str(p) for p in plates.values()], "yx_patch_size": [32, 32], "batch_size": 4,
                 "patches_per_stack": 1, "val_positions": ["A/2/0"], "augmentation": {"affine_prob": 0.0}},
        "model": {"name": "unet2d", "kwargs": UNET},
        "trainer": {"max_epochs": 1, "num_workers": 1, "cpus_per_worker": 0.5, "storage_path": str(storage),
                    "run_name": "ngff", "train_steps_per_epoch": 2, "val_steps": 1, "log_every_n_epochs": 1,
                    "lr": 1e-3},
    })
    result = run_train(config)
    assert result.epochs == 1 and result.best_model.is_file() and np.isfinite(result.metrics["val_loss"])
    return result.run_dir


def test_train_reads_every_store(plates, trained):
    from viscy.models import read_card
    from viscy.train.trainer import BEST_MODEL

    split = json.loads((trained / "run_info.json").read_text())["split"]
    for name, path in plates.items():  # 4 training reads cycle over the 3 training FOVs: every store is read
        assert any(entry.startswith(f"{path}::") and entry.endswith("A/1/0") for entry in split["train"]), name
        assert any(entry.startswith(f"{path}::") and entry.endswith("A/2/0") for entry in split["val"]), name
    card = read_card(trained / BEST_MODEL)
    assert card.source_channels == ["Phase3D"] and card.target_channels == ["Nuclei", "Membrane"]


@pytest.fixture(scope="module")
def predicted(plates, trained, tmp_path_factory) -> dict[str, Path]:
    """One predict job over the three stores with the trained best_model.pt: one new store per input plate."""
    from viscy.predict.run import run_predict
    from viscy.train.trainer import BEST_MODEL

    out = tmp_path_factory.mktemp("predictions")
    config = _predict_config(data_path=list(plates.values()), model=ModelConfig(checkpoint=trained / BEST_MODEL),
                             output=out)
    result = run_predict(config)
    assert result.fovs == 3 * 2 and result.outputs == [out / name for name in plates]
    again = run_predict(config)  # a rerun of the same job resumes: everything is complete
    assert again.fovs == 0 and again.skipped == 3 * 2
    return {name: out / name for name in plates}


@pytest.mark.parametrize("store", sorted(PLATES))
def test_predictions_keep_the_input_version(plates, predicted, store):
    version, zarr_format = PLATES[store]
    pred = predicted[store]
    with Plate(pred) as out, Plate(plates[store]) as src:
        assert (out.version, out.zarr_format) == (version, zarr_format)
        assert out.positions == src.positions == ["A/1/0", "A/2/0"]
        assert out.channel_names == ["Nuclei_prediction", "Membrane_prediction"]
        info = out.info("A/2/0")
        assert info.shape == (SHAPE[0], 2, *SHAPE[2:]) and info.dtype == np.float32 and info.shards is None
        assert info.chunks == (1, 1, 1, *SHAPE[3:]) and info.scale == src.info("A/2/0").scale
        values = out.read("A/2/0", 1)
        assert np.isfinite(values).all() and values.std() > 0
        state = out.position_attrs("A/1/0")["viscy_prediction"]
        assert state["complete"] is True and out.plate_attrs()["viscy_prediction"]["store"] is True
    if zarr_format == 3:
        meta = json.loads((pred / "A/1/0/0/zarr.json").read_text())
        assert meta["data_type"] == "float32" and meta["dimension_names"] == ["t", "c", "z", "y", "x"]


@pytest.mark.parametrize("store", sorted(PLATES))
def test_evaluate_predictions(plates, predicted, store, tmp_path):
    import pandas as pd

    from viscy.evaluate.run import run_evaluate

    summary = run_evaluate(EvaluateConfig(
        data_path=plates[store], prediction_path=predicted[store], output_dir=tmp_path / "eval", z_slices="all",
        num_example_panels=1,
    )).summary  # regression metrics only: segmentation (null) is off by default
    assert set(summary["mean"]) == {"Nuclei", "Membrane"} and summary["units"]["Nuclei"].startswith("normalized")
    assert summary["source_channels"] == ["Phase3D"]  # from the prediction job's metadata
    table = pd.read_parquet(tmp_path / "eval" / "metrics.parquet")
    assert len(table) == 2 * SHAPE[0] * 2 * SHAPE[2]  # positions x t x channels x z
    assert np.isfinite(table["mae"]).all() and table["pearson"].between(-1, 1).all()
    assert (tmp_path / "eval" / "figures" / "example_A_1_0.png").is_file()


def test_output_version_option_and_append_refusal(plates, trained, tmp_path):
    from viscy.errors import DataError
    from viscy.predict.run import run_predict
    from viscy.train.trainer import BEST_MODEL

    model = ModelConfig(checkpoint=trained / BEST_MODEL)
    v2 = plates["ngff04_pyramid.zarr"]
    out = tmp_path / "as05.zarr"
    run_predict(_predict_config(data_path=[v2], model=model, output=out, ngff_version="0.5"))
    with Plate(out) as pred:
        assert (pred.version, pred.zarr_format) == ("0.5", 3) and pred.positions == ["A/1/0", "A/2/0"]
        assert pred.image_axes("A/1/0") == Plate(v2).image_axes("A/1/0")
        assert np.isfinite(pred.read("A/1/0", 0)).all()
    with pytest.raises(DataError, match=r"holds this job's predictions as NGFF 0.5, not 0.4.*overwrite"):
        run_predict(_predict_config(data_path=[v2], model=model, output=out, ngff_version="0.4"))
    v3 = plates["ngff05_sharded.zarr"]
    with pytest.raises(DataError, match=r"appends prediction channels to NGFF 0.4 \(zarr v2\) plates only"):
        run_predict(_predict_config(data_path=[v3], model=model))
    with pytest.raises(DataError, match=r"appending channels keeps the input plate's NGFF version \(0.4\)"):
        run_predict(_predict_config(data_path=[v2], model=model, ngff_version="0.5"))
