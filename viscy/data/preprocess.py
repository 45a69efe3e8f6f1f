"""``viscy preprocess``: normalisation statistics (and foreground masks) in VisCy's zattrs layout.

One Ray task per FOV samples every channel on a YX grid (all T and Z), returns FOV statistics plus a
bounded subsample for the dataset statistics, and optionally writes an Otsu foreground mask next to the
image. The driver then writes, exactly as VisCy does::

    plate/.zattrs["normalization"][channel]["dataset_statistics"]
    plate/A/1/0/.zattrs["normalization"][channel] = {"dataset_statistics": ..., "fov_statistics": ...,
                                                     "timepoint_statistics": {"0": ..., ...}}

Every entry under a channel is a level of statistics, because VisCy's reader walks channel -> level -> statistic.
viscy's own extras stay outside that layout: the Otsu threshold of the foreground mask is an attribute of the
``fg_mask`` array (``otsu_threshold``, beside ``channel``, ``sigma`` and the ``viscy_preprocess`` marker). Plates
written by earlier viscy versions carry it as ``normalization[channel]["otsu_threshold"]`` (a number, which VisCy
0.4.1 cannot read); :func:`fg_mask_threshold` still reads it there, and a rerun over a FOV removes it.

NGFF 0.5 (zarr v3) plates get the same keys at the top level of ``zarr.json``'s ``attributes`` (beside the
NGFF ``ome`` block, where iohub 0.3 and VisCy put them) and a zarr v3 ``fg_mask``. Pixel data are never modified;
rerunning gives the same values (the sampling grid is deterministic). A rerun replaces only an ``fg_mask`` viscy
preprocess wrote (its ``viscy_preprocess`` attribute); any other array of that name, or a symbolic link, is refused.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from viscy.data.config import PreprocessConfig
from viscy.data.ngff import read_node
from viscy.data.plate import FG_MASK_KEY, Plate
from viscy.data.store_writer import create_array, write_attrs
from viscy.errors import DataError, ViscyError

STAT_KEYS = ("mean", "std", "median", "iqr", "min", "max", "p1", "p5", "p95", "p99", "p95_p5", "p99_p1")
# Per-FOV cap on values returned to the driver for dataset-level statistics (bounds driver memory).
MAX_SAMPLES_PER_FOV = 200_000
# Marks an fg_mask (and its partial) as viscy preprocess's: only such an array is ever replaced.
MASK_ATTR = "viscy_preprocess"
# The attributes of an fg_mask written before the marker existed (exactly these, and only viscy wrote them).
LEGACY_MASK_ATTRS = {"channel", "otsu_threshold", "sigma"}
# The fg_mask attribute holding its Otsu threshold; earlier versions also wrote it (a number) under
# normalization[channel], where VisCy expects only levels of statistics.
THRESHOLD_ATTR = "otsu_threshold"


def compute_statistics(values: np.ndarray) -> dict[str, float]:
    """VisCy's statistics of a 1-D sample: mean, std, median, iqr, min, max and percentiles."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise DataError("no finite values to compute statistics from")
    p1, p5, p25, p50, p75, p95, p99 = np.percentile(v, [1, 5, 25, 50, 75, 95, 99])
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(p50),
        "iqr": float(p75 - p25),
        "min": float(v.min()),
        "max": float(v.max()),
        "p1": float(p1),
        "p5": float(p5),
        "p95": float(p95),
        "p99": float(p99),
        "p95_p5": float(p95 - p5),
        "p99_p1": float(p99 - p1),
    }


@dataclass
class FovResult:
    """What one per-FOV task returns."""

    name: str
    fov_statistics: dict[str, dict[str, float]] = field(default_factory=dict)
    timepoint_statistics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    timepoint_samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    otsu_threshold: float | None = None  # as written in the fg_mask's attributes
    skipped: str | None = None


def _subsample(values: np.ndarray, limit: int) -> np.ndarray:
    if values.size <= limit:
        return values
    idx = np.linspace(0, values.size - 1, limit).astype(np.int64)
    return values[idx]


def is_viscy_fg_mask(path: Path) -> bool:
    """Whether ``path`` is a real (not linked) zarr array that viscy preprocess wrote as a foreground mask."""
    if path.is_symlink():
        return False
    node = read_node(path)
    if node is None or node.node_type != "array":
        return False
    return MASK_ATTR in node.attrs or set(node.attrs) == LEGACY_MASK_ATTRS


