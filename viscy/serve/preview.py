"""The JSON answer of ``/v1/stain-and-segment`` for the page: PNG previews of the middle Z slice, and timings."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from viscy.serve.models import ServedModel


def _png(plane: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(plane).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _gray(plane: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(plane, [1, 99.5])
    return (np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _labels_rgb(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    colors = rng.integers(60, 256, size=(int(labels.max()) + 1, 3), dtype=np.uint8)
    colors[0] = 0
    return colors[labels]


def preview(image: np.ndarray, pred: np.ndarray, masks: np.ndarray, served: ServedModel, channel: str,
            timing: dict[str, float]) -> dict[str, Any]:
    """PNG previews (middle Z slice) of the input, every predicted channel and the masks, with timings."""
    def middle(a: np.ndarray) -> np.ndarray:
        while a.ndim > 2:
            a = a[a.shape[0] // 2] if a.ndim == 3 else a[0]
        return a

    src = image[0] if image.ndim == 4 else image
    return {
        "model": served.name,
        "shape": list(image.shape),
        "channels": served.card.target_channels,
        "segmented": channel,
        "objects": int(masks.max()),
        "timing_ms": {k: round(v * 1000, 1) for k, v in timing.items()},
        "images": {
            "input": _png(_gray(middle(np.asarray(src, dtype=np.float32)))),
            **{ch: _png(_gray(middle(pred[i]))) for i, ch in enumerate(served.card.target_channels)},
            "masks": _png(_labels_rgb(middle(masks))),
        },
    }
