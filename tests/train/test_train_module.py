"""VSModule: one optimisation step on CPU, FCMAE pre-training and encoder transfer, precision fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.helpers import tiny_kwargs
from viscy.train.config import TrainerConfig
from viscy.train.module import VSModule, make_figure, resolve_precision

UNET = {"in_channels": 1, "out_channels": 2, "num_blocks": 2, "num_filters": 4}


def _batch(z: int = 1, tz: int = 1, yx: int = 32, cs: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"source": torch.randn(2, cs, z, yx, yx, generator=g), "target": torch.randn(2, 2, tz, yx, yx, generator=g)}


def test_one_training_step_changes_weights(tmp_path):
    cfg = TrainerConfig(max_epochs=2)
    module = VSModule("unet2d", UNET, ["Phase3D"], ["Nuclei", "Membrane"], cfg.model_dump(mode="json"))
    opt = module.configure_optimizers()["optimizer"]
    before = [p.detach().clone() for p in module.model.parameters()]
    loss = module._step(_batch(), validation=False)[0]
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters(), strict=True))


def test_validation_metrics_and_figure(tmp_path):
    cfg = TrainerConfig(log_every_n_epochs=1)
    module = VSModule("unet2d", UNET, ["Phase3D"], ["Nuclei", "Membrane"], cfg.model_dump(mode="json"),
                      figure_dir=str(tmp_path / "figs"))
    b = _batch()
    _, pred, target = module._step(b, validation=True)
    fig = make_figure(b["source"], target, pred, ["Phase3D"], ["Nuclei", "Membrane"])
    assert len(fig.axes) == 2 * 5
    assert sorted(module.metrics) == sorted(
        f"{m}_{c}" for m in ("pearson", "ssim", "psnr", "mae") for c in ("Nuclei", "Membrane")
    )


def test_constant_schedule():
    cfg = TrainerConfig(schedule="Constant")
    module = VSModule("unet2d", UNET, ["Phase3D"], ["Nuclei", "Membrane"], cfg.model_dump(mode="json"))
    assert isinstance(module.configure_optimizers(), torch.optim.AdamW)


def test_fcmae_pretraining_then_finetuning(tmp_path):
    kw = tiny_kwargs("fcmae") | {"out_channels": 1}
    cfg = TrainerConfig(fcmae={"pretraining": True, "mask_ratio": 0.5})
    pre = VSModule("fcmae", kw, ["Phase3D"], ["Nuclei", "Membrane"], cfg.model_dump(mode="json"))
    assert pre.model.pretraining and pre.channels == ["Phase3D"]
    pre.train()
    loss = pre._step(_batch(z=4, tz=4), validation=False)[0]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    path = tmp_path / "pre.pt"
    torch.save({f"model.{k}": v for k, v in pre.model.state_dict().items()}, path)
    ft_cfg = TrainerConfig(fcmae={"encoder_checkpoint": str(path)})
    ft = VSModule("fcmae", tiny_kwargs("fcmae"), ["Phase3D"], ["Nuclei", "Membrane"], ft_cfg.model_dump(mode="json"))
    assert not ft.model.pretraining
    key = next(k for k in ft.model.state_dict() if k.startswith("encoder.") and k.endswith("weight"))
    assert torch.equal(ft.model.state_dict()[key], pre.model.state_dict()[key])
    loss = ft._step(_batch(z=4, tz=4), validation=False)[0]
    assert torch.isfinite(loss)


def test_precision_fallback_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.warns(UserWarning, match="16-mixed"):
        assert resolve_precision("16-mixed", use_gpu=False) == "32"
    with pytest.warns(UserWarning, match="no CUDA"):
        resolve_precision("32", use_gpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16-mixed", use_gpu=False) == "bf16-mixed"
        assert resolve_precision("32", use_gpu=False) == "32"
