"""Where ``viscy predict``'s segmentation stage writes: NGFF label images beside the predictions and the
per-object table, with the ownership and resume rules of the predictions (``viscy.predict.writer``).

Layout (both NGFF versions; every write goes through ``viscy.data.store_writer``):

* ``<fov>/labels/<prediction channel>_masks/0``: int32 ``(T, 1, Z, Y, X)``, chunks ``(1, 1, 1, Y, X)``, the
  image's axes and scale; the name is added to ``<fov>/labels``' list (other names are kept). The label group's
  attribute ``viscy_segmentation`` records the channel, method, model, diameter and dims, and ``complete``,
  set by the driver once every time point of the FOV is written (before the FOV's own completion marker).
* Each FOV's object rows go to ``viscy_objects/<fov>.parquet`` in the folder predict owns (the store root, or
  ``<plate>/viscy_predict/`` when appending) as soon as the FOV is complete, so a resumed job still has every
  FOV's rows; the job's table ``viscy_objects.parquet`` and ``viscy_objects.csv`` at the store root are built
  from them at the end.
* Appending to an input plate: a label group of that name that viscy did not write (no ``viscy_segmentation``
  attribute), or a table file the plate's ``viscy_prediction`` record does not list, is refused before
  anything is written. ``overwrite`` drops viscy's masks, rows and table made from the predictions it replaces.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from viscy.data.ngff import read_node
from viscy.data.plate import Plate
from viscy.data.store_writer import create_label_image, delete_label_image, open_array, write_attrs
from viscy.errors import DataError
from viscy.predict.writer import ATTR, OutputTarget
from viscy.segment.layout import SEGMENTATION_ATTR, mask_label_name

OBJECTS = "viscy_objects"  # the table's file stem, and the folder of its per-FOV parts
TABLE_FILES = (f"{OBJECTS}.parquet", f"{OBJECTS}.csv")


def mask_names(channels: list[str]) -> list[str]:
    """Label image names of segmented prediction channels (``Nuclei_prediction`` -> ``Nuclei_prediction_masks``)."""
    return [mask_label_name(c) for c in channels]


def _image_group(plate: Plate, fov: str) -> Path:
    return plate.root if plate.kind == "fov" else plate.root / fov


def _label_group(group: Path, name: str) -> Path:
    return group / "labels" / name


def is_viscy_mask(group: Path) -> bool:
    """Whether the label group at ``group`` was written by viscy predict (it carries ``viscy_segmentation``)."""
    node = read_node(group)
    return node is not None and not group.is_symlink() and SEGMENTATION_ATTR in node.attrs


def check_mask_outputs(plate: Plate, fovs: list[str], masks: list[str]) -> None:
    """Refuse, before anything is written, label images and table files in the input plate viscy did not write.

    Only appending writes into a plate a user owns; a new store is viscy's throughout.

    Raises
    ------
    DataError
        Naming the label group or file, and the fix.
    """
    for fov in fovs:
        for name in masks:
            group = _label_group(_image_group(plate, fov), name)
            if (group.exists() or group.is_symlink()) and not is_viscy_mask(group):
                raise DataError(
                    f"{group} exists and was not written by viscy predict (no '{SEGMENTATION_ATTR}' attribute); "
                    "viscy never overwrites it, even with overwrite: true. Predict into a new store with output, "
                    "segment other channels (segment.channels), or move it away yourself"
                )
    state = read_node(plate.root)
    owned = set(((state.attrs if state else {}).get(ATTR) or {}).get("tables") or [])
    for name in TABLE_FILES:
        if (plate.root / name).exists() and name not in owned:
            raise DataError(
                f"{plate.root / name} exists and was not written by viscy predict (the plate's '{ATTR}' record does "
                "not list it); viscy never overwrites it. Move it away, or predict into a new store with output"
            )


def drop_masks(target: OutputTarget, fovs: list[str], masks: list[str]) -> None:
    """Delete viscy's label images ``masks`` of ``fovs`` (made from predictions that are being replaced)."""
    for fov in fovs:
        group = Path(target.group_path(fov))
        for name in masks:
            if is_viscy_mask(_label_group(group, name)):
                delete_label_image(group, name)


