"""Synthetic HCS OME-Zarr plates: label-free phase plus nuclei and membrane fluorescence.

The plate is written with iohub (OME-NGFF 0.4, HCS layout; ``viscy.data.store_writer``) and looks like a small VisCy
training set::

    <output>/<row>/<col>/<fov>/0                 float32 (T, 3, Z, Y, X)  Phase3D, Nuclei, Membrane
    <output>/<row>/<col>/<fov>/labels/.zattrs    {"labels": ["nuclei", "cells"]}
    <output>/<row>/<col>/<fov>/labels/nuclei/0   int32   (T, 1, Z, Y, X)  nucleus instance ids
    <output>/<row>/<col>/<fov>/labels/cells/0    int32   (T, 1, Z, Y, X)  cell instance ids

The ``labels`` groups follow the NGFF 0.4 image-label specification (``multiscales`` with the
same axes and scale as the image, and ``image-label.source.image == "../../"``), so napari
shows them as label layers; iohub lists only arrays as a position's members and ignores them.
A nucleus has the id of the cell that contains it (0 is background) and every nucleus voxel
lies inside its cell; ids are stable over time.

Physics, per field of view: cells are a Voronoi tessellation of seeds clipped to irregular
discs (so ``confluence`` leaves background gaps), each with a dome-shaped thickness; nuclei are
randomly oriented ellipsoids inside them. The phase channel is the optical path length
(cytoplasm plus denser nuclei and a nucleolus), blurred by the optics, with a slow illumination
ramp and noise; in 3D the middle slice (``Z // 2``) is in focus and defocus blur grows away from it. The
fluorescence channels are per-cell-bright nuclear masks and cell borders, blurred by a PSF
(more in Z), on a camera background with Poisson and read noise. The random generator of each
position is seeded from ``(config.seed, position index)``, so equal configs give identical data.

The plate's root ``.zattrs['viscy_synth']`` records the generating config (seed, layout, physics): it is
the marker that lets ``overwrite`` replace a plate viscy synth wrote, and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from viscy.config import save_config
from viscy.data.config import SynthConfig
from viscy.data.replace import refuse_links, siblings, swap_in
from viscy.data.store_writer import Ngff04Writer
from viscy.errors import DataError

CHANNEL_NAMES = ("Phase3D", "Nuclei", "Membrane")
LABEL_NAMES = ("nuclei", "cells")
YX_SCALE_UM = 0.325
Z_SCALE_UM = 0.25
ATTR = "viscy_synth"

__all__ = [
    "CHANNEL_NAMES",
    "LABEL_NAMES",
    "position_names",
    "synthesize_position",
    "write_synthetic_plate",
    "run_synth",
]


def position_names(config: SynthConfig) -> list[tuple[str, str, str]]:
    """``(row, col, fov)`` of every position, in the order their seeds are indexed."""
    return [
        (row, col, str(fov))
        for row in config.rows
        for col in config.cols
        for fov in range(config.fovs_per_well)
    ]


def _rng(seed: int, index: int) -> np.random.Generator:
    # SeedSequence rejects negative integers; map them to their 64-bit two's complement.
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, index]))


@dataclass
class _Cells:
    """Per-cell parameters of one field of view (index 0 is the background)."""

    seeds: np.ndarray  # (n, 2) seed positions (y, x) in padded coordinates
    radius: np.ndarray  # (n,) clipping-disc radius
    height: np.ndarray  # (n,) peak thickness, relative units
    nuc_offset: np.ndarray  # (n, 2) nucleus centre relative to the seed
    nuc_axes: np.ndarray  # (n, 3) nucleus semi-axes (long, short, height fraction)
    nuc_angle: np.ndarray  # (n,) nucleus orientation
    nucleolus_offset: np.ndarray  # (n, 2) nucleolus centre in nucleus-normalised coordinates
    nuc_bright: np.ndarray  # (n,) nuclear stain brightness
    mem_bright: np.ndarray  # (n,) membrane stain brightness


def _draw_seeds(rng: np.random.Generator, shape: tuple[int, int], n: int, min_dist: float) -> np.ndarray:
    """Up to ``n`` points in ``shape`` at least ``min_dist`` apart (vectorised dart throwing)."""
    cand = rng.uniform(0, 1, size=(n * 8, 2)) * np.asarray(shape, dtype=float)
    keep = np.zeros(len(cand), dtype=bool)
    chosen: list[np.ndarray] = []
    for i, p in enumerate(cand):
        if len(chosen) >= n:
            break
        if chosen and np.min(np.sum((np.asarray(chosen) - p) ** 2, axis=1)) < min_dist**2:
            continue
        chosen.append(p)
        keep[i] = True
    return cand[keep]


def _draw_cells(rng: np.random.Generator, config: SynthConfig, padded: tuple[int, int]) -> _Cells:
    d = config.cell_diameter
    area = padded[0] * padded[1]
    n_target = max(1, int(round(config.confluence * area / (np.pi * (d / 2) ** 2))))
    seeds = _draw_seeds(rng, padded, n_target, min_dist=0.55 * d)
    n = len(seeds)
    long_ax = rng.uniform(0.2, 0.27, n) * d
    short_ax = long_ax * rng.uniform(0.65, 0.95, n)
    return _Cells(
        seeds=seeds,
        radius=rng.uniform(0.5, 0.62, n) * d,
        height=rng.uniform(0.7, 1.3, n),
        nuc_offset=rng.normal(0, 0.05 * d, (n, 2)),
        nuc_axes=np.stack([long_ax, short_ax, rng.uniform(0.3, 0.45, n)], axis=1),
        nuc_angle=rng.uniform(0, np.pi, n),
        nucleolus_offset=rng.uniform(-0.35, 0.35, (n, 2)),
        nuc_bright=rng.lognormal(0.0, 0.3, n),
        mem_bright=rng.lognormal(0.0, 0.25, n),
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma``."""
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def _illumination(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random second-order polynomial over the field, peak-to-peak about 1."""
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    c = rng.normal(0, 1, 5)
    ramp = c[0] * x + c[1] * y + 0.5 * (c[2] * x * x + c[3] * x * y + c[4] * y * y)
    return ramp / (np.ptp(ramp) + 1e-12)


def _frame(
    cells: _Cells,
    seeds: np.ndarray,
    shape_noise: np.ndarray,
    config: SynthConfig,
) -> dict[str, np.ndarray]:
    """Geometry of one time point on the padded grid: 2D cell ids, thickness, nuclear shapes."""
    h, w = shape_noise.shape
    d = config.cell_diameter
    # Nearest-seed (Voronoi) assignment via the EDT of a seed image.
    iy = np.clip(np.round(seeds[:, 0]).astype(int), 0, h - 1)
    ix = np.clip(np.round(seeds[:, 1]).astype(int), 0, w - 1)
    seed_img = np.zeros((h, w), dtype=np.int32)
    seed_img[iy, ix] = np.arange(1, len(seeds) + 1)
    dist, (ny, nx) = ndi.distance_transform_edt(seed_img == 0, return_indices=True)
    owner = seed_img[ny, nx]  # 1-based cell id of the nearest seed
    k = owner - 1
    rho = (dist + 0.12 * d * shape_noise) / cells.radius[k]
    cell2d = np.where(rho < 1.0, owner, 0).astype(np.int32)

    # Dome thickness that also falls off towards borders shared with neighbours.
    interior = (cell2d > 0) & ~find_boundaries(cell2d, mode="inner")
    to_edge = ndi.distance_transform_edt(interior)
    dome = np.sqrt(np.clip(1.0 - rho**2, 0.0, 1.0)) * np.tanh(to_edge / (0.12 * d))
    thickness = np.where(cell2d > 0, cells.height[k] * dome, 0.0)

    # Nucleus-normalised coordinates (u, v) for every pixel, relative to its own cell's nucleus.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy = yy - (seeds[k, 0] + cells.nuc_offset[k, 0])
    dx = xx - (seeds[k, 1] + cells.nuc_offset[k, 1])
    cos, sin = np.cos(cells.nuc_angle[k]), np.sin(cells.nuc_angle[k])
    u = (cos * dy + sin * dx) / cells.nuc_axes[k, 0]
    v = (-sin * dy + cos * dx) / cells.nuc_axes[k, 1]
    r2 = u * u + v * v
    r2 = np.where(cell2d > 0, r2, np.inf)
    nucleolus2 = (u - cells.nucleolus_offset[k, 0]) ** 2 + (v - cells.nucleolus_offset[k, 1]) ** 2
    return {
        "cell2d": cell2d,
        "k": k,
        "thickness": thickness,
        "r2": r2,
        "nucleolus2": nucleolus2,
    }


def _phase_and_masks(
    geo: dict[str, np.ndarray],
    cells: _Cells,
    nz: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Optical path length (Y, X) and 3D cell/nucleus ids, 3D nucleus density (Z, Y, X)."""
    cell2d, k, thickness, r2 = geo["cell2d"], geo["k"], geo["thickness"], geo["r2"]
    in_nuc2d = r2 < 1.0
    # Nucleus half-height profile (fraction of the local cell height) of the ellipsoid.
    nuc_half = np.where(in_nuc2d, np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)), 0.0) * cells.nuc_axes[k, 2]
    nucleolus = np.exp(-geo["nucleolus2"] / (2 * 0.18**2)) * in_nuc2d
    if nz == 1:
        cell3d = cell2d[None]
        nuc3d = np.where(in_nuc2d, cell2d, 0).astype(np.int32)[None]
        nuc_density = (in_nuc2d * (0.6 + 0.4 * nuc_half / (cells.nuc_axes[k, 2] + 1e-12)))[None]
    else:
        # Cells sit on the coverslip below the focal (middle) slice and reach up to ~0.8 Z.
        zc = nz // 2
        bottom = zc - 0.3 * nz
        top_h = 0.75 * nz * thickness / max(float(cells.height.max()), 1e-6)
        z = np.arange(nz, dtype=np.float64)[:, None, None]
        height = z - bottom
        in_cell = (height >= 0) & (height < top_h[None]) & (cell2d[None] > 0)
        cell3d = np.where(in_cell, cell2d[None], 0).astype(np.int32)
        # Nuclear ellipsoid centred at 42 % of the cell's peak height.
        peak = 0.75 * nz * cells.height[k] / max(float(cells.height.max()), 1e-6)
        nuc_c = 0.42 * peak
        half = nuc_half * peak
        w = np.abs(height - nuc_c[None]) / np.maximum(half[None], 1e-6)
        in_nuc = in_cell & (w < 1.0) & in_nuc2d[None]
        nuc3d = np.where(in_nuc, cell2d[None], 0).astype(np.int32)
        nuc_density = in_nuc * (0.6 + 0.4 * np.sqrt(np.clip(1 - w * w, 0, 1)))
    # Refractive-index excess x thickness; nuclei are denser, nucleoli denser still.
    opl = 0.6 * thickness + thickness * (0.8 * nuc_half + 0.5 * nucleolus * nuc_half)
    return opl, cell3d, nuc3d, nuc_density


