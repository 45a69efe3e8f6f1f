"""The one model card: read by ``read_card`` from checkpoints and ONNX files of this and earlier viscy versions.

The old cards and metadata below are written by hand exactly as earlier viscy wrote them (card format
``viscy-model-card/1``; ONNX files with flat ``viscy.*`` keys, with and without the card, and the first
exporter's ``{channel: spec}`` normalisation), so a change of the format cannot silently orphan them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from viscy.errors import ModelError
from viscy.models import ModelCard, ModelSpec, create_model, load_checkpoint, read_card, resolve_model_source
from viscy.models.card import CARD_FORMAT, CARD_KEY

UNET = {"in_channels": 2, "out_channels": 3, "num_blocks": 3, "num_filters": 4}
SPEC = ModelSpec("unet2d", 2, 3, 1, 1, 8)
NORM = [{"channels": ["BF", "DPC"], "level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"}]

# ``ModelCard.to_dict()`` of viscy-model-card/1, as ``viscy train`` wrote it into best_model.pt
OLD_CARD = {
    "name": "unet2d",
    "kwargs": dict(UNET, in_stack_depth=1),
    "spec": {"architecture": "unet2d", "in_channels": 2, "out_channels": 3, "in_depth": 1, "out_depth": 1,
             "yx_multiple": 8},
    "source_channels": ["BF", "DPC"],
    "target_channels": ["DAPI", "GFP", "RFP"],
    "normalization": NORM,
    "z_window_size": 1,
    "target_depth": 1,
    "training": {"run_name": "r1", "git_commit": "abc1234", "epoch": 3, "metrics": {"val_loss": 0.5}},
    "format": "viscy-model-card/1",
}


def _old_flat_props(with_names: bool) -> dict[str, str]:
    """metadata_props of an ONNX file exported by viscy with card format /1 (``onnx_metadata`` before the card)."""
    meta = {
        "model_name": "unet2d",
        "architecture": "unet2d",
        "in_channels": "2",
        "out_channels": "3",
        "in_depth": "1",
        "out_depth": "1",
        "yx_multiple": "8",
        "normalization": json.dumps(NORM if with_names else []),
        "kwargs": json.dumps(dict(UNET, in_stack_depth=1), default=str),
        "input_layout": "BCZYX",
    }
    if with_names:
        meta["source_channels"] = json.dumps(OLD_CARD["source_channels"])
        meta["target_channels"] = json.dumps(OLD_CARD["target_channels"])
        meta["model_card"] = json.dumps(OLD_CARD)
    return {"viscy." + k: v for k, v in meta.items()}


def _first_exporter_props() -> dict[str, str]:
    """metadata_props of the first viscy exporter: names always written, normalisation as ``{channel: spec}``."""
    meta = {
        "model_name": "VSCyto2D",
        "architecture": "fcmae",
        "source_channels": json.dumps(["Phase3D"]),
        "target_channels": json.dumps(["Nuclei", "Membrane"]),
        "in_channels": "1",
        "out_channels": "2",
        "in_depth": "1",
        "out_depth": "1",
        "yx_multiple": "32",
        "normalization": json.dumps({"Phase3D": {"level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"}}),
        "kwargs": json.dumps({}),
        "input_layout": "BCZYX",
    }
    return {"viscy." + k: v for k, v in meta.items()}


def _onnx_with(path: Path, props: dict[str, str]) -> Path:
    """A tiny valid ONNX file (an Identity graph) carrying ``props`` as metadata; the reader needs no weights."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", 1, 1, "Y", "X"])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 1, 1, "Y", "X"])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_card_round_trip_writes_format_2_without_depth_copies():
    card = ModelCard.from_dict(OLD_CARD)
    data = card.to_dict()
    assert data["format"] == CARD_FORMAT == "viscy-model-card/2"
    assert "z_window_size" not in data and "target_depth" not in data and "in_depth" not in data["spec"]
    assert data["spec"]["z_window_size"] == 1 and data["spec"]["out_depth"] == 1
    assert ModelCard.from_dict(data) == card
    assert card.z_window_size == card.spec.z_window_size == 1


def test_describe_names_the_architecture_only_when_it_differs():
    card = ModelCard.from_dict(OLD_CARD)
    assert card.describe().startswith("unet2d: BF, DPC -> DAPI, GFP, RFP, Z 1->1")
    plugin_spec = dataclasses.replace(SPEC, architecture="tiny_net:TinyNet")
    plugin = dataclasses.replace(card, name="tiny_net:TinyNet", spec=plugin_spec)
    assert plugin.describe().startswith("tiny_net:TinyNet: ")
    preset = dataclasses.replace(card, name="VSCyto2D")
    assert preset.describe().startswith("VSCyto2D (unet2d): ")


