"""Regression metrics on hand-made images with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.metrics import mean_squared_error as sk_mse
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from viscy.evaluate.metrics import ms_ssim_settings, regression_metrics


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
