"""The segmentation stage of ``viscy predict``: a Ray Data stage after the staining stage, with its own actors.

The staining actors hand each ``(FOV, t)`` Z stack they predicted (every prediction channel, and the raw
measured input channels) to this stage in their output rows; a :class:`SegmentActor` builds the segmenter once
(:func:`viscy.segment.get_segmenter`), segments the chosen prediction channels (``2d``: slice by slice, ids
unique in the volume; ``3d``: the stack as one volume), writes the label chunks and returns the unit's
per-object rows (:func:`viscy.segment.object_table`) to the driver, which persists them per FOV
(:mod:`viscy.predict.masks`).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from viscy.errors import ChannelNotFoundError, DataError
from viscy.predict.config import PredictSegmentConfig
from viscy.predict.masks import mark_masks_complete, mask_names, write_fov_objects, write_mask
from viscy.predict.writer import OutputTarget, prediction_names
from viscy.segment import check_segmenter, get_segmenter, label_stack, object_table
from viscy.segment.config import SegmenterConfig
from viscy.segment.measure import object_columns


@dataclass(frozen=True)
class SegmentPlan:
    """The segmentation stage of one job, validated: its settings and the target channels it segments."""

    config: PredictSegmentConfig
    chosen: list[str]

    @property
    def masks(self) -> dict[str, str]:
        """Label image name -> the prediction channel it segments."""
        channels = prediction_names(self.chosen)
        return dict(zip(mask_names(channels), channels, strict=True))

    def record(self) -> dict[str, Any]:
        """What each label image records about how it was made (beside its channel and ``complete``)."""
        seg = self.config
        return {
            "method": seg.method,
            "model": seg.model if seg.method == "cellpose" else None,
            "diameter": seg.diameter,
            "dims": seg.dims,
        }

    def key(self, file_id: Any) -> dict[str, Any]:
        """The settings that change the masks or the table, for the job's fingerprint (not actors or device);
        ``file_id`` identifies a Cellpose checkpoint file by content stamp."""
        model = self.record()["model"]
        return {
            **self.record(),
            "model": [model, file_id(Path(model))] if model else None,
            "channels": self.chosen,
            "measure_channels": list(self.config.measure_channels),
        }

    def columns(self, targets: list[str]) -> list[str]:
        """The object table's columns: ids, geometry, then the mean of every prediction and measured channel."""
        return object_columns([*prediction_names(targets), *self.config.measure_channels])


def segmented_targets(seg: PredictSegmentConfig, targets: list[str]) -> list[str]:
    """The target channels to segment (``channels``, else the first target); ``<t>_prediction`` names accepted.

    Raises
    ------
    ChannelNotFoundError
        For a channel the model does not predict, naming the ones it does.
    """
    chosen = []
    for name in seg.channels or targets[:1]:
        base = name.removesuffix("_prediction") if name not in targets else name
        if base not in targets:
            raise ChannelNotFoundError(
                f"segment.channels names {name!r}, which this model does not predict; choose from {targets}"
            )
        if base not in chosen:
            chosen.append(base)
    return chosen


def plan_segmentation(seg: PredictSegmentConfig, targets: list[str]) -> SegmentPlan:
    """Validate the stage before anything is written.

    Raises
    ------
    ViscyError
        An unknown channel or method, Cellpose missing or an unknown Cellpose model, or a measured channel named
        like a prediction channel (its mean is in the table already).
    """
    chosen = segmented_targets(seg, targets)
    clash = [m for m in seg.measure_channels if m in prediction_names(targets)]
    if clash:
        raise DataError(
            f"segment.measure_channels names prediction channel(s) {clash}; every prediction channel's mean is in "
            "the table already: list input channels only"
        )
    # CUDA is the segmentation actors' business (they may be on other nodes): check the model, not the device.
    check_segmenter(SegmenterConfig(method=seg.method, model=seg.model, diameter=seg.diameter, gpu=False))
    return SegmentPlan(seg, chosen)


def segment_unit(
    prediction: np.ndarray,
    measured: dict[str, np.ndarray],
    segmenter: Any,
    targets: list[str],
    chosen: list[str],
    dims: str,
    where: dict[str, Any],
) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Segment one ``(FOV, t)`` prediction ``(C, Z, Y, X)``; the labels per mask name and the unit's object rows.

    ``measured`` maps input channel -> ``(Z, Y, X)``; ``where`` holds the rows' ``plate``, ``fov`` and ``t``.
    """
    names = prediction_names(targets)
    intensities = {**{n: prediction[i] for i, n in enumerate(names)}, **measured}
    labels, tables = {}, []
    for target, mask in zip(chosen, mask_names(prediction_names(chosen)), strict=True):
        channel = names[targets.index(target)]
        labels[mask] = label_stack(prediction[targets.index(target)], segmenter, dims)
        tables.append(object_table(labels[mask], intensities, channel=channel, **where))
    return labels, pd.concat(tables, ignore_index=True)


def table_bytes(table: pd.DataFrame) -> bytes:
    """A unit's rows as Parquet bytes (what travels back to the driver in a Ray Data row)."""
    return table.to_parquet(index=False)


def table_from_bytes(data: bytes) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(data))


class SegmentActor:
    """Ray Data callable class of the segmentation stage: builds the segmenter once, then segments, writes the
    label chunks and returns the object rows of each unit."""

    def __init__(
        self,
        segment: dict[str, Any],
        targets: list[str],
        chosen: list[str],
        outputs: dict[str, OutputTarget],
        plate_names: dict[str, str],
        threads: int | None = None,
    ) -> None:
        self.seg = PredictSegmentConfig(**segment)
        # Only Cellpose runs torch; importing it for the classical segmenter would cost each actor seconds.
        if threads and self.seg.method == "cellpose":
            import torch

            torch.set_num_threads(threads)
        self.segmenter = get_segmenter(self.seg)
        self.targets, self.chosen = targets, chosen
        self.outputs, self.plate_names = outputs, plate_names

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seconds, tables = [], []
        for i in range(len(batch["fov"])):
            t0 = time.perf_counter()
            plate, fov, t = str(batch["plate"][i]), str(batch["fov"][i]), int(batch["t"][i])
            measured = {}
            if "measured" in batch:
                measured = dict(zip(self.seg.measure_channels, batch["measured"][i], strict=True))
            where = {"plate": self.plate_names[plate], "fov": fov, "t": t}
            labels, table = segment_unit(
                batch["prediction"][i], measured, self.segmenter, self.targets, self.chosen, self.seg.dims, where
            )
            for name, volume in labels.items():
                write_mask(self.outputs[plate], fov, name, t, volume)
            tables.append(table_bytes(table))
            seconds.append(time.perf_counter() - t0)
        return {
            "plate": batch["plate"],
            "fov": batch["fov"],
            "seconds": batch["seconds"],
            "segment_seconds": np.asarray(seconds),
            "objects": np.array(tables, dtype=object),
        }


def finish_fov(target: OutputTarget, fov: str, masks: list[str], rows: list[pd.DataFrame]) -> int:
    """Persist a FOV whose every unit came back: its object rows, then its masks' completion; its object count.

    Call before the FOV's own completion marker, so a complete FOV always has its masks and rows.
    """
    filled = [r for r in rows if len(r)]
    table = pd.concat(filled, ignore_index=True) if filled else rows[0]
    table = table.sort_values(["t", "channel", "label"], ignore_index=True)
    write_fov_objects(target, fov, table)
    mark_masks_complete(target, fov, masks)
    return len(table)
