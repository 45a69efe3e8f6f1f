"""Where predicted masks live in a plate: ``viscy predict`` writes them, ``viscy evaluate`` reuses them.

``<fov>/labels/<prediction channel>_masks/0`` is an NGFF label image; its group's ``viscy_segmentation`` attribute
records how it was made (channel, method, model, diameter, dims) and whether every time point is written.
"""

from __future__ import annotations

SEGMENTATION_ATTR = "viscy_segmentation"
MASK_SUFFIX = "_masks"


def mask_label_name(prediction_channel: str) -> str:
    """Name of the label image holding a prediction channel's masks (``Nuclei_prediction_masks``)."""
    return prediction_channel + MASK_SUFFIX
