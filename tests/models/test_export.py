"""ONNX export: every architecture, dynamic batch/Y/X, metadata, onnxruntime parity, the CLI verb."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import yaml

from tests.helpers import TINY_KWARGS, tiny_kwargs
from viscy.errors import ModelError
from viscy.models import ModelCard, create_model, read_card
from viscy.models.export import create_ort_session, export_onnx, onnx_metadata, parity


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny model of every architecture, exported once per module."""
    out = {}
    root = tmp_path_factory.mktemp("onnx")
    for name in TINY_KWARGS:
        torch.manual_seed(0)
        kwargs = tiny_kwargs(name)
        if name == "fcmae":
            kwargs["pretraining"] = True  # returns (prediction, mask): the export keeps the prediction only
        model = create_model(name, **kwargs).eval()
        meta = onnx_metadata(model, name=f"tiny-{name}", kwargs=tiny_kwargs(name))
        out[name] = (model, export_onnx(model, root / f"{name}.onnx", metadata=meta))
    return out


@pytest.mark.parametrize("name", list(TINY_KWARGS))
def test_onnx_matches_torch_at_two_sizes(exported, name):
    model, path = exported[name]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, False, True, True]  # B, Y, X dynamic
    m = model.spec.yx_multiple
    session = create_ort_session(path, device="cpu")
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert parity(model, session, [(2 * m, 3 * m), (4 * m, m)], batch=3) <= 1e-4


@pytest.mark.parametrize("name", ["unext2", "fcmae"])
def test_metadata_describes_the_model(exported, name):
    model, path = exported[name]
    card = read_card(path)
    assert card.name == f"tiny-{name}" and card.spec == model.spec and card.spec.architecture == name
    # channel names are never invented: predict asks for them instead of looking for 'source_0'
    assert card.source_channels == [] and card.target_channels == [] and not card.names_channels
    assert card.kwargs["in_stack_depth"] == model.spec.z_window_size == card.z_window_size
    proto = onnx.load(str(path))
    assert {p.key for p in proto.metadata_props} == {"viscy.model_card", "viscy.input_layout"}


def test_preset_metadata_carries_channels_and_normalisation():
    model = create_model("VSCyto2D")
    meta = onnx_metadata(model)
    card = ModelCard.from_dict(read_card_json(meta))
    assert card.name == "VSCyto2D" and card.source_channels == ["Phase3D"] and card.spec == model.spec
    assert card.target_channels == ["Nuclei", "Membrane"] and card.normalization[0]["subtrahend"] == "median"
    assert read_card_json(meta)["format"] == "viscy-model-card/2"
    with pytest.raises(ModelError, match="channel names"):
        onnx_metadata(model, source_channels=["a", "b"])


def test_session_and_export_errors(tmp_path):
    with pytest.raises(ModelError, match="opset"):
        export_onnx(create_model("unet2d", **tiny_kwargs("unet2d")), tmp_path / "x.onnx", opset=17)
    with pytest.raises(ModelError, match="device"):
        create_ort_session(tmp_path / "x.onnx", device="tpu")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ModelError, match="cannot load"):
        create_ort_session(tmp_path / "junk.onnx", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no usable GPU"):
            create_ort_session(tmp_path / "junk.onnx", device="cuda")


def test_cli_export_from_yaml_with_checkpoint(tmp_path, capsys):
    from tests.helpers import save_lightning_checkpoint
    from viscy.cli import main

    kwargs = tiny_kwargs("unet2d")
    torch.manual_seed(3)
    model = create_model("unet2d", **kwargs).eval()
    ckpt = save_lightning_checkpoint(model, tmp_path / "last.ckpt", epoch=1, global_step=10)
    config = {
        "model": {"name": "unet2d", "kwargs": kwargs, "checkpoint": str(ckpt)},
        "output": str(tmp_path / "out" / "unet2d.onnx"),
        "example_yx": [64, 48],
    }
    (tmp_path / "export.yml").write_text(yaml.safe_dump(config))
    assert main(["export", "--config", str(tmp_path / "export.yml")]) == 0
    out = capsys.readouterr().out
    assert "parity max|diff|" in out and "unet2d.onnx" in out
    onnx_path = tmp_path / "out" / "unet2d.onnx"
    # the config sits beside the file it describes; it never replaces another command's viscy_config.yaml
    assert (tmp_path / "out" / "unet2d.viscy_config.yaml").is_file()
    assert not (tmp_path / "out" / "viscy_config.yaml").exists()
    card = read_card(onnx_path)
    assert card.spec.architecture == "unet2d" and card.kwargs["num_filters"] == 4
    # the exported weights are the checkpoint's
    session = create_ort_session(onnx_path, device="cpu")
    x = torch.randn(1, 2, 1, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], ref, atol=1e-4)


