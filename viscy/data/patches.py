"""Patch primitives shared by training, validation, prediction and serving.

This module holds the project's only implementation of normalisation and augmentation:

- ``normalization_params`` / ``normalize`` / ``denormalize``: ``(x - subtrahend) / (divisor + eps)`` with
  statistics read from VisCy's zattrs layout (FOV- or dataset-level, median/iqr or mean/std);
- ``build_augmentation``: seeded, batched YX augmentation of all the patches of one read (flips, rot90 and
  affine composed into one OpenCV ``warpAffine`` per patch and plane from the full-resolution region,
  jointly for ``source`` and ``target``; contrast, intensity scale, Gaussian noise and smoothing on the
  source only);
- ``PatchSampler``: reads one region per call and cuts many patches from it (VisCy's patches-per-stack).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from viscy.data.config import AugmentationConfig, DataConfig, NormalizationConfig
from viscy.data.plate import FG_MASK_KEY, Plate
from viscy.errors import DataError

EPS = 1e-8


@dataclass(frozen=True)
class PatchSpec:
    """What a sample is: source/target channels, Z window and YX patch size."""

    source_channels: tuple[str, ...]
    target_channels: tuple[str, ...]
    z_window_size: int = 1
    yx_patch: tuple[int, int] = (256, 256)
    target_2d: bool = True

    @classmethod
    def from_config(cls, data: DataConfig) -> PatchSpec:
        """Build from the ``data`` config section."""
        return cls(
            tuple(data.source_channels),
            tuple(data.target_channels),
            data.z_window_size,
            tuple(data.yx_patch_size),
            data.target_2d,
        )

    @property
    def target_depth(self) -> int:
        """Z depth of the target (1 for 2D/2.5D models, the window otherwise)."""
        return 1 if self.target_2d else self.z_window_size


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


def normalize_inplace(x: np.ndarray, params: np.ndarray, channel_axis: int = 0) -> np.ndarray:
    """``normalize`` of a float32 array in place (no temporaries); ``channel_axis`` indexes ``params``."""
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    x -= params[:, 0].reshape(shape)
    x /= (params[:, 1] + EPS).reshape(shape)
    return x


def denormalize(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Invert ``normalize`` for a channel-first array."""
    sub, div = _broadcast(params, x.ndim)
    return (x * (div + EPS) + sub).astype(np.float32, copy=False)


