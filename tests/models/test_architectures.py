"""Registry, declared input constraints, forward shapes, one training step per architecture, FCMAE."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import TINY_KWARGS, tiny_kwargs
from viscy.errors import ModelError
from viscy.models import (
    ModelSpec,
    create_model,
    get_preset,
    get_spec,
    list_models,
    list_presets,
    model_kwargs,
    register_model,
    resolve_model,
)
from viscy.models.fcmae import FullyConvolutionalMAE, masked_mse_loss, transfer_encoder_weights

SMALL = {name: tiny_kwargs(name) for name in TINY_KWARGS}
DEPTH_OUT = {"unet2d": 1, "unet25d": 1, "unet3d": 4, "unext2": 4, "fcmae": 4}


def test_registry_lists_five_architectures_and_three_presets():
    assert {"unet2d", "unet25d", "unet3d", "unext2", "fcmae"} <= set(list_models())
    assert list_presets() == ["VSCyto2D", "VSCyto3D", "VSNeuromast"]


def test_unknown_names_and_kwargs_raise_model_error():
    with pytest.raises(ModelError, match="unknown model 'nope'.*unet2d"):
        create_model("nope")
    with pytest.raises(ModelError, match="unknown argument"):
        create_model("unet2d", bogus=1)
    with pytest.raises(ModelError, match="in_stack_depth"):
        create_model("unext2", in_stack_depth=7, stem_kernel_size=(5, 4, 4))
    with pytest.raises(ModelError, match="unknown preset"):
        get_preset("VSCyto4D")


def test_viscy_kwarg_names_are_accepted():
    assert {"in_stack_depth", "stem_kernel_size", "decoder_mode", "head_pool", "head_expansion_ratio"} <= set(
        model_kwargs("unext2")
    )
    assert {"encoder_blocks", "dims", "decoder_conv_blocks", "pretraining", "encoder_drop_path_rate"} <= set(
        model_kwargs("fcmae")
    )


def test_preset_resolution_and_overrides():
    arch, kw, preset = resolve_model("vscyto3d", {"out_channels": 1})
    assert arch == "unext2" and preset is not None and preset.name == "VSCyto3D"
    assert kw["out_channels"] == 1 and kw["in_stack_depth"] == 5


def test_register_custom_model():
    @register_model("identity_test")
    class Identity(torch.nn.Module):
        def __init__(self, channels: int = 1) -> None:
            super().__init__()
            self.spec = ModelSpec("identity_test", channels, channels, 1, 1, 1)

        def forward(self, x):
            return x

    assert "identity_test" in list_models()
    assert get_spec(create_model("identity_test", channels=2)).in_channels == 2


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_shape_follows_spec(name):
    model = create_model(name, **SMALL[name]).eval()
    spec = get_spec(model)
    assert spec.out_depth == DEPTH_OUT[name]
    m = spec.yx_multiple
    x = torch.randn(2, spec.in_channels, spec.z_window_size, 2 * m, 3 * m)
    spec.check_input(tuple(x.shape))
    with torch.no_grad():
        y = model(x)
    assert tuple(y.shape) == (2, spec.out_channels, spec.out_depth, 2 * m, 3 * m)
    with pytest.raises(ModelError, match="multiples"):
        spec.check_input((1, spec.in_channels, spec.z_window_size, m + 1, m))
    with pytest.raises(ModelError, match="Z depth"):
        spec.check_input((1, spec.in_channels, spec.z_window_size + 1, m, m))
    assert spec.padded_yx(m + 1, 1) == (2 * m, m)


@pytest.mark.parametrize("name", list(SMALL))
def test_one_training_step(name):
    torch.manual_seed(0)
    model = create_model(name, **SMALL[name]).train()
    spec = get_spec(model)
    m = spec.yx_multiple
    x = torch.randn(2, spec.in_channels, spec.z_window_size, 2 * m, 2 * m)
    target = torch.randn(2, spec.out_channels, spec.out_depth, 2 * m, 2 * m)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.mse_loss(model(x), target)
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert sum(changed) >= 0.9 * len(changed), f"only {sum(changed)}/{len(changed)} tensors updated"


def test_fcmae_pretraining_masks_patches_and_loss_uses_masked_pixels():
    torch.manual_seed(0)
    kw = dict(SMALL["fcmae"], out_channels=1, pretraining=True, mask_ratio=0.5)
    model = FullyConvolutionalMAE(**kw).train()
    x = torch.randn(2, 1, 4, 64, 64)
    pred, mask = model(x)
    assert pred.shape == x.shape and mask.shape == (2, 1, 1, 64, 64)
    # grid is 64 / (2 * 8) = 4 patches a side: exactly half masked per sample
    assert torch.allclose(mask.mean(dim=(1, 2, 3, 4)), torch.full((2,), 0.5))
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    loss = masked_mse_loss(pred, x, mask)
    expected = ((pred - x) ** 2).mean(1, keepdim=True)[mask.expand(2, 1, 4, 64, 64) > 0].mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert model.encoder.stem.conv3d.weight.grad is not None
    # an explicit ratio overrides the default; eval mode masks nothing
    _, mask75 = model(x, mask_ratio=0.75)
    assert mask75.mean().item() == pytest.approx(0.75)
    _, mask0 = model.eval()(x)
    assert mask0.sum() == 0


def test_masked_patches_do_not_leak_into_visible_encoder_features():
    torch.manual_seed(0)
    model = FullyConvolutionalMAE(**dict(SMALL["fcmae"], pretraining=True)).eval()
    x = torch.randn(1, 1, 4, 64, 64)
    from viscy.models.fcmae import generate_mask, upsample_mask

    mask = generate_mask(1, (4, 4), 0.5)
    x2 = x.clone()
    full = upsample_mask(mask, (64, 64))[:, :, None].expand_as(x2) > 0
    x2[full] = 100.0  # change only masked input pixels
    with torch.no_grad():
        f1 = model.encoder(x, mask)[0]
        f2 = model.encoder(x2, mask)[0]
    assert torch.allclose(f1, f2, atol=1e-5)


def test_encoder_weights_transfer_from_pretraining_to_finetuning(tmp_path):
    from tests.helpers import save_lightning_checkpoint

    torch.manual_seed(0)
    pre = FullyConvolutionalMAE(**dict(SMALL["fcmae"], out_channels=1, pretraining=True))
    fine = FullyConvolutionalMAE(**dict(SMALL["fcmae"], out_channels=2, pretraining=False))
    ckpt = save_lightning_checkpoint(pre, tmp_path / "pre.ckpt")
    copied = transfer_encoder_weights(ckpt, fine)
    assert copied and all(k.startswith("encoder.") for k in copied)
    assert len(copied) == len([k for k in fine.state_dict() if k.startswith("encoder.")])
    for key in copied:
        assert torch.equal(fine.state_dict()[key], pre.state_dict()[key])
    other = FullyConvolutionalMAE(**dict(SMALL["fcmae"], dims=(8, 16, 32, 64)))
    with pytest.raises(ModelError, match="do not transfer"):
        transfer_encoder_weights(other, fine)


def test_single_slice_fcmae_uses_the_2d_stem():
    model = FullyConvolutionalMAE(**dict(SMALL["fcmae"], in_stack_depth=1, stem_kernel_size=(1, 2, 2)))
    model(torch.randn(1, 1, 1, 32, 32)).sum().backward()
    assert model.encoder.stem.conv2d.weight.grad is not None
    assert model.encoder.stem.conv3d.weight.grad is None


def test_icnr_makes_pixel_shuffle_start_smooth():
    from viscy.models.blocks import icnr_

    conv = torch.nn.Conv2d(3, 8, 1)
    icnr_(conv.weight, 2)
    torch.nn.init.zeros_(conv.bias)
    out = torch.nn.functional.pixel_shuffle(conv(torch.randn(1, 3, 4, 4)), 2)
    # each 2x2 block of the shuffled output holds one value
    assert torch.equal(out[..., ::2, ::2], out[..., 1::2, 1::2])