def _fov_group(plate: Plate, name: str) -> Path:
    return plate.root / name if plate.kind == "hcs" else plate.root


def check_fg_masks(plate: Plate, names: list[str]) -> None:
    """Refuse before anything is written if an ``fg_mask`` (or ``fg_mask.partial``) of ``names`` is not viscy's.

    Raises
    ------
    DataError
        Naming the first such array (or symbolic link) and the fix.
    """
    for name in names:
        for key in (FG_MASK_KEY, f"{FG_MASK_KEY}.partial"):
            path = _fov_group(plate, name) / key
            if path.is_symlink():
                raise DataError(
                    f"{path} is a symbolic link; viscy preprocess never replaces or deletes through a link. Remove "
                    "the link (its target is untouched) and rerun, or run without fg_mask"
                )
            if path.exists() and not is_viscy_fg_mask(path):
                raise DataError(
                    f"{path} exists and was not written by viscy preprocess (its attributes have no '{MASK_ATTR}' "
                    "marker); viscy never replaces or deletes it. Move or rename it and rerun, or run without fg_mask"
                )


def write_fg_mask(plate: Plate, name: str, channel: int, sigma: float) -> float:
    """Otsu foreground mask of one channel, written as uint8 array ``fg_mask`` (T, 1, Z, Y, X); returns the threshold.

    The mask is written to a temporary array and renamed when complete, so a killed run never leaves a
    mask that looks finished. NGFF 0.4 plates get a zarr v2 array, NGFF 0.5 plates a zarr v3 one. Both carry
    the ``viscy_preprocess`` marker; an existing mask without it is refused (:func:`check_fg_masks`). The
    threshold, the channel and the smoothing sigma are the mask's attributes (never in ``normalization``).
    """
    from skimage.filters import gaussian, threshold_otsu

    check_fg_masks(plate, [name])  # again in the task: the driver's check may be minutes old
    shape = plate.info(name).shape
    t_n, _, z_n, y_n, x_n = shape
    # Threshold from a grid sample of the whole FOV so all slices share one threshold.
    sample = plate.read(name, 0, [channel], slice(None), slice(None, None, 4), slice(None, None, 4))
    threshold = float(threshold_otsu(gaussian(sample[0].astype(np.float32), sigma=sigma / 4, channel_axis=None)))
    group_path = _fov_group(plate, name)
    tmp_key = f"{FG_MASK_KEY}.partial"
    mask_shape, mask_chunks = (t_n, 1, z_n, y_n, x_n), (1, 1, 1, y_n, x_n)
    mask_arr = create_array(group_path / tmp_key, mask_shape, mask_chunks, "uint8", plate.zarr_format)
    # the marker before any pixel: a partial left by a killed run is recognisably viscy's
    write_attrs(group_path / tmp_key, MASK_ATTR, {"array": FG_MASK_KEY})
    for t in range(t_n):
        for z in range(z_n):
            img = plate.read(name, t, [channel], slice(z, z + 1))[0, 0].astype(np.float32)
            mask_arr.write((t, 0, z), (gaussian(img, sigma=sigma) > threshold).astype(np.uint8))
    mask_attrs = {"channel": plate.channel_names[channel], THRESHOLD_ATTR: threshold, "sigma": sigma}
    for key, value in mask_attrs.items():
        write_attrs(group_path / tmp_key, key, value)
    final = group_path / FG_MASK_KEY
    check_fg_masks(plate, [name])  # checked before writing; checked again before deleting
    if final.exists():
        shutil.rmtree(final)
    os.replace(group_path / tmp_key, final)
    return threshold


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fg_mask_threshold(plate: Plate, name: str) -> float | None:
    """The Otsu threshold of a FOV's ``fg_mask``, or None when the FOV has no threshold recorded.

    Read from the mask's attributes; for plates preprocessed by earlier viscy versions, from the number they
    wrote under ``normalization[channel]["otsu_threshold"]`` (the mask's channel first, else any channel).
    """
    mask = read_node(_fov_group(plate, name) / FG_MASK_KEY)
    mask_attrs = mask.attrs if mask is not None else {}
    if _is_number(mask_attrs.get(THRESHOLD_ATTR)):
        return float(mask_attrs[THRESHOLD_ATTR])
    norm = plate.position_attrs(name).get("normalization") or {}
    channel = mask_attrs.get("channel")
    for entry in ([norm.get(channel)] if channel in norm else []) + list(norm.values()):
        if isinstance(entry, dict) and _is_number(entry.get(THRESHOLD_ATTR)):
            return float(entry[THRESHOLD_ATTR])
    return None


