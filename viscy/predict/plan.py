"""What the driver of ``viscy predict`` decides before any actor starts: channels, normalisation, tiling, the
job's fingerprint, each plate's output and action (validated before anything is written), then the outputs
created and the work units of the FOVs that are not complete yet.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from viscy.config import save_config
from viscy.data.config import NormalizationConfig
from viscy.data.patches import normalization_for_channel, normalization_params
from viscy.data.plate import Plate
from viscy.errors import DataError, ModelError
from viscy.models.bioimageio import PACKAGE_ARCHITECTURE
from viscy.models.card import ModelCard
from viscy.predict.config import PredictConfig
from viscy.predict.masks import TABLE_FILES, check_mask_outputs, drop_masks, drop_objects, mask_names, prepare_masks
from viscy.predict.segmentation import SegmentPlan
from viscy.predict.tiling import TilingOptions
from viscy.predict.writer import (
    RESUMING,
    OutputTarget,
    check_output,
    is_complete,
    prediction_names,
    prepare_output,
    resolve_output_version,
)

FALLBACK_SOURCES = ["Phase3D"]
FALLBACK_TARGETS = ["Nuclei", "Membrane"]


# ------------------------------------------------------------------------------------------ resolving
def resolve_channels(config: PredictConfig, card: ModelCard) -> tuple[list[str], list[str]]:
    """Source and target channel names: config, else the model card (checkpoint, preset, ONNX), else VisCy's."""
    spec = card.spec
    sources = config.source_channels or card.source_channels or None
    targets = config.target_channels or card.target_channels or None
    if sources is None and spec.in_channels == len(FALLBACK_SOURCES):
        sources = FALLBACK_SOURCES
    if targets is None and spec.out_channels <= len(FALLBACK_TARGETS):
        targets = FALLBACK_TARGETS[: spec.out_channels]
    if sources is None or len(sources) != spec.in_channels:
        raise ModelError(
            f"the model takes {spec.in_channels} input channel(s) but source_channels is {sources}; "
            f"set source_channels to {spec.in_channels} channel name(s)"
        )
    if targets is None or len(targets) != spec.out_channels:
        raise ModelError(
            f"the model predicts {spec.out_channels} channel(s) but target_channels is {targets}; "
            f"set target_channels to {spec.out_channels} name(s)"
        )
    return list(sources), list(targets)


def resolve_normalization(config: PredictConfig, card: ModelCard, sources: list[str]) -> list[NormalizationConfig]:
    """Config normalisation, else the model card's, else fov median/iqr of the sources; none for a bioimage.io
    package (its own preprocessing normalises, and its postprocessing sets the output's units)."""
    if card.spec.architecture == PACKAGE_ARCHITECTURE:
        for key, value in (("normalization", config.normalization), ("denormalize", config.denormalize or None)):
            if value is not None:
                raise ModelError(
                    f"{config.onnx} is a bioimage.io package: its own pre- and postprocessing normalise (as in "
                    f"every other consumer); leave {key} unset"
                )
        return []
    if config.normalization is not None:
        return list(config.normalization)
    if card.normalization:
        return [NormalizationConfig(**group) for group in card.normalization]
    return [NormalizationConfig(channels=list(sources))]


def tiling_options(config: PredictConfig, card: ModelCard) -> TilingOptions:
    """Tiling options from the config and the model's spec (a bioimage.io package is given whole images: it cuts
    its own blocks, with its own halo)."""
    return TilingOptions.for_model(
        card.spec,
        None if card.spec.architecture == PACKAGE_ARCHITECTURE else config.tile_yx,
        overlap=config.tile_overlap,
        blend=config.blend,
        tta=config.tta,
        tta_reduction=config.tta_reduction,
        z_stride=config.z_stride,
        batch_size=config.batch_size,
    )


def file_id(p: Path | None) -> Any:
    """A file's identity for a fingerprint: resolved path, size and modification time (``None`` if absent)."""
    if p is None or not Path(p).exists():
        return None
    if Path(p).is_dir():  # a bioimage.io package folder: its files
        return [str(Path(p).resolve()), sorted(file_id(f)[1:] + [f.name] for f in Path(p).iterdir() if f.is_file())]
    st = Path(p).stat()
    return [str(Path(p).resolve()), st.st_size, st.st_mtime_ns]


