"""Segmenter registry and the classical nuclei segmenter on synthetic nuclei."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.evaluate.eval_helpers import synth_plate
from viscy.data.plate import Plate
from viscy.errors import ModelError, ViscyError
from viscy.evaluate.config import SegmentationConfig
from viscy.evaluate.metrics import segmentation_metrics
from viscy.evaluate.segment import check_segmenter, get_segmenter


def test_classical_recovers_synthetic_nuclei(tmp_path: Path) -> None:
    path = synth_plate(tmp_path / "p.zarr", yx=(128, 128))
    segment = get_segmenter(SegmentationConfig(method="classical"))
    with Plate(path) as plate:
        for name in plate.positions:
            nuclei = plate.read(name, 0, plate.channel_indices(["Nuclei"]))[0, 0]
            truth = plate.read(name, 0, [0], array="labels/nuclei/0")[0, 0]
            masks = segment(nuclei)
            assert masks.shape == nuclei.shape and masks.dtype == np.int32
            m = segmentation_metrics(truth, masks)
            assert m["ap_50"] > 0.5, m
            assert m["dice"] > 0.8, m


def test_classical_blank_image() -> None:
    segment = get_segmenter(SegmentationConfig(method="classical", diameter=10))
    assert segment(np.zeros((32, 32), np.float32)).max() == 0


def test_classical_does_not_depend_on_the_intensity_scale(tmp_path: Path) -> None:
    """The same nuclei at any scale, down to subnormal float32 values (which once smoothed to NaN)."""
    path = synth_plate(tmp_path / "p.zarr", yx=(64, 64))
    segment = get_segmenter(SegmentationConfig(method="classical"))
    with Plate(path) as plate:
        nuclei = plate.read(plate.positions[0], 0, plate.channel_indices(["Nuclei"]))[0, 0].astype(np.float32)
    masks = segment(nuclei)
    assert masks.max() > 0
    for scale in (1e-30, 1e30):
        np.testing.assert_array_equal(segment(nuclei * np.float32(scale)), masks)
    subnormal = np.random.default_rng(0).integers(1, 20, size=(34, 35)).astype(np.int32).view(np.float32)
    assert segment(subnormal).shape == (34, 35)


def test_unknown_segmenter_and_bad_cellpose_model(tmp_path: Path) -> None:
    config = SegmentationConfig(method="classical")
    object.__setattr__(config, "method", "stardist")  # bypass validation to reach the registry check
    with pytest.raises(ViscyError, match="unknown segmentation method 'stardist'.*classical"):
        get_segmenter(config)
    pytest.importorskip("cellpose")
    with pytest.raises(ModelError, match="does not exist"):
        check_segmenter(SegmentationConfig(method="cellpose", model=str(tmp_path / "missing.pt")))
    with pytest.raises(ModelError, match="unknown Cellpose model"):
        check_segmenter(SegmentationConfig(method="cellpose", model="not_a_model"))