def _without_legacy_threshold(entry: Any) -> Any:
    """A channel's ``normalization`` entry without the threshold number earlier viscy versions put in it."""
    if isinstance(entry, dict) and _is_number(entry.get(THRESHOLD_ATTR)):
        return {level: stats for level, stats in entry.items() if level != THRESHOLD_ATTR}
    return entry


def _keep_legacy_threshold(plate: Plate, name: str) -> None:
    """Copy a threshold found only under ``normalization`` onto the FOV's own ``fg_mask`` before it is removed there."""
    path = _fov_group(plate, name) / FG_MASK_KEY
    if not path.exists() or not is_viscy_fg_mask(path) or THRESHOLD_ATTR in read_node(path).attrs:
        return
    threshold = fg_mask_threshold(plate, name)
    if threshold is not None:
        write_attrs(path, THRESHOLD_ATTR, threshold)


def fov_statistics_task(
    plate_path: str, name: str, channels: list[str], grid: int, fg_channel: str | None, fg_sigma: float
) -> FovResult:
    """Sample one FOV on the grid; returns statistics, a bounded subsample, and the Otsu threshold."""
    result = FovResult(name)
    try:
        plate = Plate(plate_path)
        idx = plate.channel_indices(channels)
        t_n = plate.info(name).shape[0]
        per_t: list[np.ndarray] = []
        for t in range(t_n):
            per_t.append(plate.read(name, t, idx, slice(None), slice(None, None, grid), slice(None, None, grid)))
        for ci, ch in enumerate(channels):
            all_t = np.concatenate([a[ci].ravel() for a in per_t]).astype(np.float32)
            if not np.isfinite(all_t).any():
                raise DataError(f"channel {ch} holds no finite values")
            result.fov_statistics[ch] = compute_statistics(all_t)
            result.samples[ch] = _subsample(all_t, MAX_SAMPLES_PER_FOV)
            for t, a in enumerate(per_t):
                vals = a[ci].ravel().astype(np.float32)
                result.timepoint_statistics.setdefault(ch, {})[str(t)] = compute_statistics(vals)
                result.timepoint_samples.setdefault(ch, {})[str(t)] = _subsample(vals, MAX_SAMPLES_PER_FOV // t_n)
        if fg_channel is not None:
            result.otsu_threshold = write_fg_mask(plate, name, plate.channel_indices(fg_channel)[0], fg_sigma)
    except ViscyError as exc:
        result.skipped = str(exc)
    return result


def write_statistics(plate: Plate, results: list[FovResult], channels: list[str]) -> dict[str, dict[str, float]]:
    """Write FOV and plate ``normalization`` attributes (VisCy's layout) from per-FOV results; the dataset
    statistics. Statistics of channels not recomputed are kept (less the threshold number earlier viscy versions
    put among them); the plate-level entry is written last.
    """
    dataset_stats = {ch: compute_statistics(np.concatenate([r.samples[ch] for r in results])) for ch in channels}
    t_keys = sorted({t for r in results for t in r.timepoint_samples[channels[0]]}, key=int)
    timepoint_stats = {
        ch: {
            t: compute_statistics(
                np.concatenate([r.timepoint_samples[ch][t] for r in results if t in r.timepoint_samples[ch]])
            )
            for t in t_keys
        }
        for ch in channels
    }
    # Merge with statistics of channels not recomputed now, so a partial rerun keeps the others.
    plate_norm = {ch: _without_legacy_threshold(e) for ch, e in plate.plate_attrs().get("normalization", {}).items()}
    for ch in channels:
        plate_norm[ch] = {"dataset_statistics": dataset_stats[ch], "timepoint_statistics": timepoint_stats[ch]}
    for r in results:
        old_norm = plate.position_attrs(r.name).get("normalization", {})
        if any(_without_legacy_threshold(e) is not e for e in old_norm.values()):
            _keep_legacy_threshold(plate, r.name)
        fov_norm = {ch: _without_legacy_threshold(e) for ch, e in old_norm.items()}
        for ch in channels:
            fov_norm[ch] = {
                "dataset_statistics": dataset_stats[ch],
                "fov_statistics": r.fov_statistics[ch],
                "timepoint_statistics": r.timepoint_statistics[ch],
            }
        plate.set_position_attr(r.name, "normalization", fov_norm)
    # The plate-level entry is written last: its presence means every FOV entry is complete.
    if plate.kind == "hcs":
        plate.set_plate_attr("normalization", plate_norm)
    return dataset_stats


MIN_SAMPLES_PER_SLICE = 1024


def _warn_sparse_grid(yx: tuple[int, int], grid: int) -> None:
    """Warn when the sampling grid leaves too few pixels per slice for stable statistics (small FOVs)."""
    per_slice = math.ceil(yx[0] / grid) * math.ceil(yx[1] / grid)
    if per_slice < MIN_SAMPLES_PER_SLICE:
        better = max(1, math.isqrt(yx[0] * yx[1] // (4 * MIN_SAMPLES_PER_SLICE)))
        warnings.warn(
            f"grid_spacing {grid} samples only {per_slice} pixels per {yx[0]}x{yx[1]} slice, so FOV statistics "
            f"(std, iqr) can be far off; use --grid_spacing {better} (VisCy's 32 suits FOVs of 1024x1024 and up)",
            stacklevel=3,
        )


@dataclass(frozen=True)
class PreprocessResult:
    """What ``viscy preprocess`` wrote.

    Attributes
    ----------
    plate
        The plate whose zattrs received the statistics.
    channels
        Channels with statistics.
    fovs
        FOVs with statistics; ``skipped`` maps the others to why (e.g. a corrupt chunk).
    dataset_statistics
        Per channel: mean, std, median, iqr, percentiles.
    seconds
        Wall time.
    config
        The resolved config saved beside the plate (``<plate>/viscy_preprocess/viscy_config.yaml``).
    """

    plate: Path
    channels: list[str]
    fovs: list[str]
    skipped: dict[str, str]
    dataset_statistics: dict[str, dict[str, float]]
    seconds: float
    config: Path


def run_preprocess(config: PreprocessConfig, progress: bool = True) -> PreprocessResult:
    """Compute and write normalisation statistics for a plate; save the config beside it; print a summary.

    Raises
    ------
    DataError
        If the plate, channels or positions are invalid, an ``fg_mask`` in the way is not viscy's, or every FOV
        was skipped.
    """
    import ray

    plate = Plate(config.data_path)
    channels = config.channels or plate.channel_names
    plate.channel_indices(channels)  # validates names before any work
    if config.fg_mask is not None:
        plate.channel_indices(config.fg_mask.channel)
    names = plate.select(config.positions)
    plate.check_consistent(names)
    if config.fg_mask is not None:
        check_fg_masks(plate, names)
    _warn_sparse_grid(plate.info(names[0]).shape[-2:], config.grid_spacing)
    fg = config.fg_mask
    started = time.perf_counter()
    from viscy.ray_utils import as_completed, ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=config.num_cpus_per_task)(fov_statistics_task)
    refs = [
        task.remote(
            str(plate.root if plate.kind == "hcs" else plate.path),
            n,
            channels,
            config.grid_spacing,
            fg.channel if fg else None,
            fg.smoothing_sigma if fg else 2.0,
        )
        for n in names
    ]
    results = [r for _, r in as_completed(refs, "preprocess FOVs", "fov", progress)]
    ok = sorted((r for r in results if r.skipped is None), key=lambda r: r.name)
    skipped = {r.name: r.skipped for r in results if r.skipped is not None}
    if not ok:
        raise DataError(f"every FOV was skipped: {skipped}")

    dataset_stats = write_statistics(plate, ok, channels)
    from viscy.config import save_config
    from viscy.console import place_log

    config_dir = plate.root / "viscy_preprocess"
    result = PreprocessResult(
        plate=plate.root,
        channels=list(channels),
        fovs=[r.name for r in ok],
        skipped=skipped,
        dataset_statistics=dataset_stats,
        seconds=time.perf_counter() - started,
        config=save_config(config, config_dir, "preprocess"),
    )
    place_log(config_dir)
    print(f"viscy preprocess: {len(result.fovs)} FOV(s) of {plate.root} in {result.seconds:.1f} s")
    for ch, st in dataset_stats.items():
        print(f"  {ch:<12} median {st['median']:.4g}  iqr {st['iqr']:.4g}  mean {st['mean']:.4g}  std {st['std']:.4g}")
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}")
    return result
