"""Masks ``viscy predict`` already wrote next to the predictions, reused instead of segmenting the prediction again.

The layout ``viscy predict`` writes: per position, the NGFF label image ``labels/<prediction channel>_masks``
(T, 1, Z, Y, X), whose group carries ``viscy_segmentation`` = ``{channel, method, model, diameter, dims,
complete}``. Evaluate scores each Z slice segmented on its own, so the masks are reused only when they were made
the same way: complete, for the same channel, with the same method, Cellpose model and diameter, and per slice
(``dims: 2d``; a one-slice stack is the same either way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from viscy.data.ngff import LABELS_GROUP, read_node
from viscy.data.plate import Plate
from viscy.errors import DataError
from viscy.evaluate.config import SegmentationConfig
from viscy.segment.layout import SEGMENTATION_ATTR, mask_label_name
from viscy.segment.segmenters import CLASSICAL_DEFAULT_DIAMETER


@dataclass(frozen=True)
class PredictionMasks:
    """Where the masks of the segmented prediction channel come from, per position.

    Attributes
    ----------
    keys
        Position -> array key of the stored masks that are reused (``labels/<label>/0``).
    not_reused
        Position -> why the masks stored there are not reused (positions without any are absent).
    """

    channel: str
    label: str
    keys: dict[str, str] = field(default_factory=dict)
    not_reused: dict[str, str] = field(default_factory=dict)

    def summary(self, positions: list[str]) -> dict[str, Any]:
        """What ``summary.json`` records: the label image, the positions reusing it and those segmented."""
        return {
            "label_image": f"{LABELS_GROUP}/{self.label}",
            "reused": [p for p in positions if p in self.keys],
            "segmented": [p for p in positions if p not in self.keys],
            "not_reused": dict(self.not_reused),
        }

    def console_lines(self, root: Path, n_positions: int) -> list[str]:
        """One line when masks are reused (naming the label image), one when stored masks are passed over."""
        lines = []
        image = f"{LABELS_GROUP}/{self.label}"
        if self.keys:
            lines.append(
                f"segmentation of {self.channel}: reusing the masks {image} that viscy predict wrote in {root} "
                f"({len(self.keys)} of {n_positions} positions); not segmenting the prediction again there"
            )
        if self.not_reused:
            position, why = next(iter(self.not_reused.items()))
            more = f" (and {len(self.not_reused) - 1} more position(s))" if len(self.not_reused) > 1 else ""
            lines.append(
                f"segmentation of {self.channel}: the masks {image} of position {position}{more} are not reused: "
                f"{why}; segmenting the prediction instead"
            )
        return lines


def label_group_attrs(plate: Plate, position: str, label: str) -> dict[str, Any]:
    """The attributes of a position's label group as stored (v2 ``.zattrs``; v3 ``zarr.json`` ``attributes``)."""
    group = plate.root if plate.kind == "fov" else plate.root / position
    node = read_node(group / LABELS_GROUP / label)
    return dict(node.attrs) if node is not None else {}


def _diameter(method: str, diameter: float | None) -> float | None:
    return (diameter or CLASSICAL_DEFAULT_DIAMETER) if method == "classical" else diameter


def mismatch(record: Any, seg: SegmentationConfig, channel: str, nz: int) -> str | None:
    """Why masks described by ``record`` (their ``viscy_segmentation``) differ from segmenting with ``seg``.

    Returns
    -------
    str or None
        The first difference, in words; None when the masks are what segmenting ``channel`` would give.
    """
    if not isinstance(record, dict):
        return f"their label group has no {SEGMENTATION_ATTR} record (viscy predict did not write them)"
    if record.get("channel") != channel:
        return f"they are masks of channel {record.get('channel')!r}, not {channel!r}"
    if record.get("complete") is not True:
        return "they are incomplete (the predict job that writes them did not finish every time point)"
    if record.get("method") != seg.method:
        return f"they were made with method {record.get('method')!r}, this evaluation segments with {seg.method!r}"
    if seg.method == "cellpose" and str(record.get("model")) != str(seg.model):
        return f"they were made with Cellpose model {record.get('model')!r}, this evaluation uses {seg.model!r}"
    stored, wanted = _diameter(seg.method, record.get("diameter")), _diameter(seg.method, seg.diameter)
    if (stored is None) != (wanted is None) or (
        stored is not None and not math.isclose(float(stored), float(wanted))
    ):
        return f"they were made with diameter {record.get('diameter')}, this evaluation uses {seg.diameter}"
    if record.get("dims") != "2d" and nz > 1:
        return (
            f"they were segmented with dims {record.get('dims')!r}; evaluation segments each Z slice on its own "
            "(dims: 2d)"
        )
    return None


def find_prediction_masks(
    pred: Plate, positions: list[str], channel: str, seg: SegmentationConfig, shapes: dict[str, tuple[int, ...]]
) -> PredictionMasks:
    """The stored masks of prediction ``channel`` that can stand in for segmenting it, per position.

    ``shapes`` are the positions' (T, C, Z, Y, X); masks of another (T, Z, Y, X) are not reused.
    """
    label = mask_label_name(channel)
    masks = PredictionMasks(channel, label)
    for name in positions:
        if label not in pred.labels(name):
            continue
        shape = shapes[name]
        why = mismatch(label_group_attrs(pred, name, label).get(SEGMENTATION_ATTR), seg, channel, nz=shape[2])
        key = None
        if why is None:
            try:
                key = pred.label_key(name, label)
                stored, expected = tuple(pred.array(name, key).shape), (shape[0], 1, *shape[2:])
            except DataError as exc:
                why = f"they cannot be read ({exc})"
            else:
                if stored != expected:
                    why = f"their shape {stored} is not the prediction's {expected}"
        if why is None:
            masks.keys[name] = key
        else:
            masks.not_reused[name] = why
    return masks
