"""Prediction stores: a new OME-Zarr (same positions and scale) or ``<target>_prediction`` channels appended
to the input plate, with per-FOV completion markers that make a killed job resumable.

Layout and safety rules:

* A new store is NGFF 0.4 on zarr v2 (written with iohub) or NGFF 0.5 on zarr v3 (written through
  tensorstore); by default it keeps the input plate's version (:func:`resolve_output_version`). Every write
  goes through ``viscy.data.store_writer``; this module decides what is written and when.
* New stores use chunks ``(1, 1, 1, Y, X)`` (VisCy's writer), unsharded; a task writes whole ``(t, c, z)``
  planes, so no two tasks ever touch the same chunk (a shard spanning several planes would be written by
  several tasks at once). Appending keeps the input's chunks; the task Z blocks are then aligned to its Z
  chunks, and chunks spanning several time points are refused. Only NGFF 0.4 plates are appended to.
* The store's root attributes ``viscy_prediction`` (v2 ``.zattrs``; v3 ``zarr.json`` ``attributes``, beside
  ``ome``) hold the job fingerprint (model, channels, tiling, ...). Each position's
  ``viscy_prediction = {"complete": true, ...}`` is written by the driver only after every task of that
  position has returned, i.e. after all its chunks are on disk.
* A rerun with the same fingerprint skips complete positions and redoes the others from scratch; a
  different fingerprint is refused unless ``overwrite``.
* ``overwrite`` replaces only what viscy predict wrote: a store whose root marker says ``"store": true``, or
  appended channels listed in the input plate's marker (``"channels"``). Anything else is refused, untouched.
* A store is replaced atomically: the new one is written at ``<output>.viscy-partial`` (a rerun of the same
  job continues it) and swapped in only when complete, the old one passing through ``<output>.viscy-old``.
  A run that finds ``<output>`` missing but ``<output>.viscy-old`` present (a swap cut short) puts it back.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from viscy.data.ngff import plate_images, read_node
from viscy.data.plate import IMAGE_KEY, Plate
from viscy.data.replace import refuse_links, siblings, swap_in
from viscy.data.store_writer import (
    Ngff04Writer,
    create_v3_array,
    delete_attr,
    image_metadata,
    open_array,
    plate_metadata,
    write_attrs,
    write_v3_group,
    write_v3_image_groups,
)
from viscy.errors import DataError

ATTR = "viscy_prediction"
SUFFIX = "_prediction"
CONFIG_DIR = "viscy_predict"  # where append mode keeps its resolved config inside the input plate
RESUMING = ("resume", "continue")  # actions that skip positions already complete
NGFF_VERSIONS = ("auto", "0.4", "0.5")  # values of the output version option; auto: the input plate's
ZARR_FORMAT = {"0.4": 2, "0.5": 3}


def resolve_output_version(plate: Plate, requested: str, output: Path | None) -> str:
    """The NGFF version predictions of ``plate`` are written in: ``requested``, or the plate's for ``"auto"``.

    Raises
    ------
    DataError
        For an unknown version, or a version other than the plate's when appending to it (``output`` None).
    """
    if requested not in NGFF_VERSIONS:
        raise DataError(f"unknown output NGFF version {requested!r}; choose one of {', '.join(NGFF_VERSIONS)}")
    version = plate.version if requested == "auto" else requested
    if version not in ZARR_FORMAT:  # an input version viscy reads but does not write
        raise DataError(
            f"{plate.root} is NGFF {plate.version}; viscy writes predictions as NGFF 0.4 or 0.5: choose one"
        )
    if output is None and version != plate.version:
        raise DataError(
            f"appending channels keeps the input plate's NGFF version ({plate.version}), not {version}; set output "
            f"to a new store to write NGFF {version}"
        )
    return version


def prediction_names(targets: list[str]) -> list[str]:
    """Output channel names (VisCy's ``<target>_prediction``)."""
    return [t + SUFFIX for t in targets]


@dataclass(frozen=True)
class OutputTarget:
    """Where one input plate's predictions go."""

    root: Path  # store root tasks write to (the input plate's root in append mode)
    kind: str  # "hcs" or "fov"
    channel_offset: int  # index of the first prediction channel in the output array
    append: bool
    final: Path | None = None  # where ``root`` is swapped in once complete (a replacement); None: in place
    zarr_format: int = 2  # 2: NGFF 0.4 (zarr-python 2), 3: NGFF 0.5 (tensorstore)

    @property
    def path(self) -> Path:
        """Where the predictions are once the job is done."""
        return self.final or self.root

    @property
    def config_dir(self) -> Path:
        """Where the job's resolved config goes: inside the store it writes."""
        return self.root / CONFIG_DIR if self.append else self.root

    def array_path(self, fov: str) -> str:
        """Path of a position's image array."""
        return str(self.root / IMAGE_KEY) if self.kind == "fov" else str(self.root / fov / IMAGE_KEY)

    def group_path(self, fov: str) -> str:
        """Path of a position's group."""
        return str(self.root) if self.kind == "fov" else str(self.root / fov)


def _read_attrs(path: Path) -> dict[str, Any]:
    """A group's attributes (v2 ``.zattrs``, v3 ``zarr.json`` ``attributes``); empty if it has none."""
    node = read_node(path)
    return dict(node.attrs) if node is not None else {}


def position_state(target: OutputTarget, fov: str) -> dict[str, Any]:
    """A position's ``viscy_prediction`` attributes (empty if none)."""
    return _read_attrs(Path(target.group_path(fov))).get(ATTR, {})


def is_complete(target: OutputTarget, fov: str, fingerprint: str) -> bool:
    """Whether a position was completed by a job with this fingerprint."""
    state = position_state(target, fov)
    return bool(state.get("complete")) and state.get("fingerprint") == fingerprint


def mark_complete(target: OutputTarget, fov: str, fingerprint: str, extra: dict[str, Any] | None = None) -> None:
    """Write the completion marker of a position (call only after all its data are written)."""
    group = Path(target.group_path(fov))
    # a single-FOV store keeps its job record in the same attributes: add to it, never drop it
    state = _read_attrs(group).get(ATTR, {})
    write_attrs(group, ATTR, {**state, "complete": True, "fingerprint": fingerprint, **(extra or {})})


def _clear_markers(target: OutputTarget, fovs: list[str]) -> None:
    """Un-complete the positions about to be rewritten (and only those)."""
    for fov in fovs:
        group = Path(target.group_path(fov))
        state = _read_attrs(group).get(ATTR)
        if state is None:
            continue
        if target.kind == "fov":  # the root: keep the ownership record, drop only the completion flag
            write_attrs(group, ATTR, {k: v for k, v in state.items() if k != "complete"})
        else:
            delete_attr(group, ATTR)


def is_prediction_store(path: Path) -> bool:
    """Whether ``path`` is a store viscy predict wrote (root marker), as opposed to anything a user owns."""
    state = _read_attrs(path).get(ATTR)
    if not isinstance(state, dict) or "fingerprint" not in state:
        return False
    if "store" in state:
        return state["store"] is True
    # written before the "store" flag: an input plate with appended predictions also has other channels
    from viscy.data.plate import Plate

    try:
        names = Plate(path).channel_names
    except DataError:
        return False
    return bool(names) and all(n.endswith(SUFFIX) for n in names)


def _refuse_foreign(path: Path, what: str) -> DataError:
    return DataError(
        f"{path} exists and is not {what} (its attributes have no '{ATTR}' store marker); viscy never replaces or "
        "deletes it, even with overwrite: true. Choose another output, or move it away yourself"
    )


def _owned_channels(state: dict[str, Any]) -> set[str]:
    """Channels of an input plate that viscy predict appended (per the plate's marker)."""
    if "fingerprint" not in state:
        return set()
    return set(state.get("channels") or prediction_names(state.get("targets") or []))


def check_output(
    plate: Plate,
    fovs: list[str],
    output: Path | None,
    targets: list[str],
    fingerprint: str,
    overwrite: bool,
    version: str | None = None,
) -> str:
    """Decide what to do with an existing output before anything is written.

    Returns
    -------
    str
        ``"create"`` (new store), ``"resume"`` (same job found), ``"replace"`` (overwrite: a new store, or
        viscy's appended channels, from scratch), ``"continue"`` (a killed replacement of the same job) or
        ``"append"``.

    Raises
    ------
    DataError
        If anything viscy did not write is in the way (even with ``overwrite``), ``output`` (or its
        ``.viscy-partial``/``.viscy-old``) is a symbolic link, predictions exist from another job and
        ``overwrite`` is false, or the same job's store is of another NGFF ``version`` than the one asked for
        (``None``: not checked) and ``overwrite`` is false.
    """
    names = prediction_names(targets)
    if output is not None:
        return _check_store(output, fingerprint, overwrite, version)
    existing = [n for n in names if n in plate.channel_names]
    if not existing:
        return "append"
    state = plate.plate_attrs().get(ATTR, {}) if plate.kind == "hcs" else plate.position_attrs(fovs[0]).get(ATTR, {})
    foreign = [n for n in existing if n not in _owned_channels(state)]
    if foreign:
        raise DataError(
            f"{plate.root} has channel(s) {foreign} that viscy predict did not write (the plate's .zattrs has no "
            f"'{ATTR}' record of them); viscy never overwrites them, even with overwrite: true. Predict into a "
            "new store with output, or choose other target_channels names"
        )
    if len(existing) != len(names):
        raise DataError(
            f"{plate.root} holds only some prediction channels ({existing} of {names}); remove them or predict "
            "into a new store with output"
        )
    offset = plate.channel_names.index(names[0])
    if plate.channel_names[offset : offset + len(names)] != names:
        # tasks write one contiguous channel range: anything else would land on other channels
        raise DataError(
            f"{plate.root} has channels {plate.channel_names}; the prediction channels {names} are not adjacent "
            "in this order, so writing them would touch other channels. Predict into a new store with output"
        )
    if overwrite:
        return "replace"
    if state.get("fingerprint") == fingerprint:
        return "resume"
    raise DataError(
        f"{plate.root} already has channels {existing} from another prediction job; set overwrite: true to "
        "replace them, or predict into a new store with output"
    )


def _store_version(path: Path) -> str | None:
    node = read_node(path)
    return None if node is None else {2: "0.4", 3: "0.5"}.get(node.zarr_format)


def _check_store(output: Path, fingerprint: str, overwrite: bool, version: str | None = None) -> str:
    refuse_links(output)
    partial, old = siblings(output)
    # a swap cut short leaves the old store at <output>.viscy-old: it still counts as the output
    current = output if output.exists() else old if old.exists() else None
    if current is None:
        return "create"
    if not is_prediction_store(current):
        raise _refuse_foreign(current, "a prediction store viscy predict wrote")
    state = _read_attrs(current)[ATTR]
    if not overwrite:
        if state.get("fingerprint") == fingerprint:
            found = _store_version(current)
            if version is not None and found != version:
                raise DataError(
                    f"output {output} holds this job's predictions as NGFF {found}, not {version}; rerun with NGFF "
                    f"{found} to resume it, set overwrite: true to rewrite it as NGFF {version}, or choose another "
                    "output"
                )
            return "resume"
        raise DataError(
            f"output {output} already exists (a different prediction job); choose another output, or set "
            "overwrite: true to replace it (a rerun of the same job resumes without overwrite)"
        )
    if current == output and old.exists() and not is_prediction_store(old):  # the swap would delete it
        raise _refuse_foreign(old, "an old prediction store viscy predict set aside")
    if not partial.exists():
        return "replace"
    if not is_prediction_store(partial):
        raise _refuse_foreign(partial, "a replacement store viscy predict started")
    # a killed replacement of the same job (and NGFF version) continues; anything else starts over
    same = _read_attrs(partial)[ATTR].get("fingerprint") == fingerprint
    return "continue" if same and (version is None or _store_version(partial) == version) else "replace"


def prepare_output(
    plate: Plate,
    fovs: list[str],
    output: Path | None,
    targets: list[str],
    fingerprint: str,
    action: str,
    job: dict[str, Any],
    version: str | None = None,
) -> OutputTarget:
    """Create (or reopen) the store and its arrays for ``fovs``; returns where tasks write.

    Call only after :func:`check_output` accepted ``action`` for every plate: this is where writing starts.
    A replacement (``"replace"``/``"continue"``) is built beside ``output``; :func:`finish_output` swaps it in.
    A new store is NGFF ``version`` (``"0.4"`` or ``"0.5"``; ``None``: the input plate's).
    """
    names = prediction_names(targets)
    if output is None:
        return _prepare_append(plate, fovs, names, fingerprint, action, job)
    output = Path(output)
    partial, old = siblings(output)
    if not output.exists() and old.exists():
        os.replace(old, output)  # undo a swap cut short: the old store is whole
    root = output
    if action in ("replace", "continue"):
        root = partial
        if action == "replace" and partial.exists():
            shutil.rmtree(partial)  # check_output verified it is a replacement viscy started
    layout = "fov" if plate.kind == "fov" else "hcs"
    version = resolve_output_version(plate, version or "auto", output)
    final = output if root != output else None
    if version == "0.5":
        marker = {**job, "fingerprint": fingerprint, "store": True}
        _prepare_v3_store(root, plate, fovs, names, marker, resume=action in RESUMING)
        return OutputTarget(root, layout, 0, False, final, zarr_format=3)
    if action in ("create", "replace") or (action in RESUMING and layout == "hcs"):
        info = {f: plate.info(f) for f in fovs}
        mode = "a" if action in RESUMING else "w-"
        with Ngff04Writer(root, layout=layout, mode=mode, channel_names=names) as store:
            if action not in RESUMING:
                # the marker first, so that even a store killed while being created is recognisably viscy's
                store.set_root_attr(ATTR, {**job, "fingerprint": fingerprint, "store": True})
            existing = store.positions() if action in RESUMING else set()
            for fov in fovs:
                if fov in existing:
                    continue
                # a resumed job may select more positions than the killed one
                t, _, z, y, x = info[fov].shape
                shape = (t, len(names), z, y, x)
                store.add_image(fov, IMAGE_KEY, info[fov].scale, (1, 1, 1, y, x), shape=shape, dtype=np.float32)
    return OutputTarget(root, layout, 0, False, final)


def _prepare_v3_store(
    root: Path, plate: Plate, fovs: list[str], names: list[str], marker: dict[str, Any], resume: bool
) -> None:
    """Create an NGFF 0.5 (zarr v3) prediction store for ``fovs`` or, resuming, add the positions it lacks.

    The layout is ome-zarr-py's (plate, row and well groups; one image per FOV whose only dataset is array
    ``0``); arrays are float32, zstd, chunks ``(1, 1, 1, Y, X)``. The root marker is written first, so a
    store killed while being created is recognisably viscy's; a position whose array is missing is (re)made.
    """
    if resume and read_node(root) is None:
        resume = False  # nothing there yet (a replacement that never started)
    if not resume and root.exists():
        raise DataError(f"{root} exists; cannot create a prediction store there")
    if plate.kind == "fov":
        groups = {fovs[0]: root}
        root_attrs = _read_attrs(root) if resume else {ATTR: marker}
    else:
        node = read_node(root) if resume else None
        known = plate_images(node) if node is not None else []
        # the plate metadata list every position the store will hold: the killed job's and this one's
        root_attrs = _read_attrs(root) if resume else {ATTR: marker}
        root_attrs["ome"] = {"version": "0.5", "plate": plate_metadata(sorted(set(known) | set(fovs)), version="0.5")}
        write_v3_group(root, root_attrs)
        groups = {fov: root / fov for fov in fovs}
    for fov, group in groups.items():
        arr = group / IMAGE_KEY
        t, _, z, y, x = plate.info(fov).shape
        shape = (t, len(names), z, y, x)
        existing = read_node(arr)
        if resume and existing is not None and existing.node_type == "array":
            continue  # created by the killed job (its completion marker says whether it is done)
        image = image_metadata(plate.image_axes(fov), plate.info(fov).scale, names, IMAGE_KEY)
        write_v3_image_groups(root, fov, image, root_attrs if plate.kind == "fov" else None)
        create_v3_array(arr, shape, (1, 1, 1, y, x), "float32")


def finish_output(target: OutputTarget) -> None:
    """Swap a complete replacement into place (no-op for stores written in place).

    ``output`` moves to ``<output>.viscy-old`` and the replacement to ``output`` before the old one is deleted,
    so at every instant one whole store exists; a run killed in between finds and restores the old one.
    """
    if target.final is None or not target.root.exists():
        return
    swap_in(target.root, target.final, is_prediction_store)


def _prepare_append(
    plate: Plate, fovs: list[str], names: list[str], fingerprint: str, action: str, job: dict[str, Any]
) -> OutputTarget:
    for fov in fovs:
        chunks = plate.info(fov).chunks
        if chunks[0] != 1:
            raise DataError(
                f"{plate.root}/{fov} is chunked over {chunks[0]} time points; appending predictions would make "
                "tasks share chunks. Predict into a new store with output instead"
            )
    target = OutputTarget(plate.root, plate.kind, len(plate.channel_names), True)
    if action == "replace":
        _clear_markers(target, fovs)
    state = _read_attrs(plate.root).get(ATTR, {})
    # a single-FOV store's root is also its position: a resumed job keeps its completion flag
    kept = {"complete": state["complete"]} if action == "resume" and "complete" in state else {}
    # the ownership record goes first: channels appended by a job killed right after still count as viscy's
    owned = sorted(_owned_channels(state) | set(names))
    record = {**kept, **job, "fingerprint": fingerprint, "channels": owned}
    # files viscy wrote into the plate (the object table) stay viscy's after a job that writes none
    tables = sorted(set(state.get("tables") or []) | set(job.get("tables") or []))
    if tables:
        record["tables"] = tables
    write_attrs(plate.root, ATTR, record)
    if action == "append":
        # appending resizes every position of the plate, so the whole plate gains the channels
        with Ngff04Writer(plate.root, mode="r+") as store:
            store.append_channels(names)
    else:
        target = OutputTarget(plate.root, plate.kind, plate.channel_names.index(names[0]), True)
    return target


def write_block(target: OutputTarget, fov: str, t: int, z0: int, data: np.ndarray) -> None:
    """Write a ``(C', Z_block, Y, X)`` prediction block at time ``t`` and slices ``z0:``."""
    c0 = target.channel_offset
    arr = open_array(Path(target.array_path(fov)), target.zarr_format)
    arr.write((t, slice(c0, c0 + data.shape[0]), slice(z0, z0 + data.shape[1])), data)