class YXAugmentation:
    """Seeded, batched training augmentation of all the patches cut from one region read.

    Spatial transforms act in the YX plane only and identically on source and target: random flips along Y
    and X, a random multiple of 90 degrees, and a random affine (rotation, per-axis zoom, shear) compose into
    one matrix per patch. Every patch of a read is then resampled straight from the full-resolution region
    (bilinear, reflection at the image border, as ``torch.nn.functional.grid_sample`` defines them), so only
    output pixels are computed and nothing is cropped first; a patch only flipped or turned is copied.
    Intensity transforms act on the source only and follow MONAI's definitions (``AdjustContrast``,
    ``RandScaleIntensity``, ``RandGaussianNoise`` with a sampled std); the smoothing is MONAI's
    ``GaussianFilter`` (its kernels, applied by OpenCV).
    """

    def __init__(self, config: AugmentationConfig, output_yx: tuple[int, int]) -> None:
        self.config = config
        self.output_yx = (int(output_yx[0]), int(output_yx[1]))
        self.set_random_state(None)

    def set_random_state(self, seed: int | None) -> YXAugmentation:
        """Seed every random draw (``None``: fresh entropy)."""
        self._rng = np.random.default_rng(seed)
        self._noise_seed = int(self._rng.integers(2**63))
        self._noise_gen = None  # a torch.Generator, made when noise is first drawn: torch is imported lazily
        return self

    def matrices(self, n: int) -> np.ndarray:
        """``(n, 2, 2)`` random maps from output-patch offsets to input offsets, in (x, y) order."""
        c, rng = self.config, self._rng
        mats = np.tile(np.eye(2), (n, 1, 1))
        for k in range(n):
            m = np.eye(2)
            if rng.random() < c.flip_prob:
                m = m @ np.diag([1.0, -1.0])  # flip along Y
            if rng.random() < c.flip_prob:
                m = m @ np.diag([-1.0, 1.0])  # flip along X
            if rng.random() < c.rot90_prob:
                m = m @ np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), int(rng.integers(1, 4)))
            if rng.random() < c.affine_prob:
                angle = rng.uniform(-c.rotate_range, c.rotate_range)
                cos, sin = math.cos(angle), math.sin(angle)
                shear = rng.uniform(-c.shear_range, c.shear_range, size=2)
                zoom = rng.uniform(*c.scale_range, size=2)
                m = m @ np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear[0]], [shear[1], 1.0]])
                m = m @ np.diag(zoom)
            mats[k] = m
        return mats

    def affines(self, origins: list[tuple[int, int]], image_yx: tuple[int, int]) -> np.ndarray:
        """``(n, 2, 3)`` maps from output pixel ``(x, y)`` to input pixel position, one per patch.

        Each patch turns about its own centre, moved inwards (where the image allows) so that its
        transformed window stays inside the image rather than in the reflected border.
        """
        (py, px), (h, w) = self.output_yx, image_yx
        mats = self.matrices(len(origins))
        half = 0.5 * np.abs(mats) @ np.array([px, py], dtype=np.float64)  # (n, 2) half extents, x and y
        maps = np.empty((len(origins), 2, 3))
        for k, (y0, x0) in enumerate(origins):
            centre = np.empty(2)
            for axis, (start, size, full) in enumerate(((x0, px, w), (y0, py, h))):
                lo, hi = half[k, axis], full - half[k, axis]
                mid = start + size / 2
                centre[axis] = full / 2 if lo > hi else min(max(mid, lo), hi)
            # Pixel centres sit at integers; the patch's corner pixel is half a pixel off its corner.
            maps[k, :, :2] = mats[k]
            maps[k, :, 2] = mats[k] @ np.array([0.5 - px / 2, 0.5 - py / 2]) + centre - 0.5
        return maps

    def spatial(
        self, source: np.ndarray, target: np.ndarray, origins: list[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Resample ``(C, Z, Y, X)`` float32 source and target regions into ``(n, C, Z, Py, Px)`` patches.

        Bilinear with OpenCV's ``warpAffine``, one call per patch and plane, reflecting at the image border
        (``BORDER_REFLECT`` repeats the edge pixel, as ``grid_sample``'s reflection with ``align_corners=False``
        does). A patch that is only flipped or turned by 90 degrees lands on whole pixels and is copied.
        """
        if source.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"source {source.shape} and target {target.shape} must share their YX shape")
        maps = self.affines(origins, source.shape[-2:])
        n, (py, px) = len(origins), self.output_yx
        windows = [_pixel_window(m, (py, px), source.shape[-2:]) for m in maps]
        if any(w is None for w in windows):
            import cv2

            # OpenCV gets the threads a Ray task's CPUs allow, not one per core.
            cv2.setNumThreads(cpu_threads())
            options = {"flags": cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, "borderMode": cv2.BORDER_REFLECT}
        out = []
        for region in (source, target):
            planes = region.reshape(-1, *region.shape[-2:])
            sampled = np.empty((n, len(planes), py, px), dtype=np.float32)
            for k, window in enumerate(windows):
                if window is not None:
                    sampled[k] = window(planes)
                    continue
                for p, plane in enumerate(planes):
                    cv2.warpAffine(plane, maps[k], (px, py), dst=sampled[k, p], **options)
            out.append(sampled.reshape(n, *region.shape[:2], py, px))
        return out[0], out[1]

    def intensity(self, source: np.ndarray) -> np.ndarray:
        """Contrast, intensity scale, noise and smoothing of ``(n, C, ...YX)`` source patches, in place."""
        c, rng = self.config, self._rng
        n = source.shape[0]
        # Draws for every patch first, so that each patch's parameters do not depend on the others'.
        gammas = np.where(rng.random(n) < c.contrast_prob, rng.uniform(*c.contrast_gamma, size=n), np.nan)
        factors = np.where(
            rng.random(n) < c.intensity_scale_prob,
            1.0 + rng.uniform(-c.intensity_scale_factors, c.intensity_scale_factors, size=n),
            np.nan,
        )
        stds = np.where(rng.random(n) < c.noise_prob, rng.uniform(0.0, c.noise_std, size=n), np.nan)
        sigmas = np.where(rng.random(n)[:, None] < c.smooth_prob, rng.uniform(*c.smooth_sigma, size=(n, 2)), np.nan)
        if np.isnan(np.stack([gammas, factors, stds, sigmas[:, 0]])).all():
            return source  # nothing drawn: torch is not even imported (a read task may not need it)
        import torch

        x = torch.from_numpy(source)
        if self._noise_gen is None:
            self._noise_gen = torch.Generator().manual_seed(self._noise_seed)
        for k in range(n):
            patch = x[k]  # a view: every step below works in place
            if not np.isnan(gammas[k]):
                lo, hi = patch.min(), patch.max()
                span = hi - lo
                patch.sub_(lo).div_(span + 1e-7).pow_(float(gammas[k])).mul_(span).add_(lo)
            if not np.isnan(factors[k]):
                patch.mul_(float(factors[k]))
            if not np.isnan(stds[k]):
                patch.add_(torch.randn(patch.shape, generator=self._noise_gen), alpha=float(stds[k]))
            if not np.isnan(sigmas[k, 0]):
                _smooth(source[k], float(sigmas[k, 0]), float(sigmas[k, 1]))
        return source


def cpu_threads() -> int:
    """Threads a compute library may use in this process: torch's setting once torch is loaded, else
    ``OMP_NUM_THREADS`` (which Ray sets to a task's CPUs), else one per core."""
    if "torch" in sys.modules:
        return int(sys.modules["torch"].get_num_threads())
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def _pixel_window(
    affine: np.ndarray, output_yx: tuple[int, int], image_yx: tuple[int, int]
) -> Callable[[np.ndarray], np.ndarray] | None:
    """The exact copy an ``affine`` (output ``(x, y)`` -> input pixel) amounts to when it only flips, turns by 90
    degrees and shifts by whole pixels inside the image, as a function of ``(..., Y, X)`` planes; else ``None``."""
    if not np.allclose(affine, np.round(affine), rtol=0, atol=1e-9):
        return None
    (a, b, tx), (c, d, ty) = np.round(affine).astype(int)
    transposed = a == 0
    if transposed:  # the input's x follows the output's y, and its y the output's x
        if abs(b) != 1 or abs(c) != 1 or d != 0:
            return None
    elif abs(a) != 1 or abs(d) != 1 or b != 0 or c != 0:
        return None
    (py, px), (h, w) = output_yx, image_yx
    x_steps, y_steps = (py, px) if transposed else (px, py)  # along the input's x and y axes
    x_step, y_step = (b, c) if transposed else (a, d)
    x_end, y_end = tx + x_step * (x_steps - 1), ty + y_step * (y_steps - 1)
    if min(tx, x_end) < 0 or max(tx, x_end) >= w or min(ty, y_end) < 0 or max(ty, y_end) >= h:
        return None
    if transposed:
        rows, cols = slice(min(ty, y_end), max(ty, y_end) + 1), slice(min(tx, x_end), max(tx, x_end) + 1)

        def turned(planes: np.ndarray) -> np.ndarray:
            import cv2  # its transpose: 8x numpy's copy of a transposed view

            crop = planes[..., rows, cols]
            flat = crop.reshape(-1, *crop.shape[-2:])
            out = np.empty((len(flat), *crop.shape[:-3:-1]), dtype=planes.dtype)
            for plane, dst in zip(flat, out, strict=True):
                cv2.transpose(plane, dst=dst)
            out = out.reshape(*crop.shape[:-2], *out.shape[-2:])
            return out[..., :: -1 if x_step < 0 else 1, :: -1 if y_step < 0 else 1]

        return turned
    xs = slice(tx, None if x_end + x_step < 0 else x_end + x_step, x_step)
    ys = slice(ty, None if y_end + y_step < 0 else y_end + y_step, y_step)
    return lambda planes: planes[..., ys, xs]


def _smooth(patch: np.ndarray, sigma_y: float, sigma_x: float) -> None:
    """MONAI's ``GaussianFilter`` (erf kernels truncated at 4 sigma, zeros outside) on each YX plane, in place,
    through OpenCV's separable filter: 15 times faster than MONAI's convolution on one thread."""
    import cv2
    from monai.networks.layers.convutils import gaussian_1d  # here: importing MONAI costs seconds

    kernel_y, kernel_x = (gaussian_1d(s, truncated=4.0, approx="erf").numpy() for s in (sigma_y, sigma_x))
    for plane in patch.reshape(-1, *patch.shape[-2:]):
        cv2.sepFilter2D(plane, -1, kernel_x, kernel_y, dst=plane, borderType=cv2.BORDER_CONSTANT)


def build_augmentation(
    config: AugmentationConfig, output_yx: tuple[int, int], seed: int | None = None
) -> YXAugmentation:
    """The training augmentation for ``output_yx`` patches (see :class:`YXAugmentation`), seeded when given."""
    return YXAugmentation(config, output_yx).set_random_state(seed)


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
    labels
        Label images (e.g. ``nuclei``) cut with the target into ``labels`` (plain crops only: never augmented).
    """

    def __init__(
        self,
        plate_path: str | Path,
        spec: PatchSpec,
        normalization: list[NormalizationConfig],
        augmentation: AugmentationConfig | None = None,
        fg_min_fraction: float = 0.0,
        fg_weighted: bool = False,
        labels: tuple[str, ...] = (),
    ) -> None:
        if labels and augmentation is not None:
            raise ValueError("label images are cut for plain (validation) crops only, not augmented ones")
        self.plate_path = str(plate_path)
        self.labels = tuple(labels)
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
            plate.check_window(n, self.spec.z_window_size, self.spec.yx_patch)
        if (self.fg_min_fraction > 0 or self.fg_weighted) and not plate.has_array(names[0], FG_MASK_KEY):
            raise DataError(
                f"fg_mask_min_fraction/fg_weighted_crops need a foreground mask in {plate.root}; run "
                "`viscy preprocess --fg_mask.channel <channel>` first or disable them"
            )
        for label in self.labels:
            for n in names:
                available = plate.labels(n)
                if label not in available:
                    raise DataError(
                        f"position {n} of {plate.root} has no label image {label!r} (it has "
                        f"{', '.join(available) or 'none'}); name one of those or drop the ground truth"
                    )
                shape = plate.array(n, plate.label_key(n, label)).shape
                t, _, z, y, x = plate.info(n).shape
                if len(shape) != 5 or shape[1] != 1 or (shape[0], *shape[2:]) != (t, z, y, x):
                    raise DataError(
                        f"label image {label!r} of {n} has shape {tuple(shape)}; it must be (T, 1, Z, Y, X) = "
                        f"({t}, 1, {z}, {y}, {x}) like the image"
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

        Only what the patches need is read: the source window and, for 2D targets, the target's centre slice.
        Patches are cut (or, when augmenting, resampled) from the raw region and normalised afterwards, which
        equals normalising first because both the statistics and the interpolation are linear.

        Returns
        -------
        dict
            ``source`` (n, Cs, Z, Y, X) and ``target`` (n, Ct, Z', Y, X) float32, normalised; with label images,
            ``labels`` (n, L, Z', Y, X) int32 at the target's planes.
        """
        return self.start(name, n, seed, augment)()

    def sample_many(self, requests: Iterable[tuple[str, int, int, bool]]) -> Iterator[dict[str, Any]]:
        """``sample(*request)`` for each request, reading the next region while the current one is cut."""
        return prefetched(self.start(*request) for request in requests)

    def start(self, name: str, n: int, seed: int, augment: bool = True) -> Callable[[], dict[str, np.ndarray]]:
        """Draw a sample's region and start reading it; return the function that cuts the patches.

        ``start(...)()`` equals ``sample(...)``; between the two calls the engine reads in the background.
        """
        rng = np.random.default_rng(seed)
        plate, spec = self.plate, self.spec
        t_n, _, z_n, y_n, x_n = plate.info(name).shape
        t = int(rng.integers(0, t_n))
        z0 = int(rng.integers(0, z_n - spec.z_window_size + 1))
        zc = z0 + spec.z_window_size // 2
        window = slice(z0, z0 + spec.z_window_size)
        target_z = slice(zc, zc + 1) if spec.target_2d else window
        source = plate.fetch(name, t, plate.channel_indices(list(spec.source_channels)), window)
        target = plate.fetch(name, t, plate.channel_indices(list(spec.target_channels)), target_z)
        fg = None
        if self.fg_min_fraction > 0 or self.fg_weighted:
            fg = plate.fetch(name, t, [0], slice(zc, zc + 1), array=FG_MASK_KEY)
        labels = [plate.fetch(name, t, [0], target_z, array=plate.label_key(name, label)) for label in self.labels]

        def cut() -> dict[str, np.ndarray]:
            patches = self._cut(name, n, rng, source(), target(), None if fg is None else fg()[0, 0] > 0, augment)
            if labels:
                region = np.concatenate([np.asarray(read(), dtype=np.int32) for read in labels])
                patches["labels"] = _cut(region, patches.pop("origins"), spec.yx_patch, np.int32)
            else:
                patches.pop("origins")
            return patches

        return cut

    def _cut(
        self,
        name: str,
        n: int,
        rng: np.random.Generator,
        source: np.ndarray,
        target: np.ndarray,
        fg: np.ndarray | None,
        augment: bool,
    ) -> dict[str, np.ndarray]:
        spec = self.spec
        origins = self._origins(fg, source.shape[-2:], n, rng)
        aug = self.augmentation if augment else None
        if aug is None:
            source, target = _cut(source, origins, spec.yx_patch), _cut(target, origins, spec.yx_patch)
        else:
            transform = build_augmentation(aug, spec.yx_patch, seed=int(rng.integers(2**63)))
            source, target = transform.spatial(_float32(source), _float32(target), origins)
        meta = self.plate.normalization(name)
        normalize_inplace(source, normalization_params(meta, spec.source_channels, self.normalization), 1)
        normalize_inplace(target, normalization_params(meta, spec.target_channels, self.normalization), 1)
        if aug is not None:
            transform.intensity(source)
        return {"source": source, "target": target, "origins": origins}


def prefetched(started: Iterable[Callable[[], Any]]) -> Iterator[Any]:
    """Finish each started read (``PatchSampler.start``) one step behind: the next read is started, so its
    region is fetched in the background, before the current one is cut."""
    pending = None
    for nxt in started:  # drawing from ``started`` starts the next read
        if pending is not None:
            yield pending()
        pending = nxt
    if pending is not None:
        yield pending()


def _float32(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == np.float32 and x.flags.c_contiguous else np.ascontiguousarray(x, dtype=np.float32)


def _cut(
    region: np.ndarray, origins: list[tuple[int, int]], yx: tuple[int, int], dtype: type = np.float32
) -> np.ndarray:
    """``(n, C, Z, Py, Px)`` crops of a ``(C, Z, Y, X)`` region at ``origins``."""
    out = np.empty((len(origins), *region.shape[:2], *yx), dtype=dtype)
    for k, (y0, x0) in enumerate(origins):
        out[k] = region[..., y0 : y0 + yx[0], x0 : x0 + yx[1]]
    return out
