"""The one tiling engine for prediction and serving: YX tiles, Z sliding windows, padding and TTA.

Everything here is numpy in, numpy out around a ``predict_fn(batch (B, C, Z, Y, X)) -> (B, C', Z', Y, X)``,
so the torch and onnxruntime backends plug in the same way.

* **YX**: the image is reflect-padded to the model's YX multiple, cut into tiles (multiples too) that
  overlap by ``overlap``, and the tile predictions are merged with a Gaussian (or constant) importance
  map (MONAI's ``sigma_scale=0.125``), so tile borders, where a convolution sees padding, weigh almost
  nothing. MONAI's ``sliding_window_inference`` is not used: it needs torch tensors, treats Z as a
  spatial window axis (a 2.5D model's 5 -> 1 slice output becomes a "zoom") and keeps the whole padded
  volume on the device; here Z is handled explicitly and only one plane stack is held.
* **Z**: 2D/2.5D models (``out_depth == 1``) predict slice ``z`` from the window
  ``[z - d//2, z - d//2 + d)``; 3D models (``out_depth == z_window_size``) run windows with ``z_stride`` and
  average the overlapping slice predictions uniformly (VisCy's ``_blend_in``). Windows leaving the stack
  read reflected slices (edge slices when Z == 1).
* **TTA**: rot90 / flips applied per tile and inverted on the output (non-square tiles stay valid
  because both tile sides are multiples), reduced by mean or median.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from viscy.errors import ShapeError

PredictFn = Callable[[np.ndarray], np.ndarray]
TTA_MODES = ("none", "rot90", "flips", "all")


@dataclass(frozen=True)
class TilingOptions:
    """How a plane stack is cut, predicted and merged.

    Parameters
    ----------
    z_window_size, out_depth, yx_multiple
        The model's input Z window, output Z depth and YX multiple (``ModelSpec``).
    tile_yx
        Tile size (rounded up to the multiple); None predicts the whole (padded) image at once.
    overlap
        Fraction of a tile shared with its neighbour (0 <= overlap < 1).
    blend
        ``"gaussian"`` or ``"constant"`` importance map for merging tiles.
    tta, tta_reduction
        Test-time augmentation and how the augmented predictions are reduced.
    z_stride
        Stride of the Z windows of 3D models (1 = VisCy's sliding window).
    batch_size
        Tiles per ``predict_fn`` call (each TTA transform is a separate call), and Z windows held at once.
    """

    z_window_size: int = 1
    out_depth: int = 1
    yx_multiple: int = 1
    tile_yx: tuple[int, int] | None = None
    overlap: float = 0.25
    blend: Literal["gaussian", "constant"] = "gaussian"
    tta: Literal["none", "rot90", "flips", "all"] = "none"
    tta_reduction: Literal["mean", "median"] = "mean"
    z_stride: int = 1
    batch_size: int = 4

    @classmethod
    def for_model(cls, spec, tile_yx: tuple[int, int] | None = None, **options) -> TilingOptions:
        """Options for a model with :class:`~viscy.models.registry.ModelSpec` ``spec`` (depths, YX multiple)."""
        return cls(z_window_size=spec.z_window_size, out_depth=spec.out_depth, yx_multiple=spec.yx_multiple,
                   tile_yx=tuple(tile_yx) if tile_yx else None, **options)

    def __post_init__(self) -> None:
        if self.out_depth not in (1, self.z_window_size):
            raise ShapeError(
                f"model maps {self.z_window_size} slices to {self.out_depth}; only 2D/2.5D (out depth 1) and 3D "
                "(out depth == Z window) models are supported"
            )
        if not 0 <= self.overlap < 1:
            raise ShapeError(f"tile overlap must be in [0, 1), got {self.overlap}")
        if self.tta not in TTA_MODES:
            raise ShapeError(f"tta must be one of {TTA_MODES}, got {self.tta!r}")


# ---------------------------------------------------------------------------------------------- padding
def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def pad_yx(x: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad the last two axes (at the end) to multiples of ``multiple``; returns the original YX."""
    y, xx = x.shape[-2:]
    py, px = round_up(y, multiple) - y, round_up(xx, multiple) - xx
    if py == 0 and px == 0:
        return x, (y, xx)
    widths = [(0, 0)] * (x.ndim - 2) + [(0, py), (0, px)]
    mode = "reflect" if min(y, xx) > 1 else "edge"
    return np.pad(x, widths, mode=mode), (y, xx)


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map indices outside ``[0, n)`` back inside by reflection (``n == 1``: all zero)."""
    idx = np.asarray(idx)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


# ----------------------------------------------------------------------------------------------- TTA
def tta_transforms(mode: str) -> list[tuple[int, bool]]:
    """(rot90 count k, flip X first) pairs; the identity is always first."""
    if mode == "none":
        return [(0, False)]
    if mode == "rot90":
        return [(k, False) for k in range(4)]
    if mode == "flips":
        # identity, flip X, flip Y (= rot180 of flip X), flip both (= rot180)
        return [(0, False), (0, True), (2, True), (2, False)]
    return [(k, f) for f in (False, True) for k in range(4)]


def _forward(x: np.ndarray, k: int, flip: bool) -> np.ndarray:
    if flip:
        x = x[..., ::-1]
    return np.rot90(x, k, axes=(-2, -1))


def _inverse(x: np.ndarray, k: int, flip: bool) -> np.ndarray:
    x = np.rot90(x, -k, axes=(-2, -1))
    return x[..., ::-1] if flip else x


# ------------------------------------------------------------------------------------------- blending
def importance_map(tile_yx: tuple[int, int], blend: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """(Y, X) merge weights: a Gaussian centred on the tile (MONAI's sigma 0.125 x size) or ones."""
    if blend == "constant":
        return np.ones(tile_yx, dtype=np.float32)
    axes = []
    for n in tile_yx:
        c = (n - 1) / 2
        sigma = max(sigma_scale * n, 1e-3)
        axes.append(np.exp(-0.5 * ((np.arange(n) - c) / sigma) ** 2))
    w = np.outer(axes[0], axes[1]).astype(np.float32)
    w /= w.max()
    # as MONAI: no zero weights, so every pixel has a defined average
    return np.maximum(w, max(float(w[w > 0].min()), 1e-6)).astype(np.float32)


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets covering ``[0, size)`` with tiles of ``tile`` overlapping by about ``overlap``."""
    if tile >= size:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    n = -(-(size - tile) // stride) + 1
    # evenly spaced (spacing <= stride): a last tile pushed against the border would leave a strip that only
    # tile edges cover, where the blending weights are tiny
    return [int(round(i * (size - tile) / (n - 1))) for i in range(n)]


# --------------------------------------------------------------------------------------------- engine
def predict_yx(windows: np.ndarray, predict_fn: PredictFn, opts: TilingOptions) -> np.ndarray:
    """Predict a batch of Z windows ``(N, C, D_in, Y, X)`` tile by tile; returns ``(N, C', D_out, Y, X)``."""
    n, _, _, y, x = windows.shape
    padded, _ = pad_yx(windows, opts.yx_multiple)
    py, px = padded.shape[-2:]
    m = opts.yx_multiple
    if opts.tile_yx is None:
        ty, tx = py, px
    else:
        ty, tx = min(round_up(opts.tile_yx[0], m), py), min(round_up(opts.tile_yx[1], m), px)
    tiles = [(a, b) for a in tile_starts(py, ty, opts.overlap) for b in tile_starts(px, tx, opts.overlap)]
    weight = importance_map((ty, tx), opts.blend) if len(tiles) > 1 else np.ones((ty, tx), np.float32)
    transforms = tta_transforms(opts.tta)
    items = [(i, t) for i in range(n) for t in range(len(tiles))]
    out: np.ndarray | None = None
    wsum = np.zeros((py, px), dtype=np.float32)
    for a, b in tiles:
        wsum[a : a + ty, b : b + tx] += weight
    step = max(1, opts.batch_size)
    for s in range(0, len(items), step):
        chunk = items[s : s + step]
        crops = np.stack(
            [padded[i, :, :, tiles[t][0] : tiles[t][0] + ty, tiles[t][1] : tiles[t][1] + tx] for i, t in chunk]
        )
        preds = []
        for k, flip in transforms:
            inp = np.ascontiguousarray(_forward(crops, k, flip), dtype=np.float32)
            preds.append(_inverse(np.asarray(predict_fn(inp)), k, flip))
        if len(preds) == 1:
            pred = preds[0]
        elif opts.tta_reduction == "median":
            pred = np.median(np.stack(preds), axis=0)
        else:
            pred = np.mean(np.stack(preds), axis=0)
        if out is None:
            out = np.zeros((n, pred.shape[1], pred.shape[2], py, px), dtype=np.float32)
        for (i, t), p in zip(chunk, pred, strict=True):
            a, b = tiles[t]
            out[i, :, :, a : a + ty, b : b + tx] += p * weight
    assert out is not None
    out /= wsum
    return out[..., :y, :x]


def z_windows(n_z: int, z_window_size: int, out_depth: int, z_stride: int = 1) -> list[np.ndarray]:
    """Input slice indices of every Z window of a stack of ``n_z`` slices (reflected at the edges).

    2D/2.5D: one window per output slice, centred on it. 3D: windows starting every ``z_stride`` slices,
    the last one ending at the last slice (one reflect-padded window if ``n_z < z_window_size``).
    """
    if out_depth == 1:
        half = z_window_size // 2
        return [reflect_index(np.arange(z - half, z - half + z_window_size), n_z) for z in range(n_z)]
    if n_z <= z_window_size:
        return [reflect_index(np.arange(z_window_size), n_z)]
    starts = list(range(0, n_z - z_window_size + 1, z_stride))
    if starts[-1] != n_z - z_window_size:
        starts.append(n_z - z_window_size)
    return [np.arange(s, s + z_window_size) for s in starts]


def predict_stack(
    read: Callable[[np.ndarray], np.ndarray] | np.ndarray,
    n_z: int,
    predict_fn: PredictFn,
    opts: TilingOptions,
    z_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """Predict output slices ``z_range`` of a ``(C, Z, Y, X)`` stack; returns ``(C', z1 - z0, Y, X)``.

    Parameters
    ----------
    read
        The stack, or a function returning ``(C, len(idx), Y, X)`` for sorted unique slice indices ``idx``
        (so only the slices the block needs are read).
    n_z
        Number of slices in the whole stack.
    predict_fn, opts
        Model call and tiling options.
    z_range
        Output slices ``[z0, z1)``; default all. The result equals the same slices of a whole-stack run.
    """
    z0, z1 = z_range or (0, n_z)
    if not 0 <= z0 < z1 <= n_z:
        raise ShapeError(f"z range {z_range} is outside the {n_z}-slice stack")
    windows = z_windows(n_z, opts.z_window_size, opts.out_depth, opts.z_stride)
    if opts.out_depth == 1:
        chosen = windows[z0:z1]
        targets = [np.array([z]) for z in range(z0, z1)]
    else:
        chosen, targets = [], []
        for w in windows:
            # which output slice each window position writes: the stack index, or for a reflect-padded window
            # (n_z < z_window_size) its first n_z positions
            d = opts.z_window_size
            tgt = np.arange(w[0], w[0] + d) if n_z > d else np.arange(d)
            if np.any((tgt >= z0) & (tgt < z1) & (tgt < n_z)):
                chosen.append(w)
                targets.append(tgt)
    needed = np.unique(np.concatenate(chosen))
    stack = read[:, needed] if isinstance(read, np.ndarray) else read(needed)
    lookup = {int(z): i for i, z in enumerate(needed)}
    out: np.ndarray | None = None
    count = np.zeros(z1 - z0, dtype=np.float32)
    # a few windows at a time keeps memory at a few planes per window, whatever the stack depth
    group = max(1, opts.batch_size)
    for s in range(0, len(chosen), group):
        batch = np.stack([stack[:, [lookup[int(z)] for z in w]] for w in chosen[s : s + group]])
        pred = predict_yx(batch.astype(np.float32, copy=False), predict_fn, opts)
        if out is None:
            out = np.zeros((pred.shape[1], z1 - z0) + pred.shape[-2:], dtype=np.float32)
        for p, tgt in zip(pred, targets[s : s + group], strict=True):
            for j, z in enumerate(tgt):
                if z0 <= z < z1 and z < n_z:
                    out[:, z - z0] += p[:, j]
                    count[z - z0] += 1
    assert out is not None
    out /= count[None, :, None, None]
    return out


def predict_plane_stack(stack: np.ndarray, predict_fn: PredictFn, opts: TilingOptions) -> np.ndarray:
    """Convenience: predict every output slice of an in-memory ``(C, Z, Y, X)`` stack."""
    return predict_stack(stack, stack.shape[1], predict_fn, opts)


def tile_grid(shape_yx: Sequence[int], opts: TilingOptions) -> list[tuple[int, int]]:
    """Tile origins in the padded image."""
    py, px = (round_up(s, opts.yx_multiple) for s in shape_yx)
    if opts.tile_yx is None:
        return [(0, 0)]
    ty = min(round_up(opts.tile_yx[0], opts.yx_multiple), py)
    tx = min(round_up(opts.tile_yx[1], opts.yx_multiple), px)
    return [(a, b) for a in tile_starts(py, ty, opts.overlap) for b in tile_starts(px, tx, opts.overlap)]


def count_model_calls(n_z: int, shape_yx: Sequence[int], opts: TilingOptions) -> int:
    """How many tiles the model runs on for a ``(C, n_z, Y, X)`` stack: Z windows x YX tiles x TTA transforms."""
    windows = len(z_windows(n_z, opts.z_window_size, opts.out_depth, opts.z_stride))
    return windows * len(tile_grid(shape_yx, opts)) * len(tta_transforms(opts.tta))