def fingerprint(
    config: PredictConfig,
    sources: list[str],
    targets: list[str],
    norms: list[NormalizationConfig],
    segment: dict[str, Any] | None = None,
) -> str:
    """Hash of everything that changes the predicted values, masks or table (not the parallelism)."""
    key = {
        "model": config.model.model_dump(mode="json") if config.model else None,
        "checkpoint": file_id(config.model.checkpoint) if config.model else None,
        "onnx": file_id(config.onnx),
        "sources": sources,
        "targets": targets,
        "normalization": [n.model_dump(mode="json") for n in norms],
        "denormalize": config.denormalize,
        "tiling": [config.tile_yx, config.tile_overlap, config.blend, config.tta, config.tta_reduction],
        "z_stride": config.z_stride,
    }
    if segment is not None:  # absent without segmentation: stores of earlier jobs keep their fingerprint
        key["segment"] = segment
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _output_for(config: PredictConfig, plate: Plate) -> Path | None:
    if config.output is None:
        return None
    if len(config.data_path) == 1:
        return Path(config.output)
    return Path(config.output) / plate.root.name


def target_norms(norms: list[NormalizationConfig]) -> list[NormalizationConfig]:
    return list(norms) + [NormalizationConfig()]


def target_normalization(targets: list[str], norms: list[NormalizationConfig]) -> list[dict[str, Any]]:
    """One explicit normalisation entry per target channel: what a prediction in normalised units means.

    A target without its own entry falls back to FOV median/iqr (VisCy's default), as de-normalisation does.
    """
    out = []
    for ch in targets:
        spec = normalization_for_channel(ch, target_norms(norms))
        out.append({**spec.model_dump(mode="json"), "channels": [ch]})
    return out


def needs_stats(sources: list[str], norms: list[NormalizationConfig], denorm: bool) -> bool:
    """Whether a FOV's stored statistics are read (to normalise sources or de-normalise targets)."""
    return denorm or any(normalization_for_channel(c, norms) for c in sources)


# -------------------------------------------------------------------------------------------- plates
def _validate_plate(
    plate: Plate,
    fovs: list[str],
    sources: list[str],
    targets: list[str],
    norms: list[NormalizationConfig],
    denorm: bool,
    append: bool,
    seg: SegmentPlan | None,
) -> None:
    plate.channel_indices(sources)
    if seg is not None:
        plate.channel_indices(seg.config.measure_channels)
        if append:
            check_mask_outputs(plate, fovs, list(seg.masks))
    with_stats = needs_stats(sources, norms, denorm)
    for fov in fovs:
        inf = plate.info(fov)
        if with_stats:
            meta = plate.normalization(fov)
            normalization_params(meta, sources, norms)
            if denorm:
                normalization_params(meta, targets, target_norms(norms))
        if append and not np.issubdtype(inf.dtype, np.floating):
            raise DataError(
                f"{plate.root}/{fov} stores {inf.dtype}; appending float predictions to it would truncate them. "
                "Predict into a new store with output instead"
            )


