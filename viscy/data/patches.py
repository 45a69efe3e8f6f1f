"""Patch primitives shared by training, validation, prediction and serving.

This module holds the project's only implementation of normalisation and augmentation:

- ``normalization_params`` / ``normalize`` / ``denormalize``: ``(x - subtrahend) / (divisor + eps)`` with
  statistics read from VisCy's zattrs layout (FOV- or dataset-level, median/iqr or mean/std);
- ``build_augmentation``: MONAI dictionary transforms (affine, flips, rot90, contrast, intensity scale,
  Gaussian noise and smoothing) applied jointly to ``source`` and ``target`` (spatial) or to the source
  only (intensity), seeded for reproducibility;
- ``PatchSampler``: reads one region per call and cuts many patches from it (VisCy's patches-per-stack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from viscy.config import AugmentationConfig, DataConfig, NormalizationConfig
from viscy.data.plate import FG_MASK_KEY, Plate
from viscy.errors import DataError

EPS = 1e-8


@dataclass(frozen=True)
class PatchSpec:
    """What a sample is: source/target channels, Z window and YX patch size."""

    source_channels: tuple[str, ...]
    target_channels: tuple[str, ...]
    z_window: int = 1
    yx_patch: tuple[int, int] = (256, 256)
    target_2d: bool = True

    @classmethod
    def from_config(cls, data: DataConfig) -> PatchSpec:
        """Build from the ``data`` config section."""
        return cls(
            tuple(data.source_channel),
            tuple(data.target_channel),
            data.z_window_size,
            tuple(data.yx_patch_size),
            data.target_2d,
        )

    @property
    def target_depth(self) -> int:
        """Z depth of the target (1 for 2D/2.5D models, the window otherwise)."""
        return 1 if self.target_2d else self.z_window


# ------------------------------------------------------------------------------------ normalisation
def normalization_for_channel(channel: str, norms: list[NormalizationConfig]) -> NormalizationConfig | None:
    """The group setting that applies to ``channel``: one listing it, else one for all channels, else None."""
    for n in norms:
        if n.channels is not None and channel in n.channels:
            return n
    for n in norms:
        if n.channels is None:
            return n
    return None


def explicit_normalization(channels: list[str], norms: list[NormalizationConfig]) -> list[NormalizationConfig]:
    """``norms`` with every group naming its channels: each of ``channels`` in the group that applies to it
    (a catch-all group gets the channels no other group lists; channels with no group are left raw)."""
    out: list[NormalizationConfig] = []
    for group in norms:
        members = [ch for ch in channels if normalization_for_channel(ch, norms) is group]
        if members:
            out.append(group.model_copy(update={"channels": members}))
    return out


def normalization_params(
    norm_meta: dict[str, Any], channels: list[str] | tuple[str, ...], norms: list[NormalizationConfig]
) -> np.ndarray:
    """``(C, 2)`` array of (subtrahend, divisor) per channel from a FOV's ``normalization`` zattrs.

    Channels no normalisation entry applies to get (0, 1).

    Raises
    ------
    DataError
        If the needed statistics are missing (with the command that computes them).
    """
    params = np.zeros((len(channels), 2), dtype=np.float32)
    params[:, 1] = 1.0
    for i, ch in enumerate(channels):
        spec = normalization_for_channel(ch, norms)
        if spec is None:
            continue
        try:
            stats = norm_meta[ch][spec.level]
            params[i] = (stats[spec.subtrahend], stats[spec.divisor])
        except KeyError:
            raise DataError(
                f"no {spec.level} '{spec.subtrahend}'/'{spec.divisor}' statistics for channel {ch!r}; "
                "run `viscy preprocess` on this plate (with that channel) first"
            ) from None
    return params


def _broadcast(params: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (params.shape[0],) + (1,) * (ndim - 1)
    return params[:, 0].reshape(shape), params[:, 1].reshape(shape)


def normalize(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Normalise a channel-first array: ``(x - subtrahend) / (divisor + eps)``."""
    sub, div = _broadcast(params, x.ndim)
    return ((x - sub) / (div + EPS)).astype(np.float32, copy=False)


