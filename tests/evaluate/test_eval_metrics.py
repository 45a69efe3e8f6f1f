"""Regression and segmentation metrics on hand-made images with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.metrics import mean_squared_error as sk_mse
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from viscy.evaluate.metrics import (
    IOU_THRESHOLDS,
    iou_matrix,
    match_counts,
    ms_ssim_settings,
    regression_metrics,
    segmentation_metrics,
)


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return ndi.gaussian_filter(rng.normal(size=(96, 96)), 3).astype(np.float32) * 100 + 50


def test_perfect_prediction(image: np.ndarray) -> None:
    m = regression_metrics(image, image.copy())
    assert m["pearson"] == pytest.approx(1.0, abs=1e-6)
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["ms_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["mae"] == 0 and m["mse"] == 0 and m["nrmse"] == 0
    assert m["psnr"] > 100 or math.isinf(m["psnr"])


def test_noise_lowers_scores(image: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    little = regression_metrics(image, image + rng.normal(0, 0.1 * image.std(), image.shape))
    lots = regression_metrics(image, image + rng.normal(0, 1.0 * image.std(), image.shape))
    for name in ("pearson", "ssim", "ms_ssim", "psnr"):
        assert lots[name] < little[name] < 1.0 or (name == "psnr" and lots[name] < little[name])
    for name in ("mae", "mse", "nrmse"):
        assert 0 < little[name] < lots[name]
    assert 0.9 < little["pearson"] < 1


def test_matches_scikit_image(image: np.ndarray) -> None:
    noisy = image + np.random.default_rng(2).normal(0, 0.3 * image.std(), image.shape)
    m = regression_metrics(image, noisy)
    data_range = float(image.max() - image.min())
    assert m["psnr"] == pytest.approx(sk_psnr(image.astype(np.float64), noisy, data_range=data_range), rel=1e-6)
    assert m["mse"] == pytest.approx(sk_mse(image.astype(np.float64), noisy), rel=1e-6)
    assert m["pearson"] == pytest.approx(np.corrcoef(image.ravel(), noisy.ravel())[0, 1], abs=1e-6)
    # Same Gaussian-window SSIM as torchmetrics; only the border handling differs.
    ref = sk_ssim(image.astype(np.float64), noisy, data_range=data_range, gaussian_weights=True, sigma=1.5,
                  use_sample_covariance=False)
    assert m["ssim"] == pytest.approx(ref, abs=0.03)


def test_ms_ssim_small_images() -> None:
    assert ms_ssim_settings(256, 256) == (11, pytest.approx((0.0448, 0.2856, 0.3001, 0.2363, 0.1333), rel=1e-3))
    kernel, betas = ms_ssim_settings(64, 64)
    assert kernel == 11 and len(betas) == 3 and sum(betas) == pytest.approx(1)
    assert ms_ssim_settings(2, 2) is None
    img = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    assert 0 <= regression_metrics(img, img * 0.5 + 0.2)["ms_ssim"] <= 1


def _discs(centres: list[tuple[int, int]], shape=(64, 64), r: int = 6) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for i, (y, x) in enumerate(centres, start=1):
        out[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = i
    return out


CENTRES = [(10, 10), (10, 50), (50, 10), (50, 50)]


def test_identical_labels() -> None:
    true = _discs(CENTRES)
    m = segmentation_metrics(true, true * 3)  # ids differ, objects do not
    assert m["ap_50_95"] == 1 and m["ap_50"] == 1 and m["f1_50"] == 1
    assert m["dice"] == 1 and m["jaccard"] == 1 and m["n_true"] == 4 == m["n_pred"]


def test_one_missing_object() -> None:
    true, pred = _discs(CENTRES), _discs(CENTRES[:3])
    m = segmentation_metrics(true, pred)
    assert m["ap_50"] == pytest.approx(3 / 4)  # TP / (TP + FP + FN) = 3 / (3 + 0 + 1)
    assert m["f1_50"] == pytest.approx(6 / 7)  # 2 TP / (2 TP + FP + FN)
    assert m["precision_50"] == 1 and m["recall_50"] == pytest.approx(3 / 4)
    assert m["dice"] == pytest.approx(2 * 3 / 7)
    assert m["jaccard"] == pytest.approx(3 / 4)


def test_shifted_and_extra_objects() -> None:
    true = _discs(CENTRES)
    # One object shifted by 6 px (IoU well below 0.5), one spurious object added.
    pred = _discs([(10, 10), (10, 50), (50, 10), (50, 56), (30, 30)])
    iou = iou_matrix(true, pred)
    assert iou.shape == (4, 5)
    assert iou[3, 3] < 0.5
    tp, fp, fn = match_counts(iou, 0.5)
    assert (tp, fp, fn) == (3, 2, 1)
    assert segmentation_metrics(true, pred)["ap_50"] == pytest.approx(3 / 6)


def test_empty_images() -> None:
    empty = np.zeros((16, 16), np.int32)
    assert segmentation_metrics(empty, empty)["ap_50_95"] == 1
    m = segmentation_metrics(_discs(CENTRES), np.zeros((64, 64), np.int32))
    assert m["ap_50"] == 0 and m["f1_50"] == 0 and m["dice"] == 0


def test_agrees_with_cellpose_average_precision() -> None:
    cp_metrics = pytest.importorskip("cellpose.metrics")
    rng = np.random.default_rng(5)
    true = _discs([tuple(c) for c in rng.integers(8, 120, (12, 2))], shape=(128, 128), r=7)
    pred = _discs([tuple(c) for c in rng.integers(8, 120, (12, 2))], shape=(128, 128), r=7)
    pred[true > 0] = np.where(pred[true > 0] > 0, pred[true > 0], true[true > 0] + 100)  # partial overlaps
    ap, tp, fp, fn = cp_metrics.average_precision(true, pred, threshold=list(IOU_THRESHOLDS))
    m = segmentation_metrics(true, pred)
    assert m["ap_50_95"] == pytest.approx(float(np.mean(ap)), abs=1e-6)
    assert m["ap_50"] == pytest.approx(float(ap[0]), abs=1e-6)
