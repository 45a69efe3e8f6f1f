"""VisCy's mixed virtual-staining loss: weighted L1 + L2 + (1 - MS-SSIM) over YX slices."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.metrics.regression import compute_ssim_and_cs
from torch import Tensor, nn

# VisCy's (and Wang et al.'s) MS-SSIM scale weights.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _as_slices(x: Tensor) -> Tensor:
    """(B, C, Z, Y, X) -> (B*Z, C, Y, X); 4D input passes through."""
    if x.ndim == 5:
        b, c, z, y, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * z, c, y, w)
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, Z, Y, X) or (B, C, Y, X), got shape {tuple(x.shape)}")
    return x


def ms_ssim_scales(size: int, kernel_size: int = 11, max_scales: int = 5) -> tuple[int, int]:
    """(scales, kernel) valid for a YX size: every scale must still be at least one kernel wide."""
    kernel = min(kernel_size, size if size % 2 else size - 1)
    scales = 1 + int(math.floor(math.log2(size / kernel))) if size >= kernel else 1
    return max(1, min(max_scales, scales)), max(kernel, 1)


def ms_ssim(
    pred: Tensor,
    target: Tensor,
    kernel_size: int = 11,
    max_scales: int = 5,
    clamp: float = 1e-4,
    data_range: float | Tensor | None = None,
) -> Tensor:
    """Multi-scale SSIM per YX slice, averaged over slices and channels (fp32, autocast off).

    The number of scales and the (uniform) window shrink for small patches; betas are renormalised.
    Per-scale contrast and SSIM terms are clamped at ``clamp`` so fractional powers stay defined.
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p, t = _as_slices(pred).float(), _as_slices(target.to(pred.device)).float()
        scales, kernel = ms_ssim_scales(min(p.shape[-2:]), kernel_size, max_scales)
        betas = torch.tensor(MS_SSIM_BETAS[:scales], device=p.device)
        betas = betas / betas.sum()
        if data_range is None:
            data_range = (t.amax() - t.amin()).detach().clamp_min(1e-6)
        values = []
        for i in range(scales):
            ssim, cs = compute_ssim_and_cs(
                p,
                t,
                spatial_dims=2,
                kernel_size=[kernel, kernel],
                kernel_sigma=[1.5, 1.5],
                data_range=data_range,
                kernel_type="uniform",
            )
            term = ssim if i == scales - 1 else cs
            values.append(term.flatten(2).mean(-1).clamp_min(clamp))  # (N, C)
            if i < scales - 1:
                p, t = F.avg_pool2d(p, 2), F.avg_pool2d(t, 2)
        stacked = torch.stack(values, dim=0)  # (S, N, C)
        return torch.prod(stacked ** betas.view(-1, 1, 1), dim=0).mean()


class MixedLoss(nn.Module):
    """``l1_alpha * L1 + l2_alpha * MSE + ms_dssim_alpha * (1 - MS-SSIM)`` (VisCy defaults 0.5, 0, 0.5).

    Computed in fp32 whatever the autocast context, so it is safe under bf16/fp16 mixed precision.
    """

    def __init__(self, l1_alpha: float = 0.5, l2_alpha: float = 0.0, ms_dssim_alpha: float = 0.5) -> None:
        super().__init__()
        if l1_alpha + l2_alpha + ms_dssim_alpha <= 0:
            raise ValueError("at least one of l1_alpha, l2_alpha, ms_dssim_alpha must be positive")
        self.l1_alpha, self.l2_alpha, self.ms_dssim_alpha = l1_alpha, l2_alpha, ms_dssim_alpha

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            p, t = pred.float(), target.float()
            loss = p.new_zeros(())
            if self.l1_alpha:
                loss = loss + self.l1_alpha * F.l1_loss(p, t)
            if self.l2_alpha:
                loss = loss + self.l2_alpha * F.mse_loss(p, t)
            if self.ms_dssim_alpha:
                loss = loss + self.ms_dssim_alpha * (1.0 - ms_ssim(p, t))
            return loss