def test_cli_export_rejects_bad_input(tmp_path, capsys):
    from viscy.cli import main

    assert main(["export", "--model.name", "unet9d", "--output", str(tmp_path / "a.onnx")]) == 1  # found on use
    err = capsys.readouterr().err
    assert "unet9d" in err and "unext2" in err and "VSCyto3D" in err
    assert (
        main(
            [
                "export",
                "--model.name",
                "unet2d",
                "--model.kwargs",
                "{num_filters: 4, num_blocks: 3}",
                "--model.checkpoint",
                str(tmp_path / "missing.ckpt"),
                "--output",
                str(tmp_path / "a.onnx"),
            ]
        )
        == 1
    )
    assert "does not exist" in capsys.readouterr().err
    wrong = create_model("unet2d", num_filters=8, num_blocks=3)
    torch.save(wrong.state_dict(), tmp_path / "wrong.pt")
    args = ["export", "--model.name", "unet2d", "--model.kwargs", "{num_filters: 4, num_blocks: 3}"]
    args += ["--model.checkpoint", str(tmp_path / "wrong.pt"), "--output", str(tmp_path / "b.onnx")]
    assert main(args) == 1
    assert "shape mismatches" in capsys.readouterr().err


@pytest.mark.slow
def test_vscyto3d_sized_export(tmp_path):
    torch.manual_seed(0)
    model = create_model("VSCyto3D").eval()
    path = export_onnx(model, tmp_path / "VSCyto3D.onnx", example_yx=(64, 64))
    card = read_card(path)
    assert card.name == "VSCyto3D" and card.z_window_size == 5 and card.spec.yx_multiple == 32
    assert card.normalization == [
        {"channels": ["Phase3D"], "level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"}
    ]
    assert parity(model, path, [(64, 64), (96, 128)]) <= 1e-4


def read_card_json(meta: dict[str, str]) -> dict:
    import json

    return json.loads(meta["viscy.model_card"])


def _card(model, name: str, kwargs: dict) -> ModelCard:
    return ModelCard(
        name=name,
        kwargs=kwargs,
        spec=model.spec,
        source_channels=["BF", "DPC"],
        target_channels=["DAPI", "GFP", "RFP"],
        normalization=[
            {"channels": ["BF", "DPC"], "level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"},
            {"channels": ["DAPI"], "level": "dataset_statistics", "subtrahend": "mean", "divisor": "std"},
        ],
        training={"run_name": "r1", "epoch": 3},
    )


def test_export_of_a_self_describing_model_needs_only_the_checkpoint(tmp_path, capsys):
    from viscy.cli import main
    from viscy.models.checkpoint import save_model

    kwargs = tiny_kwargs("unet2d")  # 2 inputs, 3 outputs
    model = create_model("unet2d", **kwargs).eval()
    best = save_model(model.state_dict(), _card(model, "unet2d", kwargs), tmp_path / "run" / "best_model.pt")
    # readable by torch's safe loader, and the card survives
    torch.load(best, weights_only=True)
    assert read_card(best).target_channels == ["DAPI", "GFP", "RFP"]
    out = tmp_path / "m.onnx"
    assert main(["export", "--model.checkpoint", str(best), "--output", str(out)]) == 0
    assert "BF, DPC -> DAPI, GFP, RFP" in capsys.readouterr().out
    card = read_card(out)
    assert card.source_channels == ["BF", "DPC"] and card.target_channels == ["DAPI", "GFP", "RFP"]
    assert card.normalization[1] == {
        "channels": ["DAPI"],
        "level": "dataset_statistics",
        "subtrahend": "mean",
        "divisor": "std",
    }
    assert card.training["run_name"] == "r1" and card.spec == model.spec
    # command-line names override the card's
    out2 = tmp_path / "renamed.onnx"
    args = ["export", "--model.checkpoint", str(best), "--output", str(out2), "--target_channels", "a", "b", "c"]
    assert main(args) == 0
    assert read_card(out2).target_channels == ["a", "b", "c"]


def test_export_never_replaces_what_it_did_not_write(tmp_path, capsys):
    from viscy.cli import main
    from viscy.models.checkpoint import save_model

    kwargs = tiny_kwargs("unet2d")
    model = create_model("unet2d", **kwargs).eval()
    best = save_model(model.state_dict(), _card(model, "unet2d", kwargs), tmp_path / "best_model.pt")
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"a user's own file")
    assert main(["export", "--model.checkpoint", str(best), "--output", str(mine), "--overwrite", "true"]) == 1
    assert "not written by `viscy export`" in capsys.readouterr().err
    assert mine.read_bytes() == b"a user's own file"
    ours = tmp_path / "ours.onnx"
    assert main(["export", "--model.checkpoint", str(best), "--output", str(ours)]) == 0
    before = ours.stat().st_mtime_ns
    assert main(["export", "--model.checkpoint", str(best), "--output", str(ours)]) == 1
    assert "--overwrite true" in capsys.readouterr().err and ours.stat().st_mtime_ns == before
    assert main(["export", "--model.checkpoint", str(best), "--output", str(ours), "--overwrite", "true"]) == 0
    # a plain state dict does not say which model it is
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    assert main(["export", "--model.checkpoint", str(tmp_path / "plain.pt"), "--output", str(tmp_path / "p.onnx")]) == 1
    assert "set model.name" in capsys.readouterr().err
