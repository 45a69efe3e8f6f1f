"""Schema of a segmenter: method, Cellpose model, diameter, device (evaluate, predict and serve extend it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from viscy.config import StrictModel


class SegmenterConfig(StrictModel):
    """Which segmenter and its settings; ``viscy.segment.get_segmenter`` builds it."""

    method: Literal["classical", "cellpose"] = Field(
        "classical", description="'classical' (Gaussian + Otsu + watershed, no weights) or 'cellpose'."
    )
    model: str = Field("cpsam", description="Cellpose pretrained model name or path to a Cellpose 4 checkpoint.")
    diameter: float | None = Field(
        None, gt=0, description="Object diameter in pixels; None: Cellpose's default / 15 px for 'classical'."
    )
    gpu: Literal["auto", True, False] = Field("auto", description="Run Cellpose on CUDA: auto, true or false.")
