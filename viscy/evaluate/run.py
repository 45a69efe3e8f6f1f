"""``viscy evaluate``: score predicted channels against their targets with one Ray task per FOV and time point.

Target and prediction are compared in the same units. The prediction job's metadata (``viscy predict``
stores it in ``.zattrs["viscy_prediction"]``) says whether predictions are normalised; if so, the target is
normalised the same way with the plate's stored statistics (:mod:`viscy.data.patches`), else both are
compared as raw intensities. Predictions without that metadata need ``prediction_units``.

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

import datetime as _dt
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from viscy.config import CONFIG_FILENAME, EvaluateConfig, NormalizationConfig, save_config
from viscy.data.patches import normalization_for_channel, normalization_params, normalize
from viscy.data.plate import Plate
from viscy.errors import ChannelNotFoundError, DataError, ShapeError, ViscyError
from viscy.evaluate.metrics import REGRESSION_METRICS, SEGMENTATION_METRICS, regression_metrics, segmentation_metrics
from viscy.predict.writer import ATTR as PREDICTION_ATTR
from viscy.predict.writer import SUFFIX as PREDICTION_SUFFIX

SUMMARY_NAME = "summary.json"
LOG_NAME = "viscy_evaluate.log"
MARKER_NAME = "viscy_evaluation.json"
TABLE_NAME = "metrics"
FIGURES_DIR = "figures"
ID_COLUMNS = ("position", "t", "channel", "z")
RAW_UNITS = "raw intensity"


@dataclass(frozen=True)
class ChannelUnits:
    """The units one target channel is compared in.

    ``normalization`` is None for raw intensities, else how the target is normalised to match the prediction;
    ``origin`` says where that came from (the prediction job's metadata or the ``prediction_units`` key).
    """

    normalization: NormalizationConfig | None
    origin: str

    @property
    def label(self) -> str:
        """Human-readable units, e.g. ``normalized (fov_statistics mean/std)``."""
        n = self.normalization
        return RAW_UNITS if n is None else f"normalized ({n.level} {n.subtrahend}/{n.divisor})"


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


def example_name(position: str) -> str:
    """File name of a position's example panel."""
    return f"example_{position.replace('/', '_')}.png"


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
            "prediction_path / prediction_suffix / target_channel to where the predictions are."
        )
    missing = [s for s in stems if s not in target.channel_names]
    if missing:
        raise ChannelNotFoundError(
            f"prediction channel(s) {', '.join(m + suffix for m in missing)} of {pred.root} have no target channel "
            f"{', '.join(map(repr, missing))} in {target.root} (available: {', '.join(target.channel_names)}); set "
            "target_channel to the channels to score"
        )
    return stems


def _prediction_indices(pred: Plate, config: EvaluateConfig) -> list[int]:
    names = [c + config.prediction_suffix for c in config.target_channel]
    available = pred.channel_names
    missing = [n for n in names if n not in available]
    if missing:
        raise ChannelNotFoundError(
            f"prediction channel(s) {', '.join(map(repr, missing))} not found in {pred.root}; available channels: "
            f"{', '.join(available)}. Run `viscy predict` first (it writes <target>{config.prediction_suffix} "
            "channels), or set prediction_path / prediction_suffix to where the predictions are."
        )
    return [available.index(n) for n in names]


def resolve_units(config: EvaluateConfig, job: dict[str, Any], pred_root: Path) -> list[ChannelUnits]:
    """Units each target channel is compared in: from the prediction job's metadata or ``prediction_units``.

    Raises
    ------
    DataError
        If the units are unknown (no metadata and ``prediction_units: auto``) or the config contradicts the
        metadata.
    """
    job_norms = {}
    for entry in job.get("target_normalization") or []:
        spec = NormalizationConfig(**entry)
        for ch in spec.channels or []:
            job_norms[ch] = spec
    fallback = [*(config.target_normalization or []), NormalizationConfig()]
    out = []
    for ch in config.target_channel:
        known: str | None = None
        # The job's metadata describes only the channels it wrote: <target>_prediction.
        if ch in job.get("targets", []) and config.prediction_suffix == PREDICTION_SUFFIX:
            if job.get("denormalized") is True:
                known = "raw"
            elif ch in job_norms:
                known = "normalized"
        name = ch + config.prediction_suffix
        if config.prediction_units == "auto" and known is None:
            raise DataError(
                f"the units of prediction channel {name!r} in {pred_root} are unknown: the store has no `viscy "
                "predict` metadata for it (.zattrs['viscy_prediction']). Set prediction_units: normalized "
                "(targets are then normalised with target_normalization, default fov_statistics median/iqr) "
                "or prediction_units: raw, e.g. --prediction_units raw"
            )
        if config.prediction_units != "auto" and known is not None and known != config.prediction_units:
            raise DataError(
                f"prediction_units: {config.prediction_units} contradicts the metadata of {pred_root}, whose "
                f"prediction job wrote {name!r} as {job.get('units', known)}; set prediction_units: auto"
            )
        units = known or config.prediction_units
        origin = "prediction job metadata" if known else "prediction_units (config)"
        if units == "raw":
            out.append(ChannelUnits(None, origin))
            continue
        spec = job_norms.get(ch) if known else None
        if spec is not None and config.target_normalization is not None:
            wanted = normalization_for_channel(ch, fallback)
            if (wanted.level, wanted.subtrahend, wanted.divisor) != (spec.level, spec.subtrahend, spec.divisor):
                raise DataError(
                    f"target_normalization ({wanted.level} {wanted.subtrahend}/{wanted.divisor}) contradicts the "
                    f"metadata of {pred_root}, whose predictions of {ch!r} are normalised with {spec.level} "
                    f"{spec.subtrahend}/{spec.divisor}; remove target_normalization"
                )
        spec = spec or normalization_for_channel(ch, fallback)
        out.append(ChannelUnits(spec.model_copy(update={"channels": [ch]}), origin))
    return out