def prepare_masks(
    target: OutputTarget, plate: Plate, fovs: list[str], masks: dict[str, str], record: dict[str, Any]
) -> None:
    """Create the (empty, incomplete) label images of ``fovs``: ``masks`` maps label name -> prediction channel.

    Call after :func:`check_mask_outputs` and ``prepare_output``; only for FOVs about to be (re)predicted.
    """
    for fov in fovs:
        info = plate.info(fov)
        t, _, z, y, x = info.shape
        for name, channel in masks.items():
            attrs = {SEGMENTATION_ATTR: {"channel": channel, **record, "complete": False}}
            create_label_image(
                Path(target.group_path(fov)),
                name,
                plate.image_axes(fov),
                info.scale,
                (t, 1, z, y, x),
                (1, 1, 1, y, x),
                attrs,
                target.zarr_format,
            )


def write_mask(target: OutputTarget, fov: str, name: str, t: int, labels: np.ndarray) -> None:
    """Write the ``(Z, Y, X)`` label volume of time point ``t`` (whole chunks: one per Z slice)."""
    arr = open_array(_label_group(Path(target.group_path(fov)), name) / "0", target.zarr_format)
    arr.write((t, slice(0, 1), slice(0, labels.shape[0])), labels[None])


def mark_masks_complete(target: OutputTarget, fov: str, masks: list[str]) -> None:
    """Mark a FOV's label images complete (every time point written)."""
    for name in masks:
        group = _label_group(Path(target.group_path(fov)), name)
        node = read_node(group)
        write_attrs(group, SEGMENTATION_ATTR, {**(node.attrs.get(SEGMENTATION_ATTR) or {}), "complete": True})


# ------------------------------------------------------------------------------------------ object table
def _part(target: OutputTarget, fov: str) -> Path:
    return target.config_dir / OBJECTS / f"{fov}.parquet"


def _replace_file(path: Path, write: Any) -> None:
    """Write a file through a temporary sibling and rename it into place (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_fov_objects(target: OutputTarget, fov: str, table: pd.DataFrame) -> None:
    """Persist one complete FOV's object rows (before the FOV is marked complete)."""
    path = _part(target, fov)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_file(path, lambda tmp: table.to_parquet(tmp, index=False))


def drop_objects(target: OutputTarget, fovs: list[str]) -> None:
    """Delete the object rows of ``fovs`` and the job's table files the store's record says viscy wrote (their
    predictions are being replaced)."""
    for fov in fovs:
        _part(target, fov).unlink(missing_ok=True)
    state = read_node(target.root)
    owned = set(((state.attrs if state else {}).get(ATTR) or {}).get("tables") or [])
    for name in TABLE_FILES:
        if name in owned:
            (target.root / name).unlink(missing_ok=True)


def write_object_table(target: OutputTarget, fovs: list[str], columns: list[str]) -> tuple[Path, int]:
    """The job's table from its FOVs' parts: ``viscy_objects.parquet`` and ``.csv`` at the store root.

    Returns
    -------
    tuple[pathlib.Path, int]
        Where the Parquet table is once the job is done, and its number of objects.

    Raises
    ------
    DataError
        If a complete FOV has no rows on disk (its store was changed by hand): rerun with overwrite.
    """
    parts = []
    for fov in fovs:
        path = _part(target, fov)
        if not path.is_file():
            raise DataError(f"{path} (the objects of complete FOV {fov}) is missing; rerun with overwrite: true")
        parts.append(pd.read_parquet(path))
    filled = [p for p in parts if len(p)]
    table = pd.concat(filled, ignore_index=True) if filled else pd.DataFrame(columns=columns)
    _replace_file(target.root / TABLE_FILES[0], lambda tmp: table.to_parquet(tmp, index=False))
    _replace_file(target.root / TABLE_FILES[1], lambda tmp: table.to_csv(tmp, index=False))
    return target.path / TABLE_FILES[0], len(table)
