"""MixedLoss and MS-SSIM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from viscy.train.loss import MixedLoss, ms_ssim, ms_ssim_scales


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 2, 3, 64, 64, generator=g), torch.randn(2, 2, 3, 64, 64, generator=g)


def test_ms_ssim_identical_is_one(pair):
    x, _ = pair
    assert ms_ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert MixedLoss(0.0, 0.0, 1.0)(x, x).item() == pytest.approx(0.0, abs=1e-5)


def test_ms_ssim_unrelated_is_low(pair):
    x, y = pair
    assert ms_ssim(x, y).item() < 0.2


def test_weights_are_linear(pair):
    x, y = pair
    assert MixedLoss(1.0, 0.0, 0.0)(x, y).item() == pytest.approx(F.l1_loss(x, y).item(), rel=1e-6)
    assert MixedLoss(0.0, 1.0, 0.0)(x, y).item() == pytest.approx(F.mse_loss(x, y).item(), rel=1e-6)
    dssim = 1 - ms_ssim(x, y).item()
    expected = 0.5 * F.l1_loss(x, y).item() + 0.25 * F.mse_loss(x, y).item() + 0.5 * dssim
    assert MixedLoss(0.5, 0.25, 0.5)(x, y).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        MixedLoss(0.0, 0.0, 0.0)


def test_scales_shrink_for_small_patches():
    assert ms_ssim_scales(256) == (5, 11)
    assert ms_ssim_scales(64) == (3, 11)
    assert ms_ssim_scales(8) == (1, 7)
    x = torch.rand(1, 1, 1, 8, 8)
    assert torch.isfinite(ms_ssim(x, x * 0.5))


def test_fp32_under_bf16_autocast_and_gradients(pair):
    x, y = pair
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MixedLoss()(x.bfloat16(), y.bfloat16())
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
