"""``viscy evaluate`` compares like with like on a plate unlike the synthetic one.

The plate is uint16, non-square (96 x 160), T=2, channels BF/DAPI/GFP, tiled chunks (48 x 64); statistics
come from the real ``run_preprocess`` and predictions from the real ``run_predict`` (a tiny unet2d), so
the prediction-job metadata evaluate reads is the one ``viscy predict`` writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import ndimage as ndi

from viscy.data.config import NormalizationConfig
from viscy.errors import DataError
from viscy.evaluate.config import EvaluateConfig, SegmentationConfig
from viscy.evaluate.metrics import regression_metrics
from viscy.evaluate.output import MARKER_NAME
from viscy.evaluate.run import plan_evaluation, run_evaluate
from viscy.models.config import ModelConfig

CHANNELS = ("BF", "DAPI", "GFP")
TARGETS = ["DAPI", "GFP"]
SHAPE = (2, 3, 1, 96, 160)
POSITIONS = (("A", "1", "0"), ("B", "2", "0"))
UNET_KW = {"in_channels": 1, "out_channels": 2, "num_blocks": 2, "num_filters": 4}
# Targets normalised with mean/std (not VisCy's median/iqr default), so the test sees the metadata being used.
NORMS = [
    NormalizationConfig(channels=["BF"]),
    NormalizationConfig(channels=TARGETS, subtrahend="mean", divisor="std"),
]
NOISE = 0.1  # of the good prediction, in normalised units


def write_uint16_plate(path: Path, seed: int = 7) -> Path:
    """Smooth bright blobs on a 100-count background, up to ~4000 counts, stored as uint16 in 48 x 64 chunks."""
    from iohub.ngff import open_ome_zarr

    rng = np.random.default_rng(seed)
    with open_ome_zarr(path, layout="hcs", mode="w-", channel_names=list(CHANNELS)) as plate:
        for row, col, fov in POSITIONS:
            data = np.empty(SHAPE, np.float32)
            for t in range(SHAPE[0]):
                for c in range(SHAPE[1]):
                    blobs = ndi.gaussian_filter(rng.random(SHAPE[3:]), 3)
                    blobs = (blobs - blobs.min()) / np.ptp(blobs)
                    data[t, c, 0] = 100 + 3900 * blobs**2
            pos = plate.create_position(row, col, fov)
            pos.create_image("0", data.astype(np.uint16), chunks=(1, 1, 1, 48, 64))
    return path


def _fov_names() -> list[str]:
    return ["/".join(p) for p in POSITIONS]


def _normalized_target(plate_path: Path, fov: str) -> np.ndarray:
    """(T, 2, Z, Y, X) targets normalised by hand from the stored fov mean/std (independent of viscy's code)."""
    from viscy.data.plate import Plate

    with Plate(plate_path) as plate:
        stats = plate.normalization(fov)
        out = []
        for t in range(SHAPE[0]):
            raw = plate.read(fov, t, plate.channel_indices(TARGETS)).astype(np.float64)
            for c, ch in enumerate(TARGETS):
                s = stats[ch]["fov_statistics"]
                raw[c] = (raw[c] - s["mean"]) / s["std"]
            out.append(raw)
    return np.stack(out)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, ray_local) -> dict[str, Path]:
    """The plate, real prediction stores (normalised and de-normalised) and a good normalised prediction."""
    import torch
    import zarr

    from tests.helpers import save_lightning_checkpoint
    from viscy.data.config import PreprocessConfig
    from viscy.data.preprocess import run_preprocess
    from viscy.models import create_model
    from viscy.predict.config import PredictConfig
    from viscy.predict.run import run_predict

    root = tmp_path_factory.mktemp("units")
    plate = write_uint16_plate(root / "plate.zarr")
    run_preprocess(PreprocessConfig(data_path=plate, grid_spacing=1), progress=False)
    torch.manual_seed(0)
    ckpt = save_lightning_checkpoint(create_model("unet2d", **UNET_KW).eval(), root / "unet2d.ckpt")
    model = ModelConfig(name="unet2d", kwargs=UNET_KW, checkpoint=ckpt)
    common = {"data_path": [plate], "model": model, "source_channels": ["BF"], "target_channels": TARGETS,
              "normalization": NORMS, "progress": False}
    run_predict(PredictConfig(output=root / "pred.zarr", **common))
    run_predict(PredictConfig(output=root / "pred_denorm.zarr", denormalize=True, **common))
    # A prediction that resembles its target: the job's own store (metadata and markers untouched), with the
    # prediction channels replaced by the normalised target plus noise.
    good = root / "good.zarr"
    shutil.copytree(root / "pred.zarr", good)
    rng = np.random.default_rng(1)
    for fov in _fov_names():
        arr = zarr.open_array(str(good / fov / "0"), mode="r+")
        target = _normalized_target(plate, fov)
        arr[:] = (target + rng.normal(0, NOISE, target.shape)).astype(np.float32)
    return {"root": root, "plate": plate, "pred": root / "pred.zarr", "denorm": root / "pred_denorm.zarr",
            "good": good}


