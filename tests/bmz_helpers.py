"""bioimage.io packages made the way other tools make them: with ``bioimageio.spec`` alone, not viscy's exporter.

The network is a small 2D convolution net defined here (not in viscy), with axes ``batch, channel, y, x`` (no z),
per-image zero-mean/unit-variance preprocessing computed by the consumer, and ONNX weights (plus the same
weights as a ``pytorch_state_dict`` whose architecture is a file inside the package).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ARCHITECTURE = '''
import torch
from torch import nn


class TwoLayerNet(nn.Module):
    """conv 3x3 -> ReLU -> conv 3x3, any size (padding 1)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, hidden: int = 6):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(hidden, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
'''
MIN, STEP, HALO = 16, 8, 4


def _net(root: Path) -> Any:
    import importlib.util

    path = root / "two_layer_net.py"
    path.write_text(ARCHITECTURE)
    spec = importlib.util.spec_from_file_location("two_layer_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch

    torch.manual_seed(3)
    return module.TwoLayerNet().eval(), path


def foreign_description(root: Path, input_channel: str = "Phase3D", extra_input_axes: list | None = None) -> Any:
    """The spec 0.5 description of a 2D package (files written into ``root``); ``extra_input_axes`` for refusals."""
    import torch
    from bioimageio.spec.model import v0_5 as bmz
    from torch.export import Dim

    root.mkdir(parents=True, exist_ok=True)
    net, arch_file = _net(root)
    torch.save(net.state_dict(), root / "weights.pt")
    with torch.no_grad():
        program = torch.onnx.export(
            net, (torch.randn(2, 1, 32, 40),), dynamo=True, input_names=["raw"], output_names=["stains"],
            dynamic_shapes=({0: Dim("b", min=1, max=64), 2: Dim("y", min=8, max=4096), 3: Dim("x", min=8, max=4096)},),
            opset_version=18, verbose=False,
        )
    program.save(str(root / "weights.onnx"))
    rng = np.random.default_rng(0)
    test_input = (rng.random((1, 1, 48, 56)) * 500 + 100).astype(np.float32)
    norm = (test_input - test_input.mean(axis=(2, 3), keepdims=True)) / (test_input.std(axis=(2, 3), keepdims=True)
                                                                        + 1e-6)
    with torch.no_grad():
        test_output = net(torch.from_numpy(norm)).numpy()
    np.save(root / "in.npy", test_input)
    np.save(root / "out.npy", test_output)
    (root / "README.md").write_text("# Two-layer net\n\nA test package.\n\n# Validation\n\nNone.\n")
    size = bmz.ParameterizedSize(min=MIN, step=STEP)
    inp = bmz.InputTensorDescr(
        id=bmz.TensorId("raw"),
        axes=[bmz.BatchAxis(), bmz.ChannelAxis(channel_names=[bmz.Identifier(input_channel)]),
              bmz.SpaceInputAxis(id=bmz.AxisId("y"), size=size), bmz.SpaceInputAxis(id=bmz.AxisId("x"), size=size),
              *(extra_input_axes or [])],
        test_tensor=bmz.FileDescr(source=root / "in.npy"),
        data=bmz.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[bmz.ZeroMeanUnitVarianceDescr(kwargs=bmz.ZeroMeanUnitVarianceKwargs(
            axes=[bmz.AxisId("y"), bmz.AxisId("x")]))],
    )

    def out_axis(axis: str) -> Any:
        ref = bmz.SizeReference(tensor_id=bmz.TensorId("raw"), axis_id=bmz.AxisId(axis))
        return bmz.SpaceOutputAxisWithHalo(id=bmz.AxisId(axis), halo=HALO, size=ref)

    out = bmz.OutputTensorDescr(
        id=bmz.TensorId("stains"),
        axes=[bmz.BatchAxis(), bmz.ChannelAxis(channel_names=[bmz.Identifier("nuc"), bmz.Identifier("mem")]),
              out_axis("y"), out_axis("x")],
        test_tensor=bmz.FileDescr(source=root / "out.npy"),
        data=bmz.IntervalOrRatioDataDescr(type="float32"),
    )
    torch_version = bmz.Version(torch.__version__.split("+")[0])
    from bioimageio.spec import ValidationContext

    # a refused layout's test tensors do not match its axes: describe it without reading them
    with ValidationContext(perform_io_checks=not extra_input_axes):
        return _model_descr(bmz, root, inp, out, torch_version, arch_file)


def _model_descr(bmz: Any, root: Path, inp: Any, out: Any, torch_version: Any, arch_file: Path) -> Any:
    return bmz.ModelDescr(
        name="Two-layer test net",
        description="A package built with bioimageio.spec alone, for viscy's import tests.",
        authors=[bmz.Author(name="Test Author")],
        cite=[bmz.CiteEntry(text="A citation", doi=bmz.Doi("10.7554/eLife.55502"))],
        license=bmz.LicenseId("MIT"),
        documentation=bmz.FileDescr(source=root / "README.md"),
        inputs=[inp],
        outputs=[out],
        weights=bmz.WeightsDescr(
            pytorch_state_dict=bmz.PytorchStateDictWeightsDescr(
                source=root / "weights.pt", pytorch_version=torch_version,
                architecture=bmz.ArchitectureFromFileDescr(source=arch_file, callable=bmz.Identifier("TwoLayerNet"),
                                                           kwargs={}),
            ),
            onnx=bmz.OnnxWeightsDescr(source=root / "weights.onnx", opset_version=18, parent="pytorch_state_dict"),
        ),
    )


def foreign_package(root: Path, input_channel: str = "Phase3D") -> Path:
    """:func:`foreign_description` saved as ``root/two_layer.zip`` with ``bioimageio.spec``."""
    from bioimageio.spec import save_bioimageio_package

    descr = foreign_description(root / "files", input_channel)
    return save_bioimageio_package(descr, output_path=root / "two_layer.zip")


def core_prediction(package: Path, image: np.ndarray) -> np.ndarray:
    """bioimageio.core's own prediction of a ``(Y, X)`` image with the package's ONNX weights (a package of one
    input channel, and one Z slice where it has a z axis), ``(C, Y, X)``."""
    from bioimageio.core import create_prediction_pipeline, predict

    from viscy.models.bioimageio import load_package

    descr = load_package(package)
    pipeline = create_prediction_pipeline(descr, weights_format="onnx", devices=["CPUExecutionProvider"])
    axes = [str(a.id) for a in descr.inputs[0].axes]
    batch = image.reshape((1,) * (len(axes) - 2) + image.shape).astype(np.float32)  # batch, channel (z) of size 1
    out = predict(model=pipeline, inputs={str(descr.inputs[0].id): batch})
    data = out.members[str(descr.outputs[0].id)].data
    return np.asarray(data.values).reshape(data.sizes["channel"], *image.shape)


def hand_made_run(root: Path) -> Path:
    """A training run as ``viscy train`` leaves one, without training: a preprocessed iohub plate, an untrained
    2D U-Net saved with its card as ``best_model.pt``, the run's ``viscy_config.yaml`` and ``run_info.json``."""
    import json

    import yaml

    from tests.conftest import write_iohub_plate
    from viscy.data.config import PreprocessConfig
    from viscy.data.preprocess import run_preprocess
    from viscy.models import create_model, get_spec
    from viscy.models.card import ModelCard
    from viscy.models.checkpoint import save_model

    plate = write_iohub_plate(root / "plate.zarr", shape=(1, 3, 3, 96, 112),
                              positions=(("A", "1", "0"), ("A", "2", "0")))
    run_preprocess(PreprocessConfig(data_path=plate, grid_spacing=1), progress=False)
    kwargs = {"in_channels": 1, "out_channels": 2, "num_blocks": 2, "num_filters": 4}
    net = create_model("unet2d", **kwargs)
    norm = [{"channels": ["Phase3D"], "level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"},
            {"channels": ["Nuclei", "Membrane"], "level": "fov_statistics", "subtrahend": "mean", "divisor": "std"}]
    card = ModelCard("unet2d", kwargs, get_spec(net), ["Phase3D"], ["Nuclei", "Membrane"], norm,
                     {"run_name": "hand", "epoch": 3, "metrics": {"val_loss": 0.5, "val_pearson_Nuclei": 0.7}})
    run = root / "runs" / "hand"
    save_model(net.state_dict(), card, run / "best_model.pt")
    (run / "viscy_config.yaml").write_text(yaml.safe_dump({"data": {"data_path": [str(plate)]},
                                                           "trainer": {"max_epochs": 4}}))
    (run / "run_info.json").write_text(json.dumps({"split": {"val": [f"{plate}::A/2/0"]}}))
    return run / "best_model.pt"