def _units(plate: Plate, fov: str, z_block: int | None, z_chunk: int) -> list[dict[str, Any]]:
    t_n, _, z_n, _, _ = plate.info(fov).shape
    block = z_n if z_block is None else -(-z_block // z_chunk) * z_chunk
    return [
        {"plate": str(plate.path), "fov": fov, "t": t, "z0": z0, "z1": min(z0 + block, z_n)}
        for t in range(t_n)
        for z0 in range(0, z_n, block)
    ]


class PlatePlan(NamedTuple):
    """One input plate's share of the job, validated before anything is written."""

    plate: Plate
    fovs: list[str]
    output: Path | None  # None: append the prediction channels to the plate
    action: str  # what check_output decided: a new store, resume, replace, ...
    version: str  # NGFF version of a new store


def plan_plates(
    config: PredictConfig,
    sources: list[str],
    targets: list[str],
    norms: list[NormalizationConfig],
    fp: str,
    seg: SegmentPlan | None = None,
) -> list[PlatePlan]:
    """Every plate's FOVs, output and action, once plates, statistics and outputs are checked; nothing is written.

    Raises
    ------
    DataError
        For outputs that collide or contain their input, a plate viscy cannot append to, missing statistics, an
        output that holds something else, or (appending) label images or tables in the way (naming the fix).
    """
    plans = []
    seen_outputs: set[Path] = set()
    for path in config.data_path:
        plate = Plate(path)
        fovs = plate.select(config.positions)
        output = _output_for(config, plate)
        written = (output or plate.root).resolve()
        if written in seen_outputs:
            raise DataError(f"two input plates would write to {written}; list each plate once, with distinct names")
        seen_outputs.add(written)
        if output is None and plate.zarr_format != 2:
            raise DataError(
                f"{plate.root} is an NGFF {plate.version} (zarr v{plate.zarr_format}) plate; viscy appends prediction "
                "channels to NGFF 0.4 (zarr v2) plates only. Set output to a new store to predict into"
            )
        if output is not None:
            if written == plate.root.resolve():
                raise DataError(f"output {output} is the input plate; set output: null to append channels instead")
            if plate.root.resolve().is_relative_to(written):
                raise DataError(f"output {output} contains the input plate {plate.root}; choose another output")
        # NGFF version of new stores: "auto" (a config without ngff_version) keeps each input plate's.
        version = resolve_output_version(plate, config.ngff_version, output)
        _validate_plate(plate, fovs, sources, targets, norms, config.denormalize, output is None, seg)
        action = check_output(plate, fovs, output, targets, fp, config.overwrite, version)
        plans.append(PlatePlan(plate, fovs, output, action, version))
    return plans


def job_metadata(
    config: PredictConfig,
    card: ModelCard,
    sources: list[str],
    targets: list[str],
    norms: list[NormalizationConfig],
    seg: SegmentPlan | None = None,
) -> dict[str, Any]:
    """What the outputs record about the job (``viscy evaluate`` reads the units and normalisation)."""
    job = {
        "model": card.name,
        "targets": targets,
        "sources": sources,
        "denormalized": config.denormalize,
        # How sources were normalised and how targets map to prediction units (evaluate reads this).
        "normalization": [n.model_dump(mode="json") for n in norms],
        "target_normalization": target_normalization(targets, norms),
        "units": "raw intensity (denormalized)" if config.denormalize else "normalized",
    }
    if seg is not None:
        job["segmentation"] = seg.record()
        job["tables"] = list(TABLE_FILES)  # appending: the plate's record of the files viscy owns there
    return job


def prepare_outputs(
    config: PredictConfig,
    plans: list[PlatePlan],
    targets: list[str],
    fp: str,
    job: dict[str, Any],
    seg: SegmentPlan | None = None,
) -> tuple[dict[str, OutputTarget], list[dict[str, Any]], int]:
    """Create every output (config and log beside it; label images of the FOVs to segment); (outputs by plate,
    units to run, FOVs already complete).

    With segmentation a unit is a whole ``(FOV, t)`` Z stack: 3D segmentation needs it, and 2D ids are unique per
    volume.
    """
    from viscy.console import place_log

    outputs: dict[str, OutputTarget] = {}
    units: list[dict[str, Any]] = []
    skipped = 0
    for plate, fovs, output, action, version in plans:
        target = prepare_output(plate, fovs, output, targets, fp, action, job, version)
        outputs[str(plate.path)] = target
        save_config(config, target.config_dir, "predict")
        place_log(target.config_dir, "viscy_predict.log")
        z_chunk = plate.info(fovs[0]).chunks[2] if target.append else 1
        todo = [fov for fov in fovs if not (action in RESUMING and is_complete(target, fov, fp))]
        skipped += len(fovs) - len(todo)
        if target.append and action == "replace":  # what was made from the replaced predictions would be stale
            drop_masks(target, fovs, mask_names(prediction_names(targets)))
            drop_objects(target, fovs)
        if seg is not None:
            prepare_masks(target, plate, todo, seg.masks, seg.record())
        for fov in todo:
            units.extend(_units(plate, fov, None if seg is not None else config.z_block, z_chunk))
    return outputs, units, skipped