def _copy_without_job_metadata(src: Path, dst: Path) -> Path:
    """A prediction store as another tool would write it: same arrays, no viscy_prediction attributes."""
    import zarr

    shutil.copytree(src, dst)
    for group in (dst, *(dst / fov for fov in _fov_names())):
        attrs = zarr.open_group(str(group), mode="r+").attrs
        if "viscy_prediction" in attrs:
            del attrs["viscy_prediction"]
    return dst


def test_normalized_predictions_scored_in_normalized_units(assets, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    # No channel keys: targets come from the *_prediction channels, the input panel from the job's sources.
    config = EvaluateConfig(data_path=assets["plate"], prediction_path=assets["good"], output_dir=out)
    summary = run_evaluate(config).summary
    assert summary["channels"] == TARGETS and summary["source_channels"] == ["BF"]
    assert summary["units"] == {ch: "normalized (fov_statistics mean/std)" for ch in TARGETS}
    assert set(summary["units_from"].values()) == {"prediction job metadata"}
    resolved = yaml.safe_load((out / "viscy_config.yaml").read_text())
    assert resolved["target_channels"] == TARGETS and resolved["source_channels"] == ["BF"]
    assert json.loads((out / "summary.json").read_text())["units"]["GFP"] == "normalized (fov_statistics mean/std)"

    table = pd.read_parquet(out / "metrics.parquet")
    assert len(table) == 2 * 2 * 2  # positions x time points x channels
    assert sorted(table["t"].unique()) == [0, 1]
    # SSIM agrees with Pearson (compared with raw targets, SSIM was ~0.02 at Pearson 0.83).
    assert (table["pearson"] > 0.9).all() and (table["ssim"] > 0.8).all(), table[["pearson", "ssim"]]
    # MAE in normalised units: |N(0, 0.1)| has mean 0.1 * sqrt(2 / pi) ~= 0.08.
    assert table["mae"].between(0.05, 0.12).all(), table["mae"]
    # The same numbers by hand from the stored statistics, and what the raw comparison would have said.
    import zarr

    row = table[(table["position"] == "B/2/0") & (table["t"] == 1) & (table["channel"] == "GFP")].iloc[0]
    target = _normalized_target(assets["plate"], "B/2/0")[1, 1, 0]
    pred = np.asarray(zarr.open_array(str(assets["good"] / "B/2/0/0"), mode="r")[1, 1, 0], np.float64)
    assert row["mae"] == pytest.approx(np.abs(pred - target).mean(), rel=1e-3)
    assert row["pearson"] == pytest.approx(np.corrcoef(pred.ravel(), target.ravel())[0, 1], abs=1e-4)
    from viscy.data.plate import Plate

    with Plate(assets["plate"]) as plate:
        raw = plate.read("B/2/0", 1, plate.channel_indices(["GFP"]))[0, 0].astype(np.float32)
    assert regression_metrics(raw, pred.astype(np.float32))["ssim"] < 0.2  # the old, mixed-units comparison
    assert (out / "figures" / "example_A_1_0.png").is_file() and (out / "figures" / "example_B_2_0.png").is_file()


def test_denormalized_predictions_scored_raw(assets, tmp_path: Path) -> None:
    import zarr

    from viscy.data.plate import Plate

    out = tmp_path / "eval"
    config = EvaluateConfig(data_path=assets["plate"], prediction_path=assets["denorm"], output_dir=out,
                            segmentation=SegmentationConfig(method="classical"), num_example_panels=1)
    summary = run_evaluate(config).summary
    assert summary["units"] == {ch: "raw intensity" for ch in TARGETS}
    assert summary["prediction_job"]["units"] == "raw intensity (denormalized)"
    assert summary["segmentation"]["channel"] == "DAPI"  # default: the first target channel
    table = pd.read_parquet(out / "metrics.parquet")
    assert table.loc[table["channel"] == "DAPI", "ap_50"].notna().all()
    assert table.loc[table["channel"] == "GFP", "ap_50"].isna().all()
    row = table[(table["position"] == "A/1/0") & (table["t"] == 0) & (table["channel"] == "DAPI")].iloc[0]
    with Plate(assets["plate"]) as plate:
        raw = plate.read("A/1/0", 0, plate.channel_indices(["DAPI"]))[0, 0].astype(np.float32)
    pred = np.asarray(zarr.open_array(str(assets["denorm"] / "A/1/0/0"), mode="r")[0, 0, 0])
    expected = regression_metrics(raw, pred)
    for name in ("pearson", "mae", "psnr"):
        assert row[name] == pytest.approx(expected[name], rel=1e-5), name


def test_previous_evaluation_is_replaced(assets, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    config = EvaluateConfig(data_path=assets["plate"], prediction_path=assets["pred"], output_dir=out)
    run_evaluate(config)
    assert (out / "figures" / "example_B_2_0.png").is_file() and (out / MARKER_NAME).is_file()
    (out / "notes.txt").write_text("mine")
    (out / "figures" / "my_plot.png").write_bytes(b"mine")
    run_evaluate(config.model_copy(update={"num_example_panels": 1}))
    assert not (out / "figures" / "example_B_2_0.png").exists()  # a stale figure of the previous run
    assert (out / "figures" / "example_A_1_0.png").is_file()
    assert (out / "notes.txt").read_text() == "mine" and (out / "figures" / "my_plot.png").read_bytes() == b"mine"
    marker = json.loads((out / MARKER_NAME).read_text())
    assert "figures/example_B_2_0.png" not in marker["files"] and "summary.json" in marker["files"]
    assert json.loads((out / "summary.json").read_text())["complete"]


def test_output_dir_viscy_did_not_write_is_refused(assets, tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.csv").write_text("my own table\n")
    (out / "summary.json").write_text('{"mine": true}')
    before = {p: p.read_bytes() for p in out.iterdir()}
    config = EvaluateConfig(data_path=assets["plate"], prediction_path=assets["pred"], output_dir=out)
    with pytest.raises(DataError, match=rf"output_dir {out} is not empty.*choose another output_dir"):
        run_evaluate(config)
    assert {p: p.read_bytes() for p in out.iterdir()} == before
    # A previous evaluation does not license overwriting a file it did not write.
    (out / MARKER_NAME).write_text(json.dumps({"viscy_evaluation": 1, "files": ["summary.json"]}))
    with pytest.raises(DataError, match=r"metrics.csv, which the previous viscy evaluation there did not write"):
        run_evaluate(config)
    assert {p: p.read_bytes() for p in out.iterdir() if p.name != MARKER_NAME} == before
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        run_evaluate(config.model_copy(update={"output_dir": a_file}))


def test_missing_target_statistics_names_preprocess(assets, tmp_path: Path) -> None:
    import zarr

    plate = tmp_path / "plate.zarr"
    shutil.copytree(assets["plate"], plate)
    attrs = zarr.open_group(str(plate / "B/2/0"), mode="r+").attrs
    norm = dict(attrs["normalization"])
    del norm["GFP"]
    attrs["normalization"] = norm
    out = tmp_path / "eval"
    config = EvaluateConfig(data_path=plate, prediction_path=assets["good"], output_dir=out)
    with pytest.raises(DataError, match=rf"B/2/0.*GFP.*viscy preprocess --data_path {plate} --channels GFP`"):
        run_evaluate(config)
    assert not out.exists()
    # Raw predictions need no statistics.
    plan = plan_evaluation(config.model_copy(update={"prediction_path": assets["denorm"]}))
    assert [u.label for u in plan.units] == ["raw intensity", "raw intensity"]


def test_units_of_foreign_and_incomplete_predictions(assets, tmp_path: Path) -> None:
    import zarr

    foreign = _copy_without_job_metadata(assets["good"], tmp_path / "foreign.zarr")
    config = EvaluateConfig(data_path=assets["plate"], prediction_path=foreign)
    with pytest.raises(DataError, match=r"units of prediction channel 'DAPI_prediction'.*Set prediction_units"):
        plan_evaluation(config)
    plan = plan_evaluation(config.model_copy(update={"prediction_units": "normalized"}))
    assert [u.label for u in plan.units] == ["normalized (fov_statistics median/iqr)"] * 2
    assert plan.config.source_channels is None  # no job metadata: no input panel unless source_channels is set
    mean_std = [NormalizationConfig(subtrahend="mean", divisor="std")]
    plan = plan_evaluation(
        config.model_copy(update={"prediction_units": "normalized", "target_normalization": mean_std})
    )
    assert plan.units[1].label == "normalized (fov_statistics mean/std)"
    assert plan_evaluation(config.model_copy(update={"prediction_units": "raw"})).units[0].label == "raw intensity"

    # The config may not contradict what the prediction job recorded.
    with pytest.raises(DataError, match=r"prediction_units: raw contradicts.*set prediction_units: auto"):
        plan_evaluation(config.model_copy(update={"prediction_path": assets["good"], "prediction_units": "raw"}))

    # A position the job never finished is refused (its channels may hold zeros).
    partial = tmp_path / "partial.zarr"
    shutil.copytree(assets["good"], partial)
    del zarr.open_group(str(partial / "B/2/0"), mode="r+").attrs["viscy_prediction"]
    with pytest.raises(DataError, match=r"B/2/0 .*not complete.*viscy predict"):
        plan_evaluation(EvaluateConfig(data_path=assets["plate"], prediction_path=partial))
    assert plan_evaluation(EvaluateConfig(data_path=assets["plate"], prediction_path=partial, positions=["A/*"]))


def test_each_panel_has_its_own_display_range() -> None:
    from viscy.evaluate.figures import display_range, draw_example_panel

    rng = np.random.default_rng(0)
    raw = ndi.gaussian_filter(rng.random((48, 80)), 2)
    raw = 100 + 3900 * (raw - raw.min()) / np.ptp(raw)  # raw counts, ~[100, 4000]
    normalized = (raw - raw.mean()) / raw.std()  # ~[-2, 3]
    panel = {
        "title": "A/1/0 t=0 z=0",
        "source": raw[::-1],
        "source_name": "BF",
        "channels": [{"name": "DAPI", "target": raw, "prediction": normalized, "units": "raw intensity",
                      "metrics": {"pearson": 1.0, "ssim": 0.01}}],
    }
    fig = draw_example_panel(panel)
    (src_lim, tgt_lim, pred_lim) = [ax.images[0].get_clim() for ax in fig.axes[:3]]
    assert 100 <= tgt_lim[0] < tgt_lim[1] <= 4000 and 100 <= src_lim[0] < src_lim[1] <= 4000
    assert normalized.min() <= pred_lim[0] < pred_lim[1] <= normalized.max()
    assert pred_lim == pytest.approx(display_range(normalized)) and tgt_lim == pytest.approx(display_range(raw))
    assert "raw intensity" in fig.axes[1].get_title()
    assert display_range(np.full((4, 4), 7.0)) == (7.0, 8.0)