def target_params(plate: Plate, position: str, channels: list[str], units: list[ChannelUnits]) -> np.ndarray:
    """``(C, 2)`` (subtrahend, divisor) that bring each target channel into its comparison units.

    Raw channels get (0, 1) and are left untouched; statistics come from the plate's ``normalization`` zattrs.

    Raises
    ------
    DataError
        Naming the ``viscy preprocess`` command that writes the missing statistics.
    """
    params = np.tile(np.asarray([0.0, 1.0], np.float32), (len(channels), 1))
    missing = []
    meta = plate.position_attrs(position).get("normalization") or {}
    for i, (ch, u) in enumerate(zip(channels, units, strict=True)):
        if u.normalization is None:
            continue
        try:
            params[i] = normalization_params(meta, [ch], [u.normalization])[0]
        except DataError:
            missing.append((ch, u))
    if missing:
        names = " ".join(ch for ch, _ in missing)
        what = ", ".join(f"{u.normalization.level} {u.normalization.subtrahend}/{u.normalization.divisor} of {ch!r}"
                         for ch, u in missing)
        raise DataError(
            f"position {position} of {plate.root} has no statistics {what}, needed to normalise the target like the "
            f"predictions (they are in normalised units); run `viscy preprocess --data_path {plate.root} "
            f"--channels {names}` first (it adds statistics and keeps the existing ones)"
        )
    return params


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
    targets = config.target_channel or infer_target_channels(pred, target, config.prediction_suffix)
    update["target_channel"] = list(targets)
    if config.source_channel is None:
        sources = job.get("sources") or []
        if sources and sources[0] in target.channel_names:
            update["source_channel"] = sources[0]
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
    from viscy.evaluate.segment import check_segmenter

    if config.segmentation is not None:
        check_segmenter(config.segmentation)
    with Plate(config.data_path) as target:
        positions = target.select(config.positions)
        pred = Plate(config.prediction_path) if config.prediction_path else target
        try:
            job = prediction_job(pred)
            config = resolve_config(config, target, pred, job)
            seg = config.segmentation
            if seg is not None and seg.channel not in config.target_channel:
                raise ViscyError(
                    f"segmentation.channel {seg.channel!r} is not a target channel "
                    f"({', '.join(config.target_channel)}); add it to target_channel or segment one of those"
                )
            target_idx = target.channel_indices(config.target_channel)
            source_idx = target.channel_indices(config.source_channel)[0] if config.source_channel else None
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
                target_params(target, name, config.target_channel, units)
                if seg is not None and seg.use_ground_truth_labels:
                    _check_labels(target, name, seg.use_ground_truth_labels, t_shape)
                shapes[name] = t_shape
        finally:
            if pred is not target:
                pred.close()
    job_summary = {k: job[k] for k in ("fingerprint", "model", "units") if k in job}
    return EvalPlan(config, positions, target_idx, prediction_idx, source_idx, shapes, units, job_summary)


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
            params = target_params(target_plate, position, config.target_channel, plan.units)
            target[rows_norm] = normalize(target[rows_norm], params[rows_norm])
        source = None
        if with_panel and plan.source_idx is not None:
            source = target_plate.read(position, t, [plan.source_idx], z=slice(nz // 2, nz // 2 + 1))[0, 0]
        gt = None
        if seg is not None and seg.use_ground_truth_labels:
            label_key = target_plate.label_key(position, seg.use_ground_truth_labels)
            gt = target_plate.read(position, t, [0], z=z_sel, array=label_key)
            gt = gt[0]
    with Plate(plan.prediction_path) as pred_plate:
        prediction = pred_plate.read(position, t, plan.prediction_idx, z=z_sel).astype(np.float32)

    segmenter = None
    if seg is not None:
        from viscy.evaluate.segment import get_segmenter

        segmenter = get_segmenter(seg)
    rows: list[dict[str, Any]] = []
    panel_rows = []
    panel_z = zs.index(nz // 2) if nz // 2 in zs else 0
    for c, channel in enumerate(config.target_channel):
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
            if segmenter is not None and channel == seg.channel:
                ref = gt[j].astype(np.int32) if gt is not None else segmenter(tgt)
                pred_masks = segmenter(prd)
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
            "source_name": config.source_channel,
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


def _finite_mean(values: pd.Series) -> float | None:
    v = values.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def summarize(table: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """Mean of every metric per channel over finite values (a perfect prediction's PSNR of inf is skipped)."""
    metrics = [m for m in (*REGRESSION_METRICS, *SEGMENTATION_METRICS) if m in table]
    out = {}
    for channel, group in table.groupby("channel", sort=False):
        out[str(channel)] = {m: _finite_mean(group[m]) for m in metrics if group[m].notna().any()}
    return out


def format_summary(means: dict[str, dict[str, float | None]]) -> str:
    """The summary as a text table: one row per channel, one column per metric."""
    frame = pd.DataFrame(means).T
    return frame.to_string(float_format=lambda v: f"{v:.4g}", na_rep="-")


def write_outputs(
    table: pd.DataFrame, panels: list[tuple[str, dict]], plan: EvalPlan, elapsed: float
) -> dict[str, Any]:
    """Write the tables, figures and (last) the summary JSON; return the summary."""
    from viscy.evaluate.figures import plot_example_panel, plot_metric_distributions

    config = plan.config
    out = Path(config.output_dir)
    fig_dir = out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    csv, parquet = out / f"{TABLE_NAME}.csv", out / f"{TABLE_NAME}.parquet"
    table.to_csv(csv.with_name(csv.name + ".tmp"), index=False)
    os.replace(csv.with_name(csv.name + ".tmp"), csv)
    table.to_parquet(parquet.with_name(parquet.name + ".tmp"), index=False)
    os.replace(parquet.with_name(parquet.name + ".tmp"), parquet)
    figures = [
        plot_metric_distributions(
            table, [*REGRESSION_METRICS, *SEGMENTATION_METRICS], fig_dir / "metric_distributions.png"
        )
    ]
    for position, panel in sorted(panels, key=lambda p: p[0]):
        figures.append(plot_example_panel(panel, fig_dir / example_name(position)))
    means = summarize(table)
    seg = config.segmentation
    summary = {
        "complete": True,
        "data_path": str(config.data_path),
        "prediction_path": str(config.prediction_path or config.data_path),
        "n_positions": int(table["position"].nunique()),
        "n_rows": len(table),
        "channels": list(means),
        "source_channel": config.source_channel,
        "units": {ch: u.label for ch, u in zip(config.target_channel, plan.units, strict=True)},
        "units_from": {ch: u.origin for ch, u in zip(config.target_channel, plan.units, strict=True)},
        "prediction_job": plan.prediction_job or None,
        "z_slices": config.z_slices,
        "segmentation": None
        if seg is None
        else {
            "method": seg.method,
            "channel": seg.channel,
            "reference": f"labels/{seg.use_ground_truth_labels}" if seg.use_ground_truth_labels else "segmented target",
            "ap_definition": "mean over IoU 0.50:0.05:0.95 of TP/(TP+FP+FN), Hungarian matching (Cellpose)",
        },
        "mean": means,
        "files": {
            "csv": csv.name,
            "parquet": parquet.name,
            "figures": [str(f.relative_to(out)) for f in figures],
        },
        "elapsed_s": round(elapsed, 2),
    }
    tmp = out / (SUMMARY_NAME + ".tmp")
    tmp.write_text(json.dumps(_json_safe(summary), indent=2))
    os.replace(tmp, out / SUMMARY_NAME)
    return summary


# ------------------------------------------------------------------------------------------ output_dir
def _read_marker(out: Path) -> list[str] | None:
    """Files listed by a previous evaluation's marker, or None if ``out`` holds no viscy evaluation."""
    try:
        marker = json.loads((out / MARKER_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or "viscy_evaluation" not in marker:
        return None
    files = []
    for f in marker.get("files", []):
        rel = Path(str(f))
        # A marker is only trusted to name plain files inside output_dir.
        if not rel.is_absolute() and ".." not in rel.parts:
            files.append(rel.as_posix())
    return files


def check_output_dir(out: Path, planned: list[str]) -> list[str]:
    """Check that ``out`` may receive an evaluation; return the files of a previous one to remove.

    ``out`` must be absent, empty, or a previous viscy evaluation (recognised by its ``viscy_evaluation.json``).

    Raises
    ------
    DataError
        Naming the path and the fix, if ``out`` holds anything else (nothing is touched).
    """
    if not out.exists():
        return []
    if not out.is_dir():
        raise DataError(f"output_dir {out} exists and is not a directory; choose another output_dir")
    if not any(out.iterdir()):
        return []
    previous = _read_marker(out)
    if previous is None:
        raise DataError(
            f"output_dir {out} is not empty and is not a viscy evaluation (it has no {MARKER_NAME}); viscy "
            "never overwrites files it did not write: choose another output_dir (absent or empty)"
        )
    linked = _linked_paths(out, [*previous, *planned])
    if linked:
        raise DataError(
            f"output_dir {out} holds symbolic link(s) {', '.join(linked)} where viscy evaluate writes or removes "
            "files; viscy never writes or deletes through a link. Remove the link(s) (their targets are untouched) "
            "or choose another output_dir"
        )
    clash = [f for f in planned if ((out / f).exists() or (out / f).is_symlink()) and f not in previous]
    if clash:
        raise DataError(
            f"output_dir {out} holds {', '.join(clash)}, which the previous viscy evaluation there did not write; "
            "choose another output_dir, or move those files away"
        )
    return previous


def _linked_paths(out: Path, files: list[str]) -> list[str]:
    """Folders inside ``out`` on the way to ``files``, and temporary names viscy writes, that are symbolic links.

    Leaves ``files`` themselves alone: removing or renaming over a link never touches its target.
    """
    folders = {parent for f in files for parent in Path(f).parents if parent != Path(".")}
    temporaries = {Path(f + ".tmp") for f in [*files, MARKER_NAME]}
    return sorted(p.as_posix() for p in folders | temporaries if (out / p).is_symlink())


def _write_marker(out: Path, files: list[str]) -> None:
    marker = {
        "viscy_evaluation": 1,
        "note": "written by `viscy evaluate`; a rerun into this directory removes exactly these files",
        "started": _dt.datetime.now().isoformat(),
        "files": sorted(set(files)),
    }
    tmp = out / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    os.replace(tmp, out / MARKER_NAME)


def prepare_output_dir(out: Path, previous: list[str], planned: list[str]) -> None:
    """Create ``out`` and replace a previous evaluation: list every file in the marker, then remove the old ones.

    Raises
    ------
    DataError
        If a folder or temporary name in ``out`` became a symbolic link since :func:`check_output_dir`.
    """
    linked = _linked_paths(out, [*previous, *planned])
    if linked:  # checked before writing; checked again before deleting
        raise DataError(f"output_dir {out} now holds symbolic link(s) {', '.join(linked)}; nothing was removed")
    out.mkdir(parents=True, exist_ok=True)
    # The marker covers old and new files until the old ones are gone, so an interrupted rerun stays replaceable.
    _write_marker(out, [*previous, *planned])
    for rel in sorted(previous, key=lambda f: f != SUMMARY_NAME):
        for path in (out / rel, out / (rel + ".tmp")):
            if path.is_file() or path.is_symlink():
                path.unlink()
    fig_dir = out / FIGURES_DIR
    if fig_dir.is_dir() and not any(fig_dir.iterdir()):
        fig_dir.rmdir()
    _write_marker(out, planned)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


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
    rows, panels = _run_tasks(plan)
    table = pd.DataFrame(rows)
    table = table.sort_values(list(ID_COLUMNS), kind="stable", key=_channel_order(plan.config)).reset_index(drop=True)
    summary = write_outputs(table, panels, plan, time.time() - start)
    units = ", ".join(f"{ch}: {u}" for ch, u in summary["units"].items())
    print(f"evaluation of {summary['n_positions']} positions ({summary['n_rows']} rows) written to {out}")
    print(f"compared in units: {units}")
    print(format_summary(summary["mean"]))
    return EvaluateResult(out, table, summary["mean"], summary["units"], summary)


def _channel_order(config: EvaluateConfig):
    order = {c: i for i, c in enumerate(config.target_channel)}

    def key(col: pd.Series) -> pd.Series:
        return col.map(order) if col.name == "channel" else col

    return key
