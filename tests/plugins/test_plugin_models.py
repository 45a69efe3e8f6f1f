"""Networks of one's own named by import path or entry point: resolution, the spec contract, every error."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from viscy.errors import ModelError
from viscy.models import create_model, get_spec, model_spec, resolve_model, resolve_model_source, training_kwargs
from viscy.models.registry import (
    ModelSpec,
    canonical_name,
    list_models,
    model_label,
    register_model,
    same_model,
)

PLUGINS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def plugins_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """This folder on sys.path, as PYTHONPATH puts it there for the viscy commands and Ray workers."""
    monkeypatch.syspath_prepend(str(PLUGINS))


def test_import_path_builds_the_class_and_derives_its_spec():
    model = create_model("tiny_net:TinyNet", in_channels=2, out_channels=3)
    assert type(model).__name__ == "TinyNet" and type(model).__module__ == "tiny_net"
    assert get_spec(model) == ModelSpec("tiny_net:TinyNet", 2, 3, 1, 1, 1)
    assert sum(p.numel() for p in create_model("tiny_net:TinyNet").parameters()) < 500
    y = model(torch.randn(1, 2, 1, 20, 12))
    assert tuple(y.shape) == (1, 3, 1, 20, 12)
    # on the meta device (what config checks use): the same spec, no weights allocated
    assert model_spec("tiny_net:TinyNet", {"in_channels": 2, "out_channels": 3}) == model.spec
    # the name is kept as given (case matters in import paths) and is what a card stores
    assert resolve_model("tiny_net:TinyNet") == ("tiny_net:TinyNet", {}, None)
    assert canonical_name("tiny_net:TinyNet") == "tiny_net:TinyNet" and model_label("tiny_net:TinyNet") == "TinyNet"
    assert canonical_name("UNet2D") == "unet2d" and same_model("UNet2D", "unet2d")
    assert resolve_model_source("tiny_net:TinyNet", {}, None)[0] == "tiny_net:TinyNet"


def test_training_fills_the_data_arguments_of_a_plugin():
    shape = {"in_channels": 3, "out_channels": 1, "z_window_size": 4, "out_depth": 4}
    assert training_kwargs("tiny_net:TinyNet", {"width": 2}, False, 0.5, shape) == {
        "width": 2,
        "in_channels": 3,
        "out_channels": 1,
    }
    kwargs = training_kwargs("odd_nets:Volume", {}, False, 0.5, shape)
    assert kwargs == {"in_channels": 3, "out_channels": 1, "in_stack_depth": 4}
    assert model_spec("odd_nets:Volume", kwargs) == ModelSpec("odd_nets:Volume", 3, 1, 4, 4, 2)
    with pytest.raises(ModelError, match="no masked pre-training mode"):
        training_kwargs("tiny_net:TinyNet", {}, True, 0.5, shape)


def test_spec_declared_or_derived():
    assert get_spec(create_model("odd_nets:Declared", channels=3)) == ModelSpec("odd_nets:Declared", 3, 3, 1, 1, 4)
    # a function constructor; z_window_size argument; out_depth from the forward pass (the centre slice)
    assert get_spec(create_model("odd_nets:centre_slice", z_window_size=3)) == ModelSpec(
        "odd_nets:centre_slice", 1, 1, 3, 1, 1
    )
    # in_stack_depth argument, class attribute yx_multiple, out_depth = Z window
    model = create_model("odd_nets:Volume", in_channels=2, in_stack_depth=5)
    assert model.spec == ModelSpec("odd_nets:Volume", 2, 1, 5, 5, 2)
    assert model.training and not next(model.parameters()).is_meta  # the probe ran on a meta copy
    # **kwargs constructors take any argument
    assert create_model("odd_nets:AnyKwargs", colour="blue").options == {"colour": "blue"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("odd_nets:NoChannels", "no integer in_channels and out_channels argument"),
        ("odd_nets:WrongChannels", r"a \(1, 1, 1, 64, 96\) input gave \(1, 1, 1, 64, 96\), expected \(1, 2, Z_out"),
        ("odd_nets:Needs3D", r"forward pass of a \(1, 1, 1, 64, 96\) tensor on torch's meta device failed"),
    ],
)
def test_underivable_spec_says_what_to_add(name, expected):
    with pytest.raises(ModelError, match=expected) as err:
        create_model(name)
    message = str(err.value)
    assert "declares no spec" in message and "add a `spec` property" in message
    for field in ("in_channels=", "out_channels=", "z_window_size=", "out_depth=", "yx_multiple="):
        assert field in message
    assert f"ModelSpec(architecture={name!r}" in message


def test_bad_spec_and_non_module():
    with pytest.raises(ModelError, match="model.spec is a dict, not a viscy ModelSpec.*add a `spec` property"):
        create_model("odd_nets:BadSpec")
    with pytest.raises(ModelError, match="returned a str, not a torch.nn.Module"):
        create_model("odd_nets:not_a_module")


def test_import_errors_name_the_problem_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(
        ModelError,
        match=r"module 'no_such_pkg.nets' is not importable on this machine \(.+\); "
        r"install the package .* PYTHONPATH, on every node",
    ):
        create_model("no_such_pkg.nets:Net")
    with pytest.raises(ModelError, match=r"has no attribute 'Tiny'; it defines: TinyNet"):
        create_model("tiny_net:Tiny")
    with pytest.raises(ModelError, match="NOT_A_CONSTRUCTOR is a int, not callable"):
        create_model("odd_nets:NOT_A_CONSTRUCTOR")
    with pytest.raises(ModelError, match="not a valid import path; write package.module:Class"):
        create_model("tiny net:TinyNet")
    (tmp_path / "needs_dep.py").write_text("import not_installed_dependency\n")
    (tmp_path / "broken_net.py").write_text("raise RuntimeError('GPU driver missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ModelError,
        match="importing 'needs_dep' needs module 'not_installed_dependency', which is "
        r"not installed on this machine \(.+\); install it on every node",
    ):
        create_model("needs_dep:Net")
    with pytest.raises(ModelError, match="importing 'broken_net' raised RuntimeError: GPU driver missing"):
        create_model("broken_net:Net")


def test_unknown_name_says_what_was_tried():
    with pytest.raises(ModelError) as err:
        create_model("tiny_net.TinyNet")
    message = str(err.value)
    for tried in (
        "built-in architecture (fcmae, unet25d, unet2d, unet3d, unext2)",
        "preset (VSCyto2D",
        "entry point of group 'viscy.models'",
        "not an import path",
        "Did you mean tiny_net:TinyNet?",
        "PYTHONPATH",
    ):
        assert tried in message, message
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        resolve_model("nope")
    with pytest.raises(ModelError, match="not a valid import path"):
        resolve_model("a:b:c")


def test_register_model_is_for_this_process_only():
    assert "this process only" in register_model.__doc__ and "viscy.models" in register_model.__doc__
    with pytest.raises(ModelError, match="import path"):
        register_model("tiny_net:TinyNet")


DIST = "viscy_plugin_example-0.1.dist-info"


def _installed(root: Path, entry_points: str) -> Path:
    """A package installed the way pip leaves it: its module and a dist-info folder with entry_points.txt."""
    (root / "example_nets.py").write_text(
        textwrap.dedent("""
        from tiny_net import TinyNet as Net
    """)
    )
    dist = root / DIST
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: viscy-plugin-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[viscy.models]\n{entry_points}\n")
    return root


def test_entry_point_names_are_listed_resolved_and_stored_as_import_paths(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_installed(tmp_path, "ExampleNet = example_nets:Net\nbroken = gone.mod:Net")))
    sys.modules.pop("example_nets", None)
    assert {"examplenet", "broken", "unet2d"} <= set(list_models())
    model = create_model("examplenet", out_channels=1)
    assert type(model).__name__ == "TinyNet" and model.spec.out_channels == 1
    # the card stores the import path, so it rebuilds the model wherever the module imports
    assert canonical_name("ExampleNet") == "example_nets:Net" and same_model("ExampleNet", "example_nets:Net")
    assert resolve_model("ExampleNet")[0] == "example_nets:Net"
    assert model.spec.architecture == "example_nets:Net"
    with pytest.raises(
        ModelError,
        match=r"model 'gone.mod:Net' \(entry point 'broken' of group 'viscy.models', "
        r"package viscy-plugin-example\): module 'gone.mod' is not importable",
    ):
        create_model("broken")
    with pytest.raises(ModelError, match=r"entry point of group 'viscy.models' \(broken, examplenet\)"):
        create_model("nope")
