"""Checkpoints: VisCy's Lightning layout and plain state dicts load strictly; mismatches are ModelErrors."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY_KWARGS, tiny_kwargs
from viscy.errors import ModelError
from viscy.models import create_model, load_checkpoint
from viscy.models.checkpoint import read_state_dict

SMALL = {name: tiny_kwargs(name) for name in TINY_KWARGS}


@pytest.mark.parametrize("name", list(SMALL))
def test_lightning_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(1)
    source = create_model(name, **SMALL[name]).eval()
    # VisCy's Lightning layout, written by hand as VisCy would
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
        "epoch": 3,
        "global_step": 42,
        "pytorch-lightning_version": "2.6.6",
    }
    path = tmp_path / "epoch=3-step=42.ckpt"
    torch.save(ckpt, path)
    torch.manual_seed(2)
    loaded = create_model(name, checkpoint=path, **SMALL[name]).eval()
    spec = source.spec
    x = torch.randn(1, spec.in_channels, spec.z_window_size, 2 * spec.yx_multiple, spec.yx_multiple)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_plain_state_dict_loads(tmp_path):
    source = create_model("unet2d", **SMALL["unet2d"])
    torch.save(source.state_dict(), tmp_path / "w.pt")
    target = load_checkpoint(create_model("unet2d", **SMALL["unet2d"]), tmp_path / "w.pt")
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k])


def test_mismatch_lists_missing_and_unexpected_keys(tmp_path):
    state = create_model("unet2d", **SMALL["unet2d"]).state_dict()
    state = {f"model.{k}": v for k, v in state.items()}
    dropped = next(iter(state))
    state.pop(dropped)
    state["model.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0}, tmp_path / "bad.ckpt")
    with pytest.raises(ModelError) as err:
        create_model("unet2d", checkpoint=tmp_path / "bad.ckpt", **SMALL["unet2d"])
    msg = str(err.value)
    assert "missing keys (1)" in msg and dropped.removeprefix("model.") in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg


def test_shape_mismatch_and_unreadable_files(tmp_path):
    small = create_model("unet2d", **SMALL["unet2d"])
    torch.save(small.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelError, match="shape mismatches"):
        create_model("unet2d", checkpoint=tmp_path / "w.pt", **dict(SMALL["unet2d"], num_filters=8))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        read_state_dict(tmp_path / "junk.ckpt")
    with pytest.raises(ModelError, match="does not exist"):
        read_state_dict(tmp_path / "missing.ckpt")
    torch.save({"epoch": 1}, tmp_path / "nostate.ckpt")
    with pytest.raises(ModelError, match="no state dict"):
        read_state_dict(tmp_path / "nostate.ckpt")


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``print``: what a malicious checkpoint would do with ``os.system``."""

    def __reduce__(self):
        return (print, ("code ran while loading a checkpoint",))


def test_checkpoints_that_run_code_are_refused(tmp_path, capsys):
    from viscy.models import read_card

    model = create_model("unet2d", num_blocks=2, num_filters=4)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "payload": _RunsCodeWhenUnpickled()}, path)
    for load in (lambda: load_checkpoint(model, path), lambda: read_card(path)):
        with pytest.raises(ModelError, match="cannot read checkpoint"):
            load()
    assert "code ran" not in capsys.readouterr().out
