"""Our ``unext2``/``fcmae`` built with VisCy's kwargs have exactly VisCy's state-dict keys, shapes and sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from viscy.models import create_model, get_preset

COMPAT = Path(__file__).parents[1] / "data" / "compat"
CASES = {
    "VSCyto2D": "fcmae",
    "VSCyto3D": "unext2",
    "VSNeuromast": "unext2",
    "VSCyto3D_fcmae_z15": "fcmae",
}


def read_tsv(name: str) -> tuple[dict, dict[str, str], int, list[int], list[int]]:
    lines = (COMPAT / f"{name}_state_dict.tsv").read_text().splitlines()
    header = lines[0]
    kwargs = json.loads(header[header.index("(**") + 3 : header.index("); forward")])
    params = int(header.split("params=")[1].split(";")[0])
    shapes = header.split("forward input ")[1]
    in_shape = json.loads(shapes.split(" (B,C,Z,Y,X)")[0])
    out_shape = json.loads(shapes.split("-> output ")[1].split(";")[0])
    assert lines[1].split("\t")[:2] == ["key", "shape"]
    rows = dict(line.split("\t")[:2] for line in lines[2:] if line.strip())
    return kwargs, rows, params, in_shape, out_shape


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_matches_viscy(name):
    kwargs, rows, params, in_shape, out_shape = read_tsv(name)
    model = create_model(CASES[name], **kwargs)
    ours = {k: "x".join(map(str, v.shape)) for k, v in model.state_dict().items()}
    assert sorted(set(rows) - set(ours)) == [], "keys missing from our model"
    assert sorted(set(ours) - set(rows)) == [], "keys VisCy does not have"
    assert {k: ours[k] for k in rows if ours[k] != rows[k]} == {}
    assert list(ours) and len(ours) == len(rows)
    assert sum(p.numel() for p in model.parameters()) == params
    spec = model.spec
    assert [spec.in_channels, spec.z_window_size] == in_shape[1:3]
    assert [spec.out_channels, spec.out_depth] == out_shape[1:3]
    # forward at a small YX: the declared output shape, Y and X preserved
    x = torch.randn(1, spec.in_channels, spec.z_window_size, spec.yx_multiple, spec.yx_multiple)
    with torch.no_grad():
        y = model.eval()(x)
    assert list(y.shape) == [1, out_shape[1], out_shape[2], spec.yx_multiple, spec.yx_multiple]


@pytest.mark.parametrize("name", ["VSCyto2D", "VSCyto3D", "VSNeuromast"])
def test_presets_use_viscy_kwargs(name):
    kwargs, *_ = read_tsv(name)
    preset = get_preset(name)
    assert preset.architecture == CASES[name]
    assert preset.kwargs == kwargs
    assert preset.source_channels == ["Phase3D"]
    assert preset.target_channels == ["Nuclei", "Membrane"]
    assert preset.normalization == [{
        "channels": ["Phase3D"],
        "level": "fov_statistics",
        "subtrahend": "median",
        "divisor": "iqr",
    }]
    assert preset.z_window_size == kwargs["in_stack_depth"]