def denormalize(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Invert ``normalize`` for a channel-first array."""
    sub, div = _broadcast(params, x.ndim)
    return (x * (div + EPS) + sub).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------- augmentation
class YXAugmentation:
    """Seeded MONAI dictionary transforms over ``{"source": (C,Z,Y,X), "target": (C',Z',Y,X)}`` samples.

    Spatial transforms act in the YX plane only and identically on source and target: Z is folded into
    channels so that MONAI runs cheap 2D resampling and never moves data across slices. Flips and 90-degree
    rotations run before the affine, whose output window is ``output_yx`` (so non-square patches keep
    their shape). Intensity transforms act on the source only.
    """

    def __init__(self, config: AugmentationConfig, output_yx: tuple[int, int] | None = None) -> None:
        from monai import transforms as mt

        both = ["source", "target"]
        lo, hi = config.scale_range
        self.compose = mt.Compose(
            [
                mt.RandFlipd(both, prob=config.flip_prob, spatial_axis=0),
                mt.RandFlipd(both, prob=config.flip_prob, spatial_axis=1),
                mt.RandRotate90d(both, prob=config.rot90_prob, spatial_axes=(0, 1)),
                mt.RandAffined(
                    both,
                    spatial_size=output_yx,
                    cache_grid=output_yx is not None,
                    prob=config.affine_prob,
                    rotate_range=config.rotate_range,
                    scale_range=((lo - 1.0, hi - 1.0), (lo - 1.0, hi - 1.0)),
                    shear_range=(config.shear_range, config.shear_range),
                    mode="bilinear",
                    padding_mode="reflection",
                ),
                mt.RandAdjustContrastd(["source"], prob=config.contrast_prob, gamma=config.contrast_gamma),
                mt.RandScaleIntensityd(
                    ["source"], prob=config.intensity_scale_prob, factors=config.intensity_scale_factors
                ),
                mt.RandGaussianNoised(["source"], prob=config.noise_prob, std=config.noise_std),
                mt.RandGaussianSmoothd(
                    ["source"], prob=config.smooth_prob, sigma_x=config.smooth_sigma, sigma_y=config.smooth_sigma
                ),
            ]
        )

    def set_random_state(self, seed: int) -> YXAugmentation:
        """Seed every random transform."""
        self.compose.set_random_state(seed=seed)
        return self

    def __call__(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        src, tgt = sample["source"], sample["target"]
        if src.shape[-2:] != tgt.shape[-2:]:
            raise ValueError(f"source {src.shape} and target {tgt.shape} must share their YX shape")
        folded = {"source": src.reshape(-1, *src.shape[-2:]), "target": tgt.reshape(-1, *tgt.shape[-2:])}
        out = self.compose(folded)
        s, t = np.asarray(out["source"]), np.asarray(out["target"])
        return {
            "source": s.reshape(*src.shape[:-2], *s.shape[-2:]),
            "target": t.reshape(*tgt.shape[:-2], *t.shape[-2:]),
        }


def build_augmentation(
    config: AugmentationConfig, seed: int | None = None, output_yx: tuple[int, int] | None = None
) -> YXAugmentation:
    """The training augmentation (see :class:`YXAugmentation`), seeded when ``seed`` is given.

    ``output_yx`` makes the affine sample only the central output window (cheaper than resampling
    the whole context crop and cropping afterwards).
    """
    aug = YXAugmentation(config, output_yx)
    if seed is not None:
        aug.set_random_state(seed)
    return aug


def _crop_context(spec: PatchSpec, aug: AugmentationConfig | None) -> tuple[int, int]:
    """Crop size read around a patch so that rotations and zooms do not pull in padding."""
    if aug is None or aug.affine_prob == 0:
        return spec.yx_patch
    factor = math.sqrt(2) / min(1.0, aug.scale_range[0])
    return tuple(int(math.ceil(p * factor)) for p in spec.yx_patch)


def _center_crop(x: np.ndarray, yx: tuple[int, int]) -> np.ndarray:
    y0 = (x.shape[-2] - yx[0]) // 2
    x0 = (x.shape[-1] - yx[1]) // 2
    return x[..., y0 : y0 + yx[0], x0 : x0 + yx[1]]


# ----------------------------------------------------------------------------------------- sampling
class PatchSampler:
    """Cut normalised (and optionally augmented) patches from FOVs of one plate.

    Each ``sample`` call picks one time point and Z window, reads that region once for every source and
    target channel, and cuts ``n`` patches from it.

    Parameters
    ----------
    plate_path
        Plate (or FOV) path; the plate is opened lazily where the sampler runs.
    spec
        Channels, Z window and patch size.
    normalization
        Normalisation per channel group.
    augmentation
        Training augmentations, or None for plain (validation) crops.
    fg_min_fraction, fg_weighted
        Foreground-mask-driven rejection and weighting (needs ``viscy preprocess`` with ``fg_mask``).
    """

    def __init__(
        self,
        plate_path: str | Path,
        spec: PatchSpec,
        normalization: list[NormalizationConfig],
        augmentation: AugmentationConfig | None = None,
        fg_min_fraction: float = 0.0,
        fg_weighted: bool = False,
    ) -> None:
        self.plate_path = str(plate_path)
        self.spec = spec
        self.normalization = list(normalization)
        self.augmentation = augmentation
        self.fg_min_fraction = fg_min_fraction
        self.fg_weighted = fg_weighted
        self._plate: Plate | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_plate"] = None
        return state

    @property
    def plate(self) -> Plate:
        """The plate, opened on first use in this process."""
        if self._plate is None:
            self._plate = Plate(self.plate_path)
        return self._plate

    def validate(self, names: list[str]) -> None:
        """Check channels, window and patch size against every FOV before any work starts."""
        plate = self.plate
        plate.channel_indices(list(self.spec.source_channels) + list(self.spec.target_channels))
        plate.check_consistent(names)
        for n in names:
            plate.check_window(n, self.spec.z_window, self.spec.yx_patch)
        if (self.fg_min_fraction > 0 or self.fg_weighted) and not plate.has_array(names[0], FG_MASK_KEY):
            raise DataError(
                f"fg_mask_min_fraction/fg_weighted_crops need a foreground mask in {plate.root}; run "
                "`viscy preprocess --fg_mask.channel <channel>` first or disable them"
            )

    def _origins(self, fg: np.ndarray | None, shape_yx: tuple[int, int], n: int, rng) -> list[tuple[int, int]]:
        py, px = self.spec.yx_patch
        ymax, xmax = shape_yx[0] - py, shape_yx[1] - px
        if fg is None:
            return [(int(rng.integers(0, ymax + 1)), int(rng.integers(0, xmax + 1))) for _ in range(n)]
        out: list[tuple[int, int]] = []
        fg_idx = np.flatnonzero(fg) if self.fg_weighted else None
        for _ in range(n):
            for _attempt in range(20):
                if fg_idx is not None and fg_idx.size:
                    cy, cx = np.unravel_index(int(rng.choice(fg_idx)), fg.shape)
                    y0 = int(np.clip(cy - py // 2, 0, ymax))
                    x0 = int(np.clip(cx - px // 2, 0, xmax))
                else:
                    y0, x0 = int(rng.integers(0, ymax + 1)), int(rng.integers(0, xmax + 1))
                if fg[y0 : y0 + py, x0 : x0 + px].mean() >= self.fg_min_fraction:
                    break
            out.append((y0, x0))
        return out

    def sample(self, name: str, n: int, seed: int, augment: bool = True) -> dict[str, np.ndarray]:
        """``n`` patches from one random (t, z window) of FOV ``name``.

        Returns
        -------
        dict
            ``source`` (n, Cs, Z, Y, X) and ``target`` (n, Ct, Z', Y, X) float32, normalised.
        """
        rng = np.random.default_rng(seed)
        plate, spec = self.plate, self.spec
        t_n, _, z_n, y_n, x_n = plate.info(name).shape
        t = int(rng.integers(0, t_n))
        z0 = int(rng.integers(0, z_n - spec.z_window + 1))
        channels = list(spec.source_channels) + list(spec.target_channels)
        slab = plate.read(name, t, plate.channel_indices(channels), slice(z0, z0 + spec.z_window))
        params = normalization_params(plate.normalization(name), channels, self.normalization)
        slab = normalize(slab.astype(np.float32), params)
        fg = None
        if self.fg_min_fraction > 0 or self.fg_weighted:
            zc = z0 + spec.z_window // 2
            fg = plate.read(name, t, [0], slice(zc, zc + 1), array=FG_MASK_KEY)[0, 0] > 0
        aug = self.augmentation if augment else None
        transform = (
            build_augmentation(aug, seed=int(rng.integers(2**31)), output_yx=spec.yx_patch) if aug is not None else None
        )
        ctx = _crop_context(spec, aug)
        ns = len(spec.source_channels)
        zc = spec.z_window // 2
        sources, targets = [], []
        for y0, x0 in self._origins(fg, (y_n, x_n), n, rng):
            # Grow the crop around the patch for affine context, clipped to the image.
            cy0 = max(0, min(y0 - (ctx[0] - spec.yx_patch[0]) // 2, y_n - ctx[0]))
            cx0 = max(0, min(x0 - (ctx[1] - spec.yx_patch[1]) // 2, x_n - ctx[1]))
            crop = slab[:, :, cy0 : cy0 + ctx[0], cx0 : cx0 + ctx[1]]
            # Spatial transforms share one grid, so the target keeps the full window until after them.
            src, tgt = crop[:ns], crop[ns:]
            if transform is not None:
                out = transform({"source": src, "target": tgt})
                src, tgt = out["source"], out["target"]
            if spec.target_2d:
                tgt = tgt[:, zc : zc + 1]
            if src.shape[-2:] != spec.yx_patch:
                src, tgt = _center_crop(src, spec.yx_patch), _center_crop(tgt, spec.yx_patch)
            sources.append(np.ascontiguousarray(src, dtype=np.float32))
            targets.append(np.ascontiguousarray(tgt, dtype=np.float32))
        return {"source": np.stack(sources), "target": np.stack(targets)}
