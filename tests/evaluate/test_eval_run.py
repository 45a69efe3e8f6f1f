"""End-to-end ``viscy evaluate`` on tiny synthetic plates through Ray, and its input errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.evaluate.eval_helpers import add_predictions, fake_prediction, synth_plate, write_prediction_masks
from viscy.cli import main
from viscy.errors import ChannelNotFoundError, DataError, ShapeError, ViscyError
from viscy.evaluate.config import EvaluateConfig, SegmentationConfig
from viscy.evaluate.metrics import REGRESSION_METRICS
from viscy.evaluate.run import evaluate_fov, plan_evaluation, run_evaluate
from viscy.segment.segmenters import get_segmenter


def test_end_to_end_same_plate(ray_local, predicted_plate: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    config = EvaluateConfig(
        data_path=predicted_plate,
        output_dir=out,
        prediction_units="raw",  # fake predictions appended without viscy metadata, in the targets' units
        source_channels=["Phase3D"],
        segmentation=SegmentationConfig(method="classical", channel="Nuclei", use_ground_truth_labels="nuclei"),
    )
    summary = run_evaluate(config).summary
    for name in ("metrics.csv", "metrics.parquet", "summary.json", "viscy_config.yaml", "viscy_evaluation.json",
                 "figures/metric_distributions.png", "figures/example_A_1_0.png", "figures/example_A_1_1.png"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp"))
    table = pd.read_parquet(out / "metrics.parquet")
    assert len(table) == 2 * 2  # 2 FOVs x 1 t x 2 channels x 1 z
    assert list(table.columns[:4]) == ["position", "t", "channel", "z"]
    assert pd.read_csv(out / "metrics.csv").shape == table.shape
    assert table["pearson"].between(0.8, 1.0).all()
    nuclei = table[table["channel"] == "Nuclei"]
    assert nuclei["ap_50"].notna().all() and table.loc[table["channel"] == "Membrane", "ap_50"].isna().all()
    assert (nuclei["ap_50"] > 0.5).all()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["complete"] and on_disk["n_rows"] == 4
    assert set(on_disk["mean"]) == {"Nuclei", "Membrane"}  # inferred from the *_prediction channels
    assert on_disk["units"] == {"Nuclei": "raw intensity", "Membrane": "raw intensity"}
    assert on_disk["units_from"]["Nuclei"] == "prediction_units (config)"
    assert set(REGRESSION_METRICS) <= set(on_disk["mean"]["Membrane"])
    assert summary["mean"]["Nuclei"]["ap_50_95"] == pytest.approx(nuclei["ap_50_95"].mean())
    printed = capsys.readouterr().out
    assert "pearson" in printed and "Nuclei" in printed and "Membrane" in printed


def test_separate_prediction_plate_all_slices(ray_local, tmp_path: Path, capsys) -> None:
    """Predictions in another plate with the same positions; 3D data scored on every slice; the prediction's
    masks that viscy predict stored there are reused and score like segmenting the prediction."""
    from iohub.ngff import open_ome_zarr

    target = synth_plate(tmp_path / "t.zarr", yx=(64, 64), z=3, fovs=1)
    rng = np.random.default_rng(0)
    segment = get_segmenter(SegmentationConfig(method="classical"))
    with open_ome_zarr(target, mode="r") as src, open_ome_zarr(
        tmp_path / "p.zarr", layout="hcs", mode="w-", channel_names=["Nuclei_prediction"]
    ) as dst:
        for name, pos in src.positions():
            row, col, fov = name.split("/")
            prediction = fake_prediction(np.asarray(pos["0"][:, 1:2]), rng)
            dst.create_position(row, col, fov).create_image("0", prediction)
            masks = np.stack([segment(plane) for plane in prediction[0, 0]])[None, None]
    write_prediction_masks(tmp_path / "p.zarr", "A/1/0", "Nuclei_prediction", masks, method="classical")
    config = EvaluateConfig(
        data_path=target, prediction_path=tmp_path / "p.zarr", target_channels=["Nuclei"], z_slices="all",
        segmentation=SegmentationConfig(method="classical"), output_dir=tmp_path / "out", num_example_panels=1,
        prediction_units="raw",
    )
    summary = run_evaluate(config).summary
    assert summary["segmentation"]["channel"] == "Nuclei"  # default: the first target channel
    assert summary["source_channels"] is None  # no job metadata to infer it from, so no input panel
    table = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert sorted(table["z"]) == [0, 1, 2]
    assert table["ap_50"].notna().all()  # segmented target vs the prediction's stored masks
    assert (tmp_path / "out" / "figures" / "example_A_1_0.png").is_file()
    masks_summary = json.loads((tmp_path / "out" / "summary.json").read_text())["segmentation"]["prediction_masks"]
    assert masks_summary["label_image"] == "labels/Nuclei_prediction_masks" and masks_summary["reused"] == ["A/1/0"]
    assert "reusing the masks labels/Nuclei_prediction_masks" in capsys.readouterr().out
    segmenting = dataclasses.replace(plan_evaluation(config), masks=None)
    expected = pd.DataFrame(evaluate_fov(segmenting, "A/1/0", 0, with_panel=False)[0])
    scored = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    pd.testing.assert_frame_equal(scored[expected.columns], expected, check_dtype=False)


def test_missing_prediction_channel(tmp_path: Path) -> None:
    plate = synth_plate(tmp_path / "p.zarr", yx=(64, 64), fovs=1)
    config = EvaluateConfig(data_path=plate, output_dir=tmp_path / "out")
    with pytest.raises(ChannelNotFoundError, match=r"no prediction channel.*Phase3D, Nuclei, Membrane.*viscy predict"):
        run_evaluate(config)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_shape_mismatch(tmp_path: Path) -> None:
    target = synth_plate(tmp_path / "t.zarr", yx=(64, 64), fovs=1)
    pred = add_predictions(synth_plate(tmp_path / "p.zarr", yx=(96, 96), fovs=1))
    config = EvaluateConfig(data_path=target, prediction_path=pred, output_dir=tmp_path / "out", prediction_units="raw")
    with pytest.raises(ShapeError, match=r"does not match"):
        plan_evaluation(config)


def test_bad_segmentation_inputs(tmp_path: Path, predicted_plate: Path) -> None:
    seg = SegmentationConfig(method="classical", channel="Nuclei", use_ground_truth_labels="membranes")
    with pytest.raises(DataError, match=r"no label image 'membranes'.*nuclei, cells"):
        plan_evaluation(EvaluateConfig(data_path=predicted_plate, segmentation=seg, prediction_units="raw"))
    seg = SegmentationConfig(method="classical", channel="Phase3D")
    with pytest.raises(ViscyError, match="not a target channel"):
        plan_evaluation(EvaluateConfig(data_path=predicted_plate, segmentation=seg))


def test_cli_reports_errors(tmp_path: Path, predicted_plate: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["evaluate", "--data_path", str(predicted_plate), "--segmentation.method", "stardist"]) == 2
    assert "allowed values" in capsys.readouterr().err
    code = main(["evaluate", "--data_path", str(predicted_plate), "--output_dir", str(out),
                 "--target_channels", "Nuclei", "--prediction_suffix", "_pred"])
    assert code == 1
    assert "viscy predict" in capsys.readouterr().err
    assert not out.exists()
    assert main(["evaluate", "--help"]) == 0
    assert "segmentation.use_ground_truth_labels" in capsys.readouterr().out


def test_rerun_never_deletes_or_writes_through_a_linked_folder(tmp_path: Path) -> None:
    from viscy.evaluate.output import check_output_dir, prepare_output_dir

    out = tmp_path / "eval"
    planned = ["viscy_config.yaml", "figures/metric_distributions.png", "summary.json"]
    prepare_output_dir(out, check_output_dir(out, planned), planned)  # a previous evaluation's marker
    (out / "figures").mkdir()
    for name in planned:
        (out / name).write_text("written by viscy")
    assert check_output_dir(out, planned) == sorted(planned)

    # the figures folder becomes a link to a folder of the user's that holds a file of the same name
    users = tmp_path / "users_figures"
    (out / "figures").rename(users)
    (users / "metric_distributions.png").write_text("the user's")
    (out / "figures").symlink_to(users, target_is_directory=True)
    with pytest.raises(DataError, match=r"symbolic link\(s\) figures where viscy evaluate writes or removes"):
        check_output_dir(out, planned)
    with pytest.raises(DataError, match="symbolic link"):
        prepare_output_dir(out, sorted(planned), planned)  # checked again right before removing
    assert (users / "metric_distributions.png").read_text() == "the user's"
    assert (out / "summary.json").read_text() == "written by viscy"  # nothing removed either

    # a link at a temporary name viscy writes, or at a new output file, is refused too
    (out / "figures").unlink()
    (out / "figures").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "summary.json.tmp").symlink_to(victim)
    with pytest.raises(DataError, match=r"summary.json.tmp"):
        check_output_dir(out, planned)
    (out / "summary.json.tmp").unlink()
    (out / "metrics.csv").symlink_to(tmp_path / "would_be_created.csv")
    with pytest.raises(DataError, match=r"holds metrics.csv, which the previous viscy evaluation there did not write"):
        check_output_dir(out, [*planned, "metrics.csv"])
    assert victim.read_text() == "precious" and not (tmp_path / "would_be_created.csv").exists()
