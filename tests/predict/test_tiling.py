"""The tiling engine: tiled == whole image, no seams, Z windows, TTA on non-square FOVs, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from viscy.errors import ShapeError
from viscy.predict.tiling import (
    TilingOptions,
    importance_map,
    pad_yx,
    predict_stack,
    predict_yx,
    reflect_index,
    tile_grid,
    z_windows,
)


def _conv_model(in_ch: int = 1, out_ch: int = 2, depth: int = 1, seed: int = 0) -> nn.Module:
    """A small fully convolutional 2D net (receptive field 7) behind the 5D interface."""
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(in_ch * depth, 8, 3, padding=1), nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                nn.Conv2d(8, out_ch, 3, padding=1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, z, y, xx = x.shape
            return self.body(x.reshape(b, c * z, y, xx)).unsqueeze(2)

    return Net().eval()


def _fn(model: nn.Module, multiple: int = 1):
    def predict(batch: np.ndarray) -> np.ndarray:
        assert batch.shape[-2] % multiple == 0 and batch.shape[-1] % multiple == 0, batch.shape
        with torch.no_grad():
            return model(torch.from_numpy(batch)).numpy()

    return predict


def _image(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.normal(size=shape), sigma=(0,) * (len(shape) - 2) + (2, 2)).astype(np.float32) * 5


def test_tiled_equals_whole_and_no_seam():
    model = _conv_model()
    img = _image((1, 1, 1, 200, 328))
    whole = predict_yx(img, _fn(model), TilingOptions())
    opts = TilingOptions(tile_yx=(64, 96), overlap=0.5, batch_size=3)
    assert len(tile_grid((200, 328), opts)) > 10
    tiled = predict_yx(img, _fn(model), opts)
    assert tiled.shape == whole.shape == (1, 2, 1, 200, 328)
    scale = np.abs(whole).max()
    assert np.abs(tiled - whole).max() < 5e-3 * scale
    # no seam: across tile borders (first/last columns of every tile) the gradient of the tiled prediction
    # is no larger than the whole-image one, i.e. no step appears where tiles meet
    starts_x = sorted({b for _, b in tile_grid((200, 328), opts)})
    border = sorted({c for b in starts_x for c in (b - 1, b + 95) if 0 <= c < 327})
    grad = np.abs(np.diff(tiled[0, :, 0], axis=-1))
    grad_ref = np.abs(np.diff(whole[0, :, 0], axis=-1))
    assert grad[..., border].mean() <= 1.01 * grad_ref[..., border].mean()
    assert np.abs(grad - grad_ref)[..., border].max() < 5e-3 * scale


def test_constant_blend_without_overlap_shows_seams_gaussian_does_not():
    model = _conv_model()
    img = _image((1, 1, 1, 128, 128), seed=1)
    whole = predict_yx(img, _fn(model), TilingOptions())
    hard = predict_yx(img, _fn(model), TilingOptions(tile_yx=(32, 32), overlap=0.0, blend="constant"))
    soft = predict_yx(img, _fn(model), TilingOptions(tile_yx=(32, 32), overlap=0.5, blend="gaussian"))
    assert np.abs(soft - whole).max() < 0.2 * np.abs(hard - whole).max()


def test_padding_to_multiple_and_crop_back():
    model = _conv_model()
    img = _image((2, 1, 1, 45, 70))
    out = predict_yx(img, _fn(model, multiple=16), TilingOptions(yx_multiple=16))
    assert out.shape == (2, 2, 1, 45, 70)
    out_t = predict_yx(img, _fn(model, multiple=16), TilingOptions(yx_multiple=16, tile_yx=(20, 20), overlap=0.5))
    assert out_t.shape == (2, 2, 1, 45, 70)
    padded, orig = pad_yx(img, 16)
    assert padded.shape[-2:] == (48, 80) and orig == (45, 70)
    np.testing.assert_array_equal(padded[..., :45, :70], img)


def test_importance_map_positive_and_peaked():
    w = importance_map((32, 48))
    assert w.shape == (32, 48) and w.min() > 0 and w.max() == pytest.approx(1.0)
    assert w[16, 24] > w[0, 0]
    assert np.all(importance_map((8, 8), "constant") == 1)


def test_tta_rot90_equivariant_op_equals_no_tta_non_square():
    # a pointwise op commutes with every rotation/flip: TTA must give exactly the same result
    def op(b: np.ndarray) -> np.ndarray:
        return np.concatenate([b * 2 + 1, b**2], axis=1)

    img = _image((1, 1, 1, 48, 80))
    base = predict_yx(img, op, TilingOptions(yx_multiple=16))
    for mode in ("rot90", "flips", "all"):
        for red in ("mean", "median"):
            out = predict_yx(img, op, TilingOptions(yx_multiple=16, tta=mode, tta_reduction=red))
            assert out.shape == (1, 2, 1, 48, 80)
            np.testing.assert_allclose(out, base, rtol=1e-6, atol=1e-6)
    # tiled + TTA with non-square tiles, odd image size
    img2 = _image((1, 1, 1, 50, 90))
    out = predict_yx(img2, op, TilingOptions(yx_multiple=16, tile_yx=(32, 48), overlap=0.25, tta="all"))
    np.testing.assert_allclose(out, predict_yx(img2, op, TilingOptions(yx_multiple=16)), rtol=1e-5, atol=1e-5)


def test_tta_averages_a_non_equivariant_model():
    # a model that only looks left: rot90 TTA averages four directions and differs from no TTA
    def left(b: np.ndarray) -> np.ndarray:
        return np.roll(b, 1, axis=-1)

    img = _image((1, 1, 1, 32, 64))
    out = predict_yx(img, left, TilingOptions(tta="rot90"))
    expected = np.mean([np.roll(img, 1, -1), np.roll(img, -1, -1), np.roll(img, 1, -2), np.roll(img, -1, -2)], 0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_reflect_index_and_windows():
    np.testing.assert_array_equal(reflect_index(np.arange(-2, 3), 5), [2, 1, 0, 1, 2])
    np.testing.assert_array_equal(reflect_index(np.arange(3, 8), 5), [3, 4, 3, 2, 1])
    np.testing.assert_array_equal(reflect_index(np.arange(-2, 3), 1), [0] * 5)
    w = z_windows(6, 3, 1)
    assert len(w) == 6 and list(w[0]) == [1, 0, 1] and list(w[5]) == [4, 5, 4]
    w3 = z_windows(7, 4, 4, z_stride=2)
    assert [int(x[0]) for x in w3] == [0, 2, 3]
    assert len(z_windows(2, 4, 4)) == 1


def test_z_25d_centre_slice_windows():
    # 2.5D "model": output = mean over its Z window; output slice z must see window centred on z
    def mean_z(b: np.ndarray) -> np.ndarray:
        return b.mean(axis=2, keepdims=True)

    stack = np.arange(7, dtype=np.float32)[None, :, None, None] * np.ones((1, 7, 16, 16), np.float32)
    out = predict_stack(stack, 7, mean_z, TilingOptions(z_window_size=3, out_depth=1))
    assert out.shape == (1, 7, 16, 16)
    # interior slices: mean of z-1, z, z+1 = z; edges reflect: (1+0+1)/3, (5+6+5)/3
    np.testing.assert_allclose(out[0, :, 0, 0], [2 / 3, 1, 2, 3, 4, 5, 16 / 3], rtol=1e-6)


def test_z_3d_sliding_average_and_blocks_match_whole():
    # 3D "model": adds the window's start slice value to each slice, so overlapping windows disagree
    def f(b: np.ndarray) -> np.ndarray:
        return b + b[:, :, :1]

    stack = _image((1, 9, 24, 24), seed=3)
    opts = TilingOptions(z_window_size=4, out_depth=4, z_stride=1, batch_size=2)
    whole = predict_stack(stack, 9, f, opts)
    assert whole.shape == (1, 9, 24, 24)
    # slice 0 is covered only by the window starting at 0
    np.testing.assert_allclose(whole[:, 0], 2 * stack[:, 0], rtol=1e-5)
    # slice 4 is covered by windows starting 1..4
    expected = stack[:, 4] + np.mean([stack[:, s] for s in (1, 2, 3, 4)], axis=0)
    np.testing.assert_allclose(whole[:, 4], expected, rtol=1e-5, atol=1e-6)
    # z blocks with a lazy reader give the same slices and read only what they need
    reads = []

    def read(idx):
        reads.append(list(idx))
        return stack[:, idx]

    blocks = np.concatenate([predict_stack(read, 9, f, opts, (z0, min(z0 + 4, 9))) for z0 in (0, 4, 8)], axis=1)
    np.testing.assert_allclose(blocks, whole, rtol=1e-6)
    assert max(len(r) for r in reads) <= 8
    # fewer slices than the model depth: reflect-padded window, output cropped
    short = predict_stack(stack[:, :2], 2, f, opts)
    assert short.shape == (1, 2, 24, 24)


def test_unsupported_depth_and_bad_range():
    with pytest.raises(ShapeError, match="only 2D/2.5D"):
        TilingOptions(z_window_size=5, out_depth=3)
    with pytest.raises(ShapeError, match="outside"):
        predict_stack(np.zeros((1, 3, 8, 8), np.float32), 3, lambda b: b, TilingOptions(), (2, 5))
