"""``viscy evaluate``: score predicted channels against their targets with one Ray task per FOV and time point.

Outputs in ``output_dir``::

    viscy_config.yaml            the resolved config (written once the inputs are validated)
    metrics.csv, metrics.parquet one row per position / t / channel / z: regression metrics, plus
                                 segmentation metrics on the rows of the segmented channel (NaN elsewhere)
    figures/metric_distributions.png, figures/example_<row>_<col>_<fov>.png
    summary.json                 written last: its presence means the evaluation completed

Every file is written under a temporary name and renamed, and a stale ``summary.json`` is removed first,
so an interrupted run never leaves output that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from viscy.config import EvaluateConfig, save_config
from viscy.data.plate import LABELS_GROUP, Plate
from viscy.errors import ChannelNotFoundError, DataError, ShapeError, ViscyError
from viscy.evaluate.metrics import REGRESSION_METRICS, SEGMENTATION_METRICS, regression_metrics, segmentation_metrics

SUMMARY_NAME = "summary.json"
TABLE_NAME = "metrics"
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

    @property
    def prediction_path(self) -> Path:
        return self.config.prediction_path or self.config.data_path


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


def plan_evaluation(config: EvaluateConfig) -> EvalPlan:
    """Open the plates and check channels, positions, shapes and labels before any work starts.

    Raises
    ------
    DataError
        Naming the problem and the fix (missing prediction channel, position, label image; shape mismatch).
    ViscyError
        For an unusable segmentation config.
    """
    from viscy.evaluate.segment import check_segmenter

    seg = config.segmentation
    if seg is not None:
        check_segmenter(seg)
        if seg.channel not in config.target_channel:
            raise ViscyError(
                f"segmentation.channel {seg.channel!r} is not a target channel ({', '.join(config.target_channel)}); "
                "add it to target_channel or segment one of those"
            )
    with Plate(config.data_path) as target:
        positions = target.select(config.positions)
        target_idx = target.channel_indices(config.target_channel)
        source_idx = target.channel_indices(config.source_channel)[0] if config.source_channel else None
        pred = Plate(config.prediction_path) if config.prediction_path else target
        try:
            prediction_idx = _prediction_indices(pred, config)
            if pred is not target:
                absent = [p for p in positions if p not in pred.positions]
                if absent:
                    raise DataError(
                        f"positions {', '.join(absent[:10])} of {target.root} are missing from the prediction plate "
                        f"{pred.root}; predict them, or restrict the positions key"
                    )
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
                if seg is not None and seg.use_ground_truth_labels:
                    _check_labels(target, name, seg.use_ground_truth_labels, t_shape)
                shapes[name] = t_shape
        finally:
            if pred is not target:
                pred.close()
    return EvalPlan(config, positions, target_idx, prediction_idx, source_idx, shapes)


def _check_labels(plate: Plate, name: str, label: str, shape: tuple[int, ...]) -> None:
    available = plate.labels(name)
    if label not in available:
        raise DataError(
            f"position {name} of {plate.root} has no label image {label!r} (available: "
            f"{', '.join(available) or 'none'}); set segmentation.use_ground_truth_labels to one of them or null "
            "to segment the target channel instead"
        )
    arr = plate.position_node(name).zgroup[f"{LABELS_GROUP}/{label}/0"]
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
        source = None
        if with_panel and plan.source_idx is not None:
            source = target_plate.read(position, t, [plan.source_idx], z=slice(nz // 2, nz // 2 + 1))[0, 0]
        gt = None
        if seg is not None and seg.use_ground_truth_labels:
            gt = target_plate.read(position, t, [0], z=z_sel, array=f"{LABELS_GROUP}/{seg.use_ground_truth_labels}/0")
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
                entry = {"name": channel, "target": tgt, "prediction": prd, "metrics": row}
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
    panel_positions = set(plan.positions[: config.num_example_panels])
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
    table: pd.DataFrame, panels: list[tuple[str, dict]], config: EvaluateConfig, elapsed: float
) -> dict[str, Any]:
    """Write the tables, figures and (last) the summary JSON; return the summary."""
    from viscy.evaluate.figures import plot_example_panel, plot_metric_distributions

    out = Path(config.output_dir)
    fig_dir = out / "figures"
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
        figures.append(plot_example_panel(panel, fig_dir / f"example_{position.replace('/', '_')}.png"))
    means = summarize(table)
    seg = config.segmentation
    summary = {
        "complete": True,
        "data_path": str(config.data_path),
        "prediction_path": str(config.prediction_path or config.data_path),
        "n_positions": int(table["position"].nunique()),
        "n_rows": len(table),
        "channels": list(means),
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


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run_evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Validate inputs, score every FOV/time point with Ray, write tables, figures and the summary.

    Returns
    -------
    dict
        The summary written to ``summary.json``.
    """
    start = time.time()
    plan = plan_evaluation(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_NAME).unlink(missing_ok=True)
    save_config(config, out, "evaluate")
    rows, panels = _run_tasks(plan)
    table = pd.DataFrame(rows)
    table = table.sort_values(list(ID_COLUMNS), kind="stable", key=_channel_order(config)).reset_index(drop=True)
    summary = write_outputs(table, panels, config, time.time() - start)
    print(f"evaluation of {summary['n_positions']} positions ({summary['n_rows']} rows) written to {out}")
    print(format_summary(summary["mean"]))
    return summary


def _channel_order(config: EvaluateConfig):
    order = {c: i for i, c in enumerate(config.target_channel)}

    def key(col: pd.Series) -> pd.Series:
        return col.map(order) if col.name == "channel" else col

    return key
