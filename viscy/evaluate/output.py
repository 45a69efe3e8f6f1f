"""What ``viscy evaluate`` writes in ``output_dir`` and how it replaces a previous evaluation there.

A marker (``viscy_evaluation.json``) listing every file is written first and ``summary.json`` last; every file
is written under a temporary name and renamed. Files viscy did not write are never removed or overwritten,
and nothing is written or deleted through a symbolic link.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from viscy.errors import DataError
from viscy.evaluate.config import EvaluateConfig
from viscy.evaluate.metrics import REGRESSION_METRICS
from viscy.evaluate.units import ChannelUnits
from viscy.segment.metrics import SEGMENTATION_METRICS

SUMMARY_NAME = "summary.json"
LOG_NAME = "viscy_evaluate.log"
MARKER_NAME = "viscy_evaluation.json"
TABLE_NAME = "metrics"
FIGURES_DIR = "figures"


def example_name(position: str) -> str:
    """File name of a position's example panel."""
    return f"example_{position.replace('/', '_')}.png"


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
    table: pd.DataFrame,
    panels: list[tuple[str, dict]],
    config: EvaluateConfig,
    units: list[ChannelUnits],
    prediction_job: dict[str, Any],
    elapsed: float,
    prediction_masks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the tables, figures and (last) the summary JSON; return the summary.

    ``units`` are the target channels' (in ``config.target_channels`` order); ``prediction_job`` is what the
    summary records of the job that wrote the predictions (empty when unknown); ``prediction_masks`` where the
    segmented prediction's masks came from (stored masks reused, or segmented), per position.
    """
    from viscy.evaluate.figures import plot_example_panel, plot_metric_distributions

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
        "source_channels": config.source_channels,
        "units": {ch: u.label for ch, u in zip(config.target_channels, units, strict=True)},
        "units_from": {ch: u.origin for ch, u in zip(config.target_channels, units, strict=True)},
        "prediction_job": prediction_job or None,
        "z_slices": config.z_slices,
        "segmentation": None
        if seg is None
        else {
            "method": seg.method,
            "channel": seg.channel,
            "reference": f"labels/{seg.use_ground_truth_labels}" if seg.use_ground_truth_labels else "segmented target",
            "prediction_masks": prediction_masks,
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
