"""Segmenter registry and the classical nuclei segmenter on synthetic nuclei."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.evaluate.eval_helpers import synth_plate
from viscy.data.plate import Plate
from viscy.errors import ModelError, ViscyError
from viscy.segment.config import SegmenterConfig
from viscy.segment.metrics import segmentation_metrics
from viscy.segment.segmenters import check_segmenter, get_segmenter


def test_classical_recovers_synthetic_nuclei(tmp_path: Path) -> None:
    path = synth_plate(tmp_path / "p.zarr", yx=(128, 128))
    segment = get_segmenter(SegmenterConfig(method="classical"))
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
    segment = get_segmenter(SegmenterConfig(method="classical", diameter=10))
    assert segment(np.zeros((32, 32), np.float32)).max() == 0


def test_classical_does_not_depend_on_the_intensity_scale(tmp_path: Path) -> None:
    """The same nuclei at any scale, down to subnormal float32 values (which once smoothed to NaN)."""
    path = synth_plate(tmp_path / "p.zarr", yx=(64, 64))
    segment = get_segmenter(SegmenterConfig(method="classical"))
    with Plate(path) as plate:
        nuclei = plate.read(plate.positions[0], 0, plate.channel_indices(["Nuclei"]))[0, 0].astype(np.float32)
    masks = segment(nuclei)
    assert masks.max() > 0
    for scale in (1e-30, 1e30):
        np.testing.assert_array_equal(segment(nuclei * np.float32(scale)), masks)
    subnormal = np.random.default_rng(0).integers(1, 20, size=(34, 35)).astype(np.int32).view(np.float32)
    assert segment(subnormal).shape == (34, 35)


def test_unknown_segmenter_and_bad_cellpose_model(tmp_path: Path) -> None:
    config = SegmenterConfig(method="classical")
    object.__setattr__(config, "method", "stardist")  # bypass validation to reach the registry check
    with pytest.raises(ViscyError, match="unknown segmentation method 'stardist'.*classical"):
        get_segmenter(config)
    pytest.importorskip("cellpose")
    with pytest.raises(ModelError, match="does not exist"):
        check_segmenter(SegmenterConfig(method="cellpose", model=str(tmp_path / "missing.pt")))
    with pytest.raises(ModelError, match="unknown Cellpose model"):
        check_segmenter(SegmenterConfig(method="cellpose", model="not_a_model"))


def _two_spheres(shape: tuple[int, int, int] = (16, 48, 48), radius: int = 6) -> np.ndarray:
    """Two bright balls of ``radius`` centred on the middle slice, far apart, on a noisy dark background."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    zc = shape[0] // 2
    volume = np.zeros(shape, np.float32)
    for yc, xc in ((14, 14), (34, 34)):
        volume[(z - zc) ** 2 + (y - yc) ** 2 + (x - xc) ** 2 < radius**2] = 1
    return volume + np.random.default_rng(0).normal(0, 0.05, shape).astype(np.float32)


def test_classical_segments_a_volume_in_3d() -> None:
    """Two separated spheres are two objects, each one label through every slice it spans."""
    volume = _two_spheres()
    segment = get_segmenter(SegmenterConfig(method="classical", diameter=12))
    labels = segment(volume)
    assert labels.shape == volume.shape and labels.dtype == np.int32
    assert sorted(np.unique(labels)) == [0, 1, 2]
    for label in (1, 2):
        slices = np.flatnonzero((labels == label).any(axis=(1, 2)))
        assert len(slices) >= 7, slices  # a ball of radius 6 spans 11 slices; a per-slice id would span 1
    # A stack thinner than the objects keeps them (the minimum size is cut to the stack's depth).
    assert sorted(np.unique(segment(volume[6:10]))) == [0, 1, 2]


def test_classical_one_slice_volume_is_the_2d_segmentation() -> None:
    plane = _two_spheres()[8]
    segment = get_segmenter(SegmenterConfig(method="classical", diameter=12))
    np.testing.assert_array_equal(segment(plane[None]), segment(plane)[None])
    with pytest.raises(ValueError, match="2D image or a 3D volume"):
        segment(np.zeros((2, 2, 8, 8), np.float32))
