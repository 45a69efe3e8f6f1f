"""``viscy evaluate``: score predicted channels against their targets with one Ray task per FOV and time point.

Target and prediction are compared in the same units. The prediction job's metadata (``viscy predict``
stores it in ``.zattrs["viscy_prediction"]``) says whether predictions are normalised; if so, the target is
normalised the same way with the plate's stored statistics (:mod:`viscy.data.patches`), else both are
compared as raw intensities. Predictions without that metadata need ``prediction_units``. The masks of the
segmented prediction channel are read from the prediction store where ``viscy predict`` wrote them with the same
settings (:mod:`viscy.evaluate.masks`) instead of segmenting the prediction again.

Outputs in ``output_dir`` (which must be absent, empty, or a previous viscy evaluation)::

    viscy_evaluation.json        marker listing every file this evaluation writes (written first)
    viscy_config.yaml            the resolved config (written once the inputs are validated)
    metrics.csv, metrics.parquet one row per position / t / channel / z: regression metrics, plus
                                 segmentation metrics on the rows of the segmented channel (NaN elsewhere)
    figures/metric_distributions.png, figures/example_<row>_<col>_<fov>.png
    summary.json                 written last: its presence means the evaluation completed

Every file is written under a temporary name and renamed, and the files of a previous evaluation (stale
``summary.json`` first) are removed before anything new is written, so an interrupted run never leaves
output that looks complete. Files viscy did not write are never removed or overwritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from viscy.config import CONFIG_FILENAME, save_config
from viscy.data.patches import normalize
from viscy.data.plate import Plate
from viscy.errors import ChannelNotFoundError, DataError, ShapeError, ViscyError
from viscy.evaluate.config import EvaluateConfig
from viscy.evaluate.masks import PredictionMasks, find_prediction_masks
from viscy.evaluate.metrics import regression_metrics
from viscy.evaluate.output import (
    FIGURES_DIR,
    LOG_NAME,
    SUMMARY_NAME,
    TABLE_NAME,
    check_output_dir,
    example_name,
    format_summary,
    prepare_output_dir,
    write_outputs,
)
from viscy.evaluate.units import ChannelUnits, resolve_units, target_params
from viscy.predict.writer import ATTR as PREDICTION_ATTR
from viscy.segment.metrics import segmentation_metrics

ID_COLUMNS = ("position", "t", "channel", "z")


@dataclass
class EvalPlan:
    """Everything a task needs, resolved and validated on the driver."""

    config: EvaluateConfig
    positions: list[str]
    target_idx: list[int]
    prediction_idx: list[int]
    source_idx: int | None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    units: list[ChannelUnits] = field(default_factory=list)
    prediction_job: dict[str, Any] = field(default_factory=dict)
    masks: PredictionMasks | None = None  # stored masks of the segmented prediction channel, reused per position

    @property
    def prediction_path(self) -> Path:
        return self.config.prediction_path or self.config.data_path

    @property
    def panel_positions(self) -> list[str]:
        """Positions drawn as example panels (their first time point)."""
        return self.positions[: self.config.num_example_panels]

    def output_files(self) -> list[str]:
        """Every file (relative to ``output_dir``) this evaluation writes, marker excluded."""
        figures = [f"{FIGURES_DIR}/metric_distributions.png"]
        figures += [f"{FIGURES_DIR}/{example_name(p)}" for p in self.panel_positions]
        return [CONFIG_FILENAME, LOG_NAME, f"{TABLE_NAME}.csv", f"{TABLE_NAME}.parquet", *figures, SUMMARY_NAME]


def prediction_job(pred: Plate) -> dict[str, Any]:
    """The ``viscy predict`` job metadata of a prediction store (empty when none, e.g. another tool wrote it)."""
    job = pred.plate_attrs().get(PREDICTION_ATTR)
    # A position's completion marker shares the attribute name but carries no "denormalized" key.
    return dict(job) if isinstance(job, dict) and "targets" in job and "denormalized" in job else {}


def infer_target_channels(pred: Plate, target: Plate, suffix: str) -> list[str]:
    """Targets of every ``<target><suffix>`` channel of the prediction plate, in its channel order.

    Raises
    ------
    ChannelNotFoundError
        If there is no such channel, or its target is not in the target plate.
    """
    available = pred.channel_names
    stems = [n[: -len(suffix)] for n in available if n.endswith(suffix) and len(n) > len(suffix)]
    if not stems:
        raise ChannelNotFoundError(
            f"no prediction channel (name ending in {suffix!r}) in {pred.root}; available channels: "
            f"{', '.join(available)}. Run `viscy predict` first (it writes <target>{suffix} channels), or set "
            "prediction_path / prediction_suffix / target_channels to where the predictions are."
        )
    missing = [s for s in stems if s not in target.channel_names]
    if missing:
        raise ChannelNotFoundError(
            f"prediction channel(s) {', '.join(m + suffix for m in missing)} of {pred.root} have no target channel "
            f"{', '.join(map(repr, missing))} in {target.root} (available: {', '.join(target.channel_names)}); set "
            "target_channels to the channels to score"
        )
    return stems


def _prediction_indices(pred: Plate, config: EvaluateConfig) -> list[int]:
    names = [c + config.prediction_suffix for c in config.target_channels]
    available = pred.channel_names
    missing = [n for n in names if n not in available]
    if missing:
        raise ChannelNotFoundError(
            f"prediction channel(s) {', '.join(map(repr, missing))} not found in {pred.root}; available channels: "
            f"{', '.join(available)}. Run `viscy predict` first (it writes <target>{config.prediction_suffix} "
            "channels), or set prediction_path / prediction_suffix to where the predictions are."
        )
    return [available.index(n) for n in names]


def _check_complete(pred: Plate, positions: list[str], job: dict[str, Any]) -> None:
    """Refuse positions whose prediction job did not finish (their channels may hold zeros)."""
    incomplete = []
    for name in positions:
        state = pred.position_attrs(name).get(PREDICTION_ATTR) or {}
        if not (state.get("complete") and state.get("fingerprint") == job.get("fingerprint")):
            incomplete.append(name)
    if incomplete:
        raise DataError(
            f"predictions of position(s) {', '.join(incomplete[:10])} in {pred.root} are not complete (the prediction "
            "job was interrupted or never ran on them); rerun the same `viscy predict` to finish them, or leave them "
            "out with the positions key"
        )


def resolve_config(config: EvaluateConfig, target: Plate, pred: Plate, job: dict[str, Any]) -> EvaluateConfig:
    """The config with inferred target, source and segmentation channels filled in (explicit values win)."""
    update: dict[str, Any] = {}
    targets = config.target_channels or infer_target_channels(pred, target, config.prediction_suffix)
    update["target_channels"] = list(targets)
    if config.source_channels is None:
        sources = [s for s in job.get("sources") or [] if s in target.channel_names]
        if sources:
            update["source_channels"] = sources
    seg = config.segmentation
    if seg is not None and seg.channel is None:
        update["segmentation"] = seg.model_copy(update={"channel": targets[0]})
    return config.model_copy(update=update)


def plan_evaluation(config: EvaluateConfig) -> EvalPlan:
    """Open the plates, resolve channels and units, and check positions, shapes, statistics and labels.

    Nothing is written.

    Raises
    ------
    DataError
        Naming the problem and the fix (missing prediction channel, position, statistics or label image;
        unknown prediction units; shape mismatch).
    ViscyError
        For an unusable segmentation config.
    """
    from viscy.segment.segmenters import check_segmenter

    if config.segmentation is not None:
        check_segmenter(config.segmentation)
    with Plate(config.data_path) as target:
        positions = target.select(config.positions)
        pred = Plate(config.prediction_path) if config.prediction_path else target
        try:
            job = prediction_job(pred)
            config = resolve_config(config, target, pred, job)
            seg = config.segmentation
            if seg is not None and seg.channel not in config.target_channels:
                raise ViscyError(
                    f"segmentation.channel {seg.channel!r} is not a target channel "
                    f"({', '.join(config.target_channels)}); add it to target_channels or segment one of those"
                )
            target_idx = target.channel_indices(config.target_channels)
            source_idx = target.channel_indices(config.source_channels[:1])[0] if config.source_channels else None
            prediction_idx = _prediction_indices(pred, config)
            if pred is not target:
                absent = [p for p in positions if p not in pred.positions]
                if absent:
                    raise DataError(
                        f"positions {', '.join(absent[:10])} of {target.root} are missing from the prediction plate "
                        f"{pred.root}; predict them, or restrict the positions key"
                    )
            units = resolve_units(config, job, pred.root)
            if any(u.origin.startswith("prediction job") for u in units):
                _check_complete(pred, positions, job)
            shapes = {}
            for name in positions:
                t_shape = target.info(name).shape
                p_shape = pred.info(name).shape
                t_tzyx, p_tzyx = (t_shape[0], *t_shape[2:]), (p_shape[0], *p_shape[2:])
                if t_tzyx != p_tzyx:
                    raise ShapeError(
                        f"position {name}: prediction (T, Z, Y, X) = {p_tzyx} in {pred.root} does not match the "
                        f"target's {t_tzyx} in {target.root}; predict the full FOV (all time points and slices) "
                        "or point prediction_path at the matching plate"
                    )
                target_params(target, name, config.target_channels, units)
                if seg is not None and seg.use_ground_truth_labels:
                    _check_labels(target, name, seg.use_ground_truth_labels, t_shape)
                shapes[name] = t_shape
            masks = None
            if seg is not None:
                masks = find_prediction_masks(pred, positions, seg.channel + config.prediction_suffix, seg, shapes)
        finally:
            if pred is not target:
                pred.close()
    job_summary = {k: job[k] for k in ("fingerprint", "model", "units") if k in job}
    return EvalPlan(config, positions, target_idx, prediction_idx, source_idx, shapes, units, job_summary, masks)


def _check_labels(plate: Plate, name: str, label: str, shape: tuple[int, ...]) -> None:
    available = plate.labels(name)
    if label not in available:
        raise DataError(
            f"position {name} of {plate.root} has no label image {label!r} (available: "
            f"{', '.join(available) or 'none'}); set segmentation.use_ground_truth_labels to one of them or null "
            "to segment the target channel instead"
        )
    arr = plate.array(name, plate.label_key(name, label))
    expected = (shape[0], 1, *shape[2:])
    if tuple(arr.shape) != expected:
        raise ShapeError(f"label image {label} of {name} has shape {tuple(arr.shape)}, expected {expected}")


def _z_indices(config: EvaluateConfig, nz: int) -> list[int]:
    return list(range(nz)) if config.z_slices == "all" else [nz // 2]


def evaluate_fov(plan: EvalPlan, position: str, t: int, with_panel: bool) -> tuple[list[dict[str, Any]], dict | None]:
    """Metric rows (and optionally an example panel) of one position and time point.

    Returns
    -------
    rows, panel
        One dict per channel and z slice; ``panel`` (centre slice) when ``with_panel`` is true, else None.
    """
    config = plan.config
    seg = config.segmentation
    nz = plan.shapes[position][2]
    zs = _z_indices(config, nz)
    z_sel = slice(zs[0], zs[-1] + 1)
    with Plate(config.data_path) as target_plate:
        target = target_plate.read(position, t, plan.target_idx, z=z_sel).astype(np.float32)
        rows_norm = [i for i, u in enumerate(plan.units) if u.normalization is not None]
        if rows_norm:
            params = target_params(target_plate, position, config.target_channels, plan.units)
            target[rows_norm] = normalize(target[rows_norm], params[rows_norm])
        source = None
        if with_panel and plan.source_idx is not None:
            source = target_plate.read(position, t, [plan.source_idx], z=slice(nz // 2, nz // 2 + 1))[0, 0]
        gt = None
        if seg is not None and seg.use_ground_truth_labels:
            label_key = target_plate.label_key(position, seg.use_ground_truth_labels)
            gt = target_plate.read(position, t, [0], z=z_sel, array=label_key)
            gt = gt[0]
    stored_key = plan.masks.keys.get(position) if plan.masks is not None else None
    stored_masks = None
    with Plate(plan.prediction_path) as pred_plate:
        prediction = pred_plate.read(position, t, plan.prediction_idx, z=z_sel).astype(np.float32)
        if stored_key is not None:
            stored_masks = pred_plate.read(position, t, [0], z=z_sel, array=stored_key)[0]

    segmenter = None
    # Ground-truth references and reused prediction masks leave nothing to segment: no model is loaded.
    if seg is not None and (gt is None or stored_masks is None):
        from viscy.segment.segmenters import get_segmenter

        segmenter = get_segmenter(seg)
    rows: list[dict[str, Any]] = []
    panel_rows = []
    panel_z = zs.index(nz // 2) if nz // 2 in zs else 0
    for c, channel in enumerate(config.target_channels):
        for j, z in enumerate(zs):
            tgt, prd = target[c, j], prediction[c, j]
            if not (np.isfinite(tgt).all() and np.isfinite(prd).all()):
                raise DataError(
                    f"position {position} t={t} z={z} channel {channel}: target or prediction holds NaN/inf; "
                    "re-run `viscy predict` for this FOV or exclude it with the positions key"
                )
            row: dict[str, Any] = {"position": position, "t": t, "channel": channel, "z": z}
            row.update(regression_metrics(tgt, prd))
            masks = None
            if seg is not None and channel == seg.channel:
                ref = gt[j].astype(np.int32) if gt is not None else segmenter(tgt)
                pred_masks = stored_masks[j].astype(np.int32) if stored_masks is not None else segmenter(prd)
                row.update(segmentation_metrics(ref, pred_masks))
                masks = (ref, pred_masks)
            rows.append(row)
            if with_panel and j == panel_z:
                entry = {"name": channel, "target": tgt, "prediction": prd, "metrics": row,
                         "units": plan.units[c].label}
                if masks is not None:
                    entry["ref_masks"], entry["pred_masks"] = masks
                    entry["ref_title"] = f"labels/{seg.use_ground_truth_labels}" if gt is not None else "target masks"
                panel_rows.append(entry)
    panel = None
    if with_panel:
        panel = {
            "title": f"{position}  t={t}  z={zs[panel_z]}",
            "source": source,
            "source_name": config.source_channels[0] if config.source_channels else None,
            "channels": panel_rows,
        }
    return rows, panel


def _run_tasks(plan: EvalPlan) -> tuple[list[dict[str, Any]], list[tuple[str, dict]]]:
    import ray

    from viscy.ray_utils import as_completed, ensure_ray

    ensure_ray()
    config = plan.config
    num_gpus = 0.0
    seg = config.segmentation
    if seg is not None and seg.method == "cellpose" and seg.gpu is not False:
        # Several tasks share a GPU: Cellpose-SAM inference needs ~2 GB.
        num_gpus = 0.25 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    task = ray.remote(num_cpus=config.num_cpus_per_task, num_gpus=num_gpus, max_retries=1)(evaluate_fov)
    plan_ref = ray.put(plan)
    panel_positions = set(plan.panel_positions)
    refs = {}
    for name in plan.positions:
        for t in range(plan.shapes[name][0]):
            refs[task.remote(plan_ref, name, t, name in panel_positions and t == 0)] = (name, t)
    rows: list[dict[str, Any]] = []
    panels: list[tuple[str, dict]] = []
    for ref, (task_rows, panel) in as_completed(list(refs), "evaluate FOV/time points", "task"):
        rows.extend(task_rows)
        if panel is not None:
            panels.append((refs[ref][0], panel))
    return rows, panels


@dataclass(frozen=True)
class EvaluateResult:
    """What ``viscy evaluate`` wrote.

    Attributes
    ----------
    output_dir
        Where ``metrics.csv``/``.parquet``, ``figures/`` and ``summary.json`` are.
    metrics
        One row per position / t / channel / z (the table in ``metrics.csv``).
    mean
        Channel -> metric -> mean over finite values.
    units
        Channel -> the units target and prediction were compared in.
    summary
        Everything in ``summary.json``.
    """

    output_dir: Path
    metrics: pd.DataFrame
    mean: dict[str, dict[str, float | None]]
    units: dict[str, str]
    summary: dict[str, Any]


def run_evaluate(config: EvaluateConfig) -> EvaluateResult:
    """Validate inputs, score every FOV/time point with Ray, write tables, figures and the summary."""
    from viscy.console import place_log

    start = time.time()
    plan = plan_evaluation(config)
    out = Path(config.output_dir)
    planned = plan.output_files()
    previous = check_output_dir(out, planned)
    prepare_output_dir(out, previous, planned)
    save_config(plan.config, out, "evaluate")
    place_log(out, LOG_NAME)
    if plan.masks is not None:
        for line in plan.masks.console_lines(plan.prediction_path, len(plan.positions)):
            print(line)
    rows, panels = _run_tasks(plan)
    table = pd.DataFrame(rows)
    table = table.sort_values(list(ID_COLUMNS), kind="stable", key=_channel_order(plan.config)).reset_index(drop=True)
    masks = plan.masks.summary(plan.positions) if plan.masks is not None else None
    summary = write_outputs(
        table, panels, plan.config, plan.units, plan.prediction_job, time.time() - start, prediction_masks=masks
    )
    units = ", ".join(f"{ch}: {u}" for ch, u in summary["units"].items())
    print(f"evaluation of {summary['n_positions']} positions ({summary['n_rows']} rows) written to {out}")
    print(f"compared in units: {units}")
    print(format_summary(summary["mean"]))
    return EvaluateResult(out, table, summary["mean"], summary["units"], summary)


def _channel_order(config: EvaluateConfig):
    order = {c: i for i, c in enumerate(config.target_channels)}

    def key(col: pd.Series) -> pd.Series:
        return col.map(order) if col.name == "channel" else col

    return key