def _render_time_point(
    rng: np.random.Generator,
    cells: _Cells,
    seeds: np.ndarray,
    shape_noise: np.ndarray,
    illum: np.ndarray,
    texture: np.ndarray,
    config: SynthConfig,
    pad: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (3, Z, Y, X) float32 and label volumes (Z, Y, X) int32 for one time point."""
    nz = config.z
    ny, nx = config.yx
    geo = _frame(cells, seeds, shape_noise, config)
    opl, cell3d, nuc3d, nuc_density = _phase_and_masks(geo, cells, nz)
    k = geo["k"]
    crop = (slice(None), slice(pad, pad + ny), slice(pad, pad + nx))

    # Phase: optics blur, defocus growing away from the focal slice, plus weak optical sectioning.
    phase_scale = 0.25
    clean = np.empty((nz, *opl.shape))
    zc = nz // 2
    for zi in range(nz):
        sigma = 0.8 + 0.6 * abs(zi - zc)
        clean[zi] = ndi.gaussian_filter(opl, sigma) * phase_scale * np.exp(-0.03 * abs(zi - zc))
    if nz > 1:
        ri = 0.3 * (cell3d > 0) + 0.4 * nuc_density
        clean += 0.15 * phase_scale * ndi.gaussian_filter(ri, (1.5, 0.8, 0.8))
    clean = clean[crop]
    lo, hi = np.percentile(clean, [1, 99])
    span = max(hi - lo, 1e-6)
    phase = (
        clean
        + 0.15 * span * illum[None, pad : pad + ny, pad : pad + nx]
        + config.noise * span * rng.standard_normal(clean.shape)
    )

    # Fluorescence: stain density -> PSF blur -> photons -> camera.
    sigma_psf = (2.0, 1.2, 1.2) if nz > 1 else (0.0, 1.2, 1.2)
    nuc_stain = nuc_density * (cells.nuc_bright[k] * (1.0 + 0.25 * texture))[None]
    borders = find_boundaries(cell3d, mode="inner") & (cell3d > 0)
    mem_stain = ndi.grey_dilation(borders * cells.mem_bright[k][None], size=(3 if nz > 1 else 1, 3, 3))
    channels = [phase]
    for stain, peak, background in ((nuc_stain, 500.0, 100.0), (mem_stain, 300.0, 110.0)):
        photons = background + peak * ndi.gaussian_filter(stain, sigma_psf)[crop]
        photons *= 1.0 + 0.1 * illum[None, pad : pad + ny, pad : pad + nx]
        counts = rng.poisson(np.maximum(photons, 0.0)) + rng.normal(0.0, 2.0, photons.shape)
        channels.append(counts)
    image = np.stack(channels).astype(np.float32)
    return image, nuc3d[crop].astype(np.int32), cell3d[crop].astype(np.int32)


def synthesize_position(config: SynthConfig, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Data of one field of view, deterministic in ``(config, index)``.

    Returns
    -------
    image : np.ndarray
        float32 ``(T, 3, Z, Y, X)`` with channels :data:`CHANNEL_NAMES`.
    nuclei, cells : np.ndarray
        int32 ``(T, 1, Z, Y, X)`` instance ids; a nucleus has its cell's id.
    """
    rng = _rng(config.seed, index)
    ny, nx = config.yx
    pad = int(np.ceil(config.cell_diameter))
    padded = (ny + 2 * pad, nx + 2 * pad)
    cells = _draw_cells(rng, config, padded)
    shape_noise = _smooth_noise(rng, padded, 0.15 * config.cell_diameter)
    texture = _smooth_noise(rng, padded, 1.5)
    illum = _illumination(rng, padded)
    # Slow drift: a common stage drift plus a random walk per cell (pixels per frame).
    stage = rng.normal(0, 0.7, (config.t, 2)).cumsum(axis=0)
    walk = rng.normal(0, 0.5, (config.t, len(cells.seeds), 2)).cumsum(axis=0)
    stage[0] = 0.0
    walk[0] = 0.0
    shape5 = (config.t, 1, config.z, ny, nx)
    image = np.empty((config.t, len(CHANNEL_NAMES), config.z, ny, nx), dtype=np.float32)
    nuclei = np.empty(shape5, dtype=np.int32)
    cell_ids = np.empty(shape5, dtype=np.int32)
    for t in range(config.t):
        seeds = cells.seeds + stage[t] + walk[t]
        image[t], nuclei[t, 0], cell_ids[t, 0] = _render_time_point(
            rng, cells, seeds, shape_noise, illum, texture, config, pad
        )
    return image, nuclei, cell_ids


def _scale(config: SynthConfig) -> list[float]:
    return [1.0, 1.0, Z_SCALE_UM if config.z > 1 else 1.0, YX_SCALE_UM, YX_SCALE_UM]


def _write_store(config: SynthConfig, path: Path, progress: bool = False) -> None:
    names = position_names(config)
    ny, nx = config.yx
    cy, cx = (min(config.chunk_yx, ny), min(config.chunk_yx, nx)) if config.chunk_yx else (ny, nx)
    chunks = (1, 1, 1, cy, cx)
    scale = _scale(config)
    iterator = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc="synth", unit="fov")
    with Ngff04Writer(path, layout="hcs", mode="w-", channel_names=list(CHANNEL_NAMES)) as plate:
        plate.set_root_attr(ATTR, config.model_dump(mode="json", exclude={"output", "overwrite"}))
        for index, (row, col, fov) in enumerate(iterator):
            image, nuclei, cells = synthesize_position(config, index)
            position = f"{row}/{col}/{fov}"
            plate.add_image(position, "0", scale, chunks, data=image)
            plate.add_labels(position, {"nuclei": nuclei, "cells": cells}, scale, chunks)


