"""Cellpose through the Segmenter: the real CellposeModel(pretrained_model=path), random weights (slow on CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.serve.conftest import Server, phase_image
from viscy.serve import ServeClient


@pytest.mark.slow
def test_cellpose_segmentation_over_http(server: Server) -> None:
    client = ServeClient(server.url)
    image = phase_image((96, 96), seed=4)
    # one request: stain, then the Segmenter replica's CellposeModel (~1 min per image on this CPU)
    both = client.stain_and_segment(image, model="stain2d", method="cellpose", diameter=15)
    assert both.masks.shape == (96, 96) and both.masks.dtype == np.int32 and both.masks.min() >= 0
    assert both.timing_ms["segment"] > 0