def test_format_1_checkpoint_card_loads(tmp_path):
    torch.manual_seed(0)
    model = create_model("unet2d", **UNET).eval()
    best = tmp_path / "best_model.pt"
    torch.save({"state_dict": model.state_dict(), CARD_KEY: OLD_CARD}, best)
    card = read_card(best)
    assert card.spec == SPEC and card.source_channels == ["BF", "DPC"] and card.normalization == NORM
    assert card.training["metrics"] == {"val_loss": 0.5}
    # the card still says how to build what the weights fit
    name, kwargs, _ = resolve_model_source(None, {}, best)
    rebuilt = create_model(name, checkpoint=best, **kwargs)
    for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_lightning_checkpoint_with_a_card_loads(tmp_path):
    model = create_model("unet2d", **UNET)
    ckpt = tmp_path / "epoch=3-step=42.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 42, CARD_KEY: OLD_CARD}, ckpt)
    assert read_card(ckpt).name == "unet2d"
    load_checkpoint(create_model("unet2d", **UNET), ckpt)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "plain.ckpt")
    assert read_card(tmp_path / "plain.ckpt") is None  # weights only: model.name is needed


@pytest.mark.parametrize("case", ["card_v1", "flat_unnamed", "first_exporter", "current"])
def test_onnx_cards_of_every_version_load(tmp_path, case):
    from viscy.models.card import onnx_metadata_props

    props = {
        "card_v1": lambda: _old_flat_props(with_names=True),
        "flat_unnamed": lambda: _old_flat_props(with_names=False),
        "first_exporter": _first_exporter_props,
        "current": lambda: onnx_metadata_props(ModelCard.from_dict(OLD_CARD)),
    }[case]()
    card = read_card(_onnx_with(tmp_path / f"{case}.onnx", props))
    if case == "first_exporter":
        assert card.name == "VSCyto2D" and card.spec == ModelSpec("fcmae", 1, 2, 1, 1, 32)
        assert card.normalization == [
            {"channels": ["Phase3D"], "level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"}
        ]
        return
    assert card.spec == SPEC and card.kwargs["num_filters"] == 4
    if case == "flat_unnamed":
        assert card.source_channels == [] and card.target_channels == [] and card.training == {}
    else:
        assert card.target_channels == ["DAPI", "GFP", "RFP"] and card.training["run_name"] == "r1"


def test_predict_and_serve_read_old_onnx_files(tmp_path):
    from viscy.predict.backends import describe_model
    from viscy.serve.models import ServedModel

    path = _onnx_with(tmp_path / "old.onnx", _old_flat_props(with_names=True))
    assert describe_model(onnx=path) == read_card(path)
    served = ServedModel.load(path)
    assert served.card.source_channels == ["BF", "DPC"] and served.opset == 18
    described = served.describe()
    assert (described["z_window_size"], described["out_depth"], described["model_name"]) == (1, 1, "unet2d")
    assert served.normalization[0].subtrahend == "median"
    unnamed = _onnx_with(tmp_path / "unnamed.onnx", _old_flat_props(with_names=False))
    with pytest.raises(ModelError, match="does not name its channels"):
        ServedModel.load(unnamed)


def test_unreadable_cards_are_clear_errors(tmp_path):
    newer = dict(OLD_CARD, format="viscy-model-card/9")
    with pytest.raises(ModelError, match="Upgrade viscy"):
        ModelCard.from_dict(newer, source="card of x")
    with pytest.raises(ModelError, match="malformed"):
        ModelCard.from_dict({k: v for k, v in OLD_CARD.items() if k != "spec"})
    with pytest.raises(ModelError, match="3 target channel names"):
        ModelCard.from_dict(dict(OLD_CARD, spec=dict(OLD_CARD["spec"], out_channels=2)))
    foreign = _onnx_with(tmp_path / "foreign.onnx", {"producer": "someone else"})
    with pytest.raises(ModelError, match="no viscy metadata"):
        read_card(foreign)
    with pytest.raises(ModelError, match="lacks 'architecture'"):
        read_card(_onnx_with(tmp_path / "cut.onnx", {"viscy.in_channels": "1"}))
    with pytest.raises(ModelError, match="does not exist"):
        read_card(tmp_path / "missing.onnx")
    # an export given where torch weights belong says where it goes instead
    with pytest.raises(ModelError, match="ONNX export, not torch weights"):
        resolve_model_source(None, {}, foreign)