def is_synth_store(path: Path) -> bool:
    """Whether ``path`` is a plate viscy synth wrote (its root ``.zattrs`` carries the ``viscy_synth`` marker)."""
    try:
        return ATTR in json.loads((Path(path) / ".zattrs").read_text())
    except (OSError, ValueError):
        return False


def _refuse(path: Path, what: str) -> DataError:
    return DataError(
        f"{path} exists and is not {what} (its .zattrs has no '{ATTR}' marker); viscy never replaces or deletes "
        "it, even with --overwrite true. Choose another output, or move it away yourself"
    )


def write_synthetic_plate(config: SynthConfig, progress: bool = False) -> Path:
    """Write the synthetic plate described by ``config``; return its path.

    The store is built at ``<output>.viscy-partial`` and swapped into place only when complete (the old plate
    passing through ``<output>.viscy-old``), so an interrupted run never leaves a plate that looks finished
    and never loses the previous one. ``overwrite`` replaces only a plate viscy synth wrote.

    Raises
    ------
    DataError
        If ``config.output`` exists and ``config.overwrite`` is false, or it (or a sibling in the way) is
        not something viscy synth wrote or is a symbolic link; nothing is touched then.
    """
    out = Path(config.output)
    refuse_links(out)
    partial, old = siblings(out)
    # a swap cut short leaves the previous plate at <output>.viscy-old: it still counts as the output
    current = out if out.exists() else old if old.exists() else None
    if current is not None:
        if not config.overwrite:
            raise DataError(
                f"output {current} already exists; pass --overwrite true to replace it or choose another output"
            )
        if not is_synth_store(current):
            raise _refuse(current, "a plate viscy synth wrote")
    for leftover, what in ((old, "an old plate viscy synth set aside"), (partial, "a plate viscy synth started")):
        if leftover.exists() and leftover != current and not is_synth_store(leftover):
            raise _refuse(leftover, what)
    if current == old:
        os.replace(old, out)  # put the previous plate back before anything else
    out.parent.mkdir(parents=True, exist_ok=True)
    if partial.exists():
        shutil.rmtree(partial)  # a killed run's, checked above
    try:
        _write_store(config, partial, progress=progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    swap_in(partial, out, is_synth_store)
    return out


def run_synth(config: SynthConfig) -> Path:
    """CLI entry: write the plate with a progress bar, save the resolved config, print a summary."""
    start = time.perf_counter()
    out = write_synthetic_plate(config, progress=True)
    save_config(config, out, "synth")
    n = len(position_names(config))
    shape = (config.t, len(CHANNEL_NAMES), config.z, *config.yx)
    print(f"wrote {out}: {n} positions of shape {shape} in {time.perf_counter() - start:.1f} s")
    return out
