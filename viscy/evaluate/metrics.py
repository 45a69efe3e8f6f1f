"""Regression metrics for one 2D image pair (segmentation metrics: :mod:`viscy.segment.metrics`).

Regression metrics come from torchmetrics and scikit-image. ``data_range`` for SSIM, MS-SSIM and PSNR is
the target's range (max - min), so the score does not depend on how far off the prediction's range is.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import normalized_root_mse
from torchmetrics.functional import mean_absolute_error, mean_squared_error, pearson_corrcoef
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from viscy.train.loss import MS_SSIM_BETAS

REGRESSION_METRICS = ("pearson", "ssim", "ms_ssim", "psnr", "mae", "mse", "nrmse")


def ms_ssim_settings(height: int, width: int) -> tuple[int, tuple[float, ...]] | None:
    """Largest valid (kernel size, betas) of MS-SSIM for an image; None if even one scale does not fit.

    Prefers the standard 11-px kernel with as many of the 5 standard scales as fit, then smaller kernels;
    the betas of the kept scales are renormalised to sum to 1.
    """
    side = min(height, width)
    for kernel in (11, 9, 7, 5, 3):
        for n in range(5, 0, -1):
            # torchmetrics' own validity rule, plus: the coarsest scale must still hold one kernel.
            if side // max(1, n - 1) ** 2 > kernel - 1 and side // 2 ** (n - 1) >= kernel:
                betas = np.asarray(MS_SSIM_BETAS[:n])
                return kernel, tuple(float(b) for b in betas / betas.sum())
    return None


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float64))


def regression_metrics(target: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """Pearson, SSIM, MS-SSIM, PSNR, MAE, MSE and NRMSE of a 2D prediction against its target.

    Parameters
    ----------
    target, prediction
        2D arrays (Y, X) of the same shape.

    Returns
    -------
    dict
        One float per name in ``REGRESSION_METRICS`` (NaN where undefined, e.g. Pearson of a flat image;
        PSNR is ``inf`` for a perfect prediction).
    """
    if target.shape != prediction.shape or target.ndim != 2:
        raise ValueError(f"need two 2D images of equal shape, got {target.shape} and {prediction.shape}")
    t, p = _as_tensor(target), _as_tensor(prediction)
    data_range = float(t.max() - t.min()) or 1.0
    out: dict[str, float] = {}
    if float(t.std()) > 0 and float(p.std()) > 0:
        out["pearson"] = float(pearson_corrcoef(p.flatten(), t.flatten()))
    else:
        out["pearson"] = math.nan
    t4, p4 = t[None, None], p[None, None]
    out["ssim"] = float(structural_similarity_index_measure(p4, t4, data_range=data_range))
    settings = ms_ssim_settings(*target.shape)
    if settings is None:
        out["ms_ssim"] = math.nan
    else:
        kernel, betas = settings
        out["ms_ssim"] = float(
            multiscale_structural_similarity_index_measure(
                p4, t4, data_range=data_range, kernel_size=kernel, betas=betas, normalize="relu"
            )
        )
    out["psnr"] = float(peak_signal_noise_ratio(p, t, data_range=data_range))
    out["mae"] = float(mean_absolute_error(p, t))
    out["mse"] = float(mean_squared_error(p, t))
    out["nrmse"] = float(normalized_root_mse(target.astype(np.float64), prediction.astype(np.float64)))
    return out
