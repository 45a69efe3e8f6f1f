"""PNG figures of an evaluation: metric distributions per channel and example panels (matplotlib, Agg)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

_LABELS = {
    "pearson": "Pearson r",
    "ssim": "SSIM",
    "ms_ssim": "MS-SSIM",
    "psnr": "PSNR (dB)",
    "mae": "MAE",
    "mse": "MSE",
    "nrmse": "NRMSE",
    "ap_50_95": "AP@[.5:.95]",
    "ap_50": "AP@0.5",
    "ap_75": "AP@0.75",
    "f1_50": "F1@0.5",
    "precision_50": "precision@0.5",
    "recall_50": "recall@0.5",
    "dice": "Dice (foreground)",
    "jaccard": "Jaccard (foreground)",
}


def _save(fig: plt.Figure, path: Path) -> Path:
    """Save to a temporary name, then rename, so a PNG on disk is always complete."""
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_metric_distributions(table: pd.DataFrame, metrics: list[str], path: Path) -> Path:
    """One subplot per metric: a box per channel with every FOV/t/z value as a jittered point."""
    metrics = [m for m in metrics if m in table and np.isfinite(table[m].to_numpy(dtype=float)).any()]
    channels = list(dict.fromkeys(table["channel"]))
    ncol = min(4, max(len(metrics), 1))
    nrow = max(1, int(np.ceil(len(metrics) / ncol)))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        data, names = [], []
        for ch in channels:
            vals = table.loc[table["channel"] == ch, metric].to_numpy(dtype=float)
            vals = vals[np.isfinite(vals)]
            if len(vals):
                data.append(vals)
                names.append(ch)
        ax.boxplot(data, showfliers=False, widths=0.5)
        for i, vals in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=10, alpha=0.6, color="tab:blue", zorder=3)
        ax.set_xticks(range(1, len(names) + 1), names)
        ax.set_title(_LABELS.get(metric, metric))
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(f"metrics per FOV / time point / slice (n = {len(table)} rows)")
    fig.tight_layout()
    return _save(fig, path)


def display_range(image: np.ndarray, percentiles: tuple[float, float] = (1, 99.5)) -> tuple[float, float]:
    """Percentile display range (vmin, vmax) of ONE image.

    Each panel gets its own range: input, target and prediction may be in different units (raw vs normalised),
    and a shared range would show one of them as a flat square.
    """
    vals = np.asarray(image, dtype=np.float64).ravel()
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return 0.0, 1.0
    lo, hi = np.percentile(vals, percentiles)
    return float(lo), float(hi if hi > lo else lo + 1)


def _show_labels(ax: plt.Axes, labels: np.ndarray, title: str) -> None:
    from skimage.color import label2rgb

    ax.imshow(label2rgb(labels, bg_label=0) if labels.max() > 0 else np.zeros((*labels.shape, 3)))
    ax.set_title(f"{title} ({len(np.unique(labels[labels > 0]))} objects)", fontsize=9)


def draw_example_panel(panel: dict[str, Any]) -> plt.Figure:
    """Input, target, prediction (each with its own display range) and, for the segmented channel, both masks.

    ``panel`` holds ``title``, optional ``source`` (2D) and ``source_name``, and ``channels``: a list of dicts
    with ``name``, ``target``, ``prediction``, ``metrics``, optionally ``units`` (the units both are compared
    in) and ``ref_masks``/``pred_masks``.
    """
    rows = panel["channels"]
    has_masks = any("pred_masks" in r for r in rows)
    ncol = 3 + 2 * has_masks
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.8 * ncol, 3.0 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows, strict=True):
        if panel.get("source") is not None:
            src = panel["source"]
            vmin, vmax = display_range(src)
            ax_row[0].imshow(src, cmap="gray", vmin=vmin, vmax=vmax)
            ax_row[0].set_title(f"input: {panel.get('source_name', 'source')}", fontsize=9)
        units = f"\n{row['units']}" if row.get("units") else ""
        vmin, vmax = display_range(row["target"])
        ax_row[1].imshow(row["target"], cmap="magma", vmin=vmin, vmax=vmax)
        ax_row[1].set_title(f"target: {row['name']}{units}", fontsize=8)
        vmin, vmax = display_range(row["prediction"])
        ax_row[2].imshow(row["prediction"], cmap="magma", vmin=vmin, vmax=vmax)
        m = row["metrics"]
        title = f"prediction  r={m.get('pearson', np.nan):.3f} SSIM={m.get('ssim', np.nan):.3f}"
        ax_row[2].set_title(title, fontsize=8)
        if "pred_masks" in row:
            _show_labels(ax_row[3], row["ref_masks"], row.get("ref_title", "target masks"))
            _show_labels(ax_row[4], row["pred_masks"], "predicted masks")
            ax_row[4].set_title(
                ax_row[4].get_title() + f"\nAP@.5={m.get('ap_50', np.nan):.2f} F1@.5={m.get('f1_50', np.nan):.2f}",
                fontsize=9,
            )
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.images:
                ax.axis("off")
    fig.suptitle(panel["title"])
    fig.tight_layout()
    return fig


def plot_example_panel(panel: dict[str, Any], path: Path) -> Path:
    """Draw an example panel (see :func:`draw_example_panel`) and save it as a PNG."""
    return _save(draw_example_panel(panel), path)
