"""Prediction stores: a new OME-Zarr (same positions and scale) or ``<target>_prediction`` channels appended
to the input plate, with per-FOV completion markers that make a killed job resumable.

Layout and safety rules:

* New stores use chunks ``(1, 1, 1, Y, X)`` (VisCy's writer); a task writes whole ``(t, c, z)`` planes, so
  no two tasks ever touch the same chunk. Appending keeps the input's chunks; the task Z blocks are then
  aligned to its Z chunks, and chunks spanning several time points are refused.
* The store's root ``.zattrs['viscy_prediction']`` holds the job fingerprint (model, channels, tiling, ...).
  Each position's ``.zattrs['viscy_prediction'] = {"complete": true, ...}`` is written by the driver only
  after every task of that position has returned, i.e. after all its chunks are on disk.
* A rerun with the same fingerprint skips complete positions and redoes the others from scratch; a
  different fingerprint (or any existing output) is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from viscy.data.plate import IMAGE_KEY, Plate
from viscy.errors import DataError

ATTR = "viscy_prediction"
SUFFIX = "_prediction"


def prediction_names(targets: list[str]) -> list[str]:
    """Output channel names (VisCy's ``<target>_prediction``)."""
    return [t + SUFFIX for t in targets]


@dataclass(frozen=True)
class OutputTarget:
    """Where one input plate's predictions go."""

    root: Path  # store root (the input plate's root in append mode)
    kind: str  # "hcs" or "fov"
    channel_offset: int  # index of the first prediction channel in the output array
    append: bool

    def array_path(self, fov: str) -> str:
        """Path of a position's image array."""
        return str(self.root / IMAGE_KEY) if self.kind == "fov" else str(self.root / fov / IMAGE_KEY)

    def group_path(self, fov: str) -> str:
        """Path of a position's group."""
        return str(self.root) if self.kind == "fov" else str(self.root / fov)


def _read_attrs(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / ".zattrs").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def position_state(target: OutputTarget, fov: str) -> dict[str, Any]:
    """A position's ``viscy_prediction`` attributes (empty if none)."""
    return _read_attrs(Path(target.group_path(fov))).get(ATTR, {})


def is_complete(target: OutputTarget, fov: str, fingerprint: str) -> bool:
    """Whether a position was completed by a job with this fingerprint."""
    state = position_state(target, fov)
    return bool(state.get("complete")) and state.get("fingerprint") == fingerprint


def mark_complete(target: OutputTarget, fov: str, fingerprint: str, extra: dict[str, Any] | None = None) -> None:
    """Write the completion marker of a position (call only after all its data are written)."""
    group = zarr.open_group(target.group_path(fov), mode="r+")
    group.attrs[ATTR] = {"complete": True, "fingerprint": fingerprint, **(extra or {})}


def _clear_markers(target: OutputTarget, fovs: list[str]) -> None:
    for fov in fovs:
        group = zarr.open_group(target.group_path(fov), mode="r+")
        if ATTR in group.attrs:
            del group.attrs[ATTR]


def check_output(
    plate: Plate, fovs: list[str], output: Path | None, targets: list[str], fingerprint: str, overwrite: bool
) -> str:
    """Decide what to do with an existing output before anything is written.

    Returns
    -------
    str
        ``"create"`` (new store), ``"resume"`` (same job found), ``"replace"`` (overwrite) or ``"append"``.

    Raises
    ------
    DataError
        If predictions exist from another job (or an unrelated store exists) and ``overwrite`` is false.
    """
    names = prediction_names(targets)
    if output is not None:
        if not output.exists():
            return "create"
        state = _read_attrs(output).get(ATTR, {})
        if not overwrite:
            if state.get("fingerprint") == fingerprint:
                return "resume"
            why = "a different prediction job" if state else "an unrelated store"
            raise DataError(
                f"output {output} already exists ({why}); choose another output, or set overwrite: true "
                "to replace it (a rerun of the same job resumes without overwrite)"
            )
        return "replace"
    existing = [n for n in names if n in plate.channel_names]
    if not existing:
        return "append"
    state = plate.plate_attrs().get(ATTR, {}) if plate.kind == "hcs" else plate.position_attrs(fovs[0]).get(ATTR, {})
    if len(existing) != len(names):
        raise DataError(
            f"{plate.root} holds only some prediction channels ({existing} of {names}); remove them or predict "
            "into a new store with output"
        )
    if overwrite:
        return "replace"
    if state.get("fingerprint") == fingerprint:
        return "resume"
    raise DataError(
        f"{plate.root} already has channels {existing} from another prediction job; set overwrite: true to "
        "replace them, or predict into a new store with output"
    )


def prepare_output(
    plate: Plate, fovs: list[str], output: Path | None, targets: list[str], fingerprint: str, action: str,
    job: dict[str, Any],
) -> OutputTarget:
    """Create (or reopen) the store and its arrays for ``fovs``; returns where tasks write."""
    from iohub.ngff import open_ome_zarr
    from iohub.ngff.models import TransformationMeta

    names = prediction_names(targets)
    if output is None:
        return _prepare_append(plate, fovs, names, fingerprint, action, job)
    if action == "replace":
        shutil.rmtree(output)
    layout = "fov" if plate.kind == "fov" else "hcs"
    if action in ("create", "replace") or (action == "resume" and layout == "hcs"):
        info = {f: plate.info(f) for f in fovs}
        mode = "a" if action == "resume" else "w-"
        with open_ome_zarr(output, layout=layout, mode=mode, channel_names=names) as store:
            existing = {n for n, _ in store.positions()} if action == "resume" else set()
            for fov in fovs:
                if fov in existing:
                    continue
                # a resumed job may select more positions than the killed one
                t, _, z, y, x = info[fov].shape
                pos = store if layout == "fov" else store.create_position(*fov.split("/"))
                pos.create_zeros(
                    IMAGE_KEY, shape=(t, len(names), z, y, x), dtype=np.float32, chunks=(1, 1, 1, y, x),
                    transform=[TransformationMeta(type="scale", scale=list(info[fov].scale))],
                )
        if action != "resume":
            zarr.open_group(str(output), mode="r+").attrs[ATTR] = {"fingerprint": fingerprint, **job}
    target = OutputTarget(Path(output), layout, 0, False)
    return target


def _prepare_append(
    plate: Plate, fovs: list[str], names: list[str], fingerprint: str, action: str, job: dict[str, Any]
) -> OutputTarget:
    from iohub.ngff import open_ome_zarr

    for fov in fovs:
        chunks = plate.info(fov).chunks
        if chunks[0] != 1:
            raise DataError(
                f"{plate.root}/{fov} is chunked over {chunks[0]} time points; appending predictions would make "
                "tasks share chunks. Predict into a new store with output instead"
            )
    offset = len(plate.channel_names)
    if action == "append":
        # appending resizes every position of the plate, so the whole plate gains the channels
        with open_ome_zarr(plate.root, mode="r+") as store:
            nodes = [store] if plate.kind == "fov" else [pos for _, pos in store.positions()]
            for pos in nodes:
                for n in names:
                    pos.append_channel(n, resize_arrays=True)
    else:
        offset = plate.channel_names.index(names[0])
    target = OutputTarget(plate.root, plate.kind, offset, True)
    if action == "replace":
        _clear_markers(target, plate.positions)
    zarr.open_group(str(plate.root), mode="r+").attrs[ATTR] = {"fingerprint": fingerprint, **job}
    return target


def write_block(target: OutputTarget, fov: str, t: int, z0: int, data: np.ndarray) -> None:
    """Write a ``(C', Z_block, Y, X)`` prediction block at time ``t`` and slices ``z0:``."""
    arr = zarr.open_array(target.array_path(fov), mode="r+")
    c0 = target.channel_offset
    arr[t, c0 : c0 + data.shape[0], z0 : z0 + data.shape[1]] = data.astype(arr.dtype, copy=False)
