"""Cellpose-SAM through the real loading path, with a randomly initialised checkpoint (no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from viscy.segment.config import SegmenterConfig
from viscy.segment.metrics import segmentation_metrics
from viscy.segment.segmenters import get_segmenter


@pytest.mark.slow
def test_cellpose_segmenter_with_random_checkpoint(random_cpsam_checkpoint: Path) -> None:
    from tests.evaluate.eval_helpers import synth_plate
    from viscy.data.plate import Plate

    # 64² with 15-px nuclei: Cellpose resizes it to 128² (30-px cells); 128² (resized to 256²) took over 3x longer
    plate_path = synth_plate(random_cpsam_checkpoint.parent / "p.zarr", yx=(64, 64), fovs=1)
    with Plate(plate_path) as plate:
        image = plate.read("A/1/0", 0, plate.channel_indices(["Nuclei"]))[0, 0]
        truth = plate.read("A/1/0", 0, [0], array="labels/nuclei/0")[0, 0]
    segment = get_segmenter(
        SegmenterConfig(method="cellpose", model=str(random_cpsam_checkpoint), diameter=15, gpu="auto")
    )
    masks = segment(image)
    assert masks.shape == image.shape and masks.dtype == np.int32
    assert masks.min() >= 0
    m = segmentation_metrics(truth, masks)
    assert 0 <= m["ap_50_95"] <= 1 and 0 <= m["dice"] <= 1 and m["n_true"] > 0


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="Cellpose 3D runs the ViT-L on every ZY, ZX and YX plane: minutes on a CPU, seconds on a GPU",
)
def test_cellpose_segments_a_volume_in_3d(random_cpsam_checkpoint: Path) -> None:
    """A (Z, Y, X) volume goes through Cellpose's 3D path (do_3D) and comes back as one label volume."""
    segment = get_segmenter(SegmenterConfig(method="cellpose", model=str(random_cpsam_checkpoint), gpu=True))
    volume = np.random.default_rng(0).random((8, 64, 64)).astype(np.float32)
    masks = segment(volume)
    assert masks.shape == volume.shape and masks.dtype == np.int32 and masks.min() >= 0
