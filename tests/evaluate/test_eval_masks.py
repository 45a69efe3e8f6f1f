"""Masks viscy predict stored next to the predictions stand in for segmenting the prediction (no Ray: the plan and
one FOV's scoring run in this process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.evaluate.eval_helpers import add_predictions, synth_plate, write_prediction_masks
from viscy.data.plate import Plate
from viscy.evaluate.config import EvaluateConfig, SegmentationConfig
from viscy.evaluate.masks import mismatch
from viscy.evaluate.run import evaluate_fov, plan_evaluation
from viscy.segment.segmenters import get_segmenter

PREDICTION = "Nuclei_prediction"


@pytest.fixture
def stack_plate(tmp_path: Path) -> Path:
    """Two 64x64 FOVs of 3 slices with a Nuclei_prediction channel appended (viscy predict's append mode)."""
    return add_predictions(synth_plate(tmp_path / "p.zarr", yx=(64, 64), z=3, fovs=2), channels=("Nuclei",))


def _config(plate: Path, seg: SegmentationConfig) -> EvaluateConfig:
    return EvaluateConfig(
        data_path=plate, target_channels=["Nuclei"], prediction_units="raw", z_slices="all", segmentation=seg
    )


def _slice_masks(plate: Path, position: str, seg: SegmentationConfig) -> np.ndarray:
    """(T, 1, Z, Y, X) masks as viscy predict writes them with dims 2d: every slice segmented on its own."""
    segment = get_segmenter(seg)
    with Plate(plate) as p:
        prediction = p.read(position, 0, p.channel_indices([PREDICTION]))[0]
    return np.stack([segment(plane) for plane in prediction])[None, None]


def test_stored_masks_give_the_scores_of_segmenting(stack_plate: Path) -> None:
    seg = SegmentationConfig(method="classical", channel="Nuclei")
    segmenting = plan_evaluation(_config(stack_plate, seg))
    assert segmenting.masks.keys == {} and segmenting.masks.not_reused == {}
    masks = _slice_masks(stack_plate, "A/1/0", seg)
    # diameter 15 is what classical uses when the config leaves it out, so the two agree
    write_prediction_masks(stack_plate, "A/1/0", PREDICTION, masks, method="classical", diameter=15.0)

    reusing = plan_evaluation(_config(stack_plate, seg))
    assert reusing.masks.keys == {"A/1/0": f"labels/{PREDICTION}_masks/0"}  # A/1/1 has none: segmented
    with Plate(stack_plate) as p:
        assert {"nuclei", "cells", f"{PREDICTION}_masks"} <= set(p.labels("A/1/0"))  # the plate's labels are kept
    scored, _ = evaluate_fov(reusing, "A/1/0", 0, with_panel=False)
    expected, _ = evaluate_fov(segmenting, "A/1/0", 0, with_panel=False)
    pd.testing.assert_frame_equal(pd.DataFrame(scored), pd.DataFrame(expected))
    assert pd.DataFrame(scored)["n_pred"].gt(0).all()
    summary = reusing.masks.summary(reusing.positions)
    assert summary == {
        "label_image": f"labels/{PREDICTION}_masks", "reused": ["A/1/0"], "segmented": ["A/1/1"], "not_reused": {}
    }
    (line,) = reusing.masks.console_lines(stack_plate, len(reusing.positions))
    assert f"reusing the masks labels/{PREDICTION}_masks" in line and "1 of 2 positions" in line

    # The scores come from the stored masks, not from segmenting again: blank masks find no object.
    write_prediction_masks(stack_plate, "A/1/0", PREDICTION, np.zeros_like(masks), method="classical", diameter=15.0)
    blank, _ = evaluate_fov(reusing, "A/1/0", 0, with_panel=False)
    assert all(row["n_pred"] == 0 and row["ap_50"] == 0 for row in blank)


@pytest.mark.parametrize(
    ("written", "why"),
    [
        ({"method": "cellpose", "model": "cpsam"}, "method 'cellpose'"),
        ({"diameter": 10.0}, "diameter 10.0"),
        ({"complete": False}, "incomplete"),
        ({"dims": "3d"}, "dims '3d'"),
        ({"record": False}, "no viscy_segmentation record"),
        ({"time_points": 2}, "shape (2, 1, 3, 64, 64)"),
    ],
)
def test_masks_made_otherwise_are_not_reused(stack_plate: Path, written: dict, why: str) -> None:
    seg = SegmentationConfig(method="classical", channel="Nuclei")
    record = {"diameter": None, **written}
    masks = np.zeros((record.pop("time_points", 1), 1, 3, 64, 64), np.int32)
    write_prediction_masks(stack_plate, "A/1/1", PREDICTION, masks, **record)
    plan = plan_evaluation(_config(stack_plate, seg))
    assert plan.masks.keys == {}
    assert why in plan.masks.not_reused["A/1/1"]
    (line,) = plan.masks.console_lines(stack_plate, len(plan.positions))
    assert "A/1/1" in line and why in line and "segmenting the prediction instead" in line


def test_mismatch_of_records() -> None:
    record = {"channel": PREDICTION, "method": "cellpose", "model": "cpsam", "diameter": None, "dims": "2d",
              "complete": True}
    cellpose = SegmentationConfig(method="cellpose", channel="Nuclei")
    assert mismatch(record, cellpose, PREDICTION, nz=3) is None
    assert "Cellpose model 'cpsam'" in mismatch(record, cellpose.model_copy(update={"model": "cyto3"}), PREDICTION, 3)
    # Cellpose's own diameter (None) is not a number: 30 px given explicitly is another setting
    assert "diameter None" in mismatch(record, cellpose.model_copy(update={"diameter": 30.0}), PREDICTION, 3)
    assert "masks of channel" in mismatch(record, cellpose, "Membrane_prediction", 3)
    # A one-slice stack segmented in 3D is the 2D segmentation
    assert mismatch({**record, "dims": "3d"}, cellpose, PREDICTION, nz=1) is None
    assert "dims '3d'" in mismatch({**record, "dims": "3d"}, cellpose, PREDICTION, nz=3)
