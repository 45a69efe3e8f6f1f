"""bioimage.io packages: ``viscy export --format bioimageio`` passes bioimageio.core's own model test and carries
what training knew; a package made with bioimageio.spec alone runs through ``viscy predict`` exactly as
bioimageio.core predicts it; packages viscy cannot run are refused, naming what was found."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.bmz_helpers import core_prediction, foreign_description, foreign_package, hand_made_run
from viscy import api
from viscy.errors import ModelError
from viscy.models import read_card
from viscy.models.bioimageio import is_package, load_package, read_layout, read_package_card

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return hand_made_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> tuple[Path, str]:
    """The package ``viscy export --format bioimageio`` writes from ``best_model.pt`` alone, and its console."""
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = api.export(model={"checkpoint": checkpoint}, format="bioimageio",
                            output=tmp_path_factory.mktemp("export") / "nuclei")
    return result.onnx, out.getvalue()


def test_export_writes_a_package_that_passes_bioimageio_core_and_carries_the_card(exported, checkpoint):
    from viscy.data.plate import Plate

    package, console = exported
    assert package.name == "nuclei.zip" and "bioimageio.core model test passed" in console, console
    assert "dataset statistics" in console  # training's per-FOV statistics became the plate's, and it says so
    assert "weights onnx + pytorch_state_dict" in console  # both formats passed the zoo's check before writing

    descr = load_package(package)
    (inp,), (out,) = descr.inputs, descr.outputs
    assert [str(c) for c in inp.axes[1].channel_names] == ["Phase3D"]
    assert [str(c) for c in out.axes[1].channel_names] == ["Nuclei", "Membrane"]
    assert [str(a.id) for a in inp.axes] == ["batch", "channel", "z", "y", "x"]
    y = inp.axes[3].size
    assert (y.min, y.step) == (36, 4) and out.axes[3].halo == 16  # 2-block U-Net: multiple 4, halo 16
    plate = Plate(checkpoint.parents[2] / "plate.zarr")
    stats = plate.normalization("A/2/0")
    pre = [p for p in inp.preprocessing if p.id == "fixed_zero_mean_unit_variance"][0].kwargs
    phase = stats["Phase3D"]["dataset_statistics"]
    assert (pre.mean, pre.std) == ([pytest.approx(phase["median"])], [pytest.approx(phase["iqr"])])
    post = [p for p in out.postprocessing if p.id == "scale_linear"][0].kwargs
    assert post.gain == [pytest.approx(stats[c]["dataset_statistics"]["std"]) for c in ("Nuclei", "Membrane")]
    assert post.offset == [pytest.approx(stats[c]["dataset_statistics"]["mean"]) for c in ("Nuclei", "Membrane")]
    # test tensors from the held-out FOV, uncropped, as the core test runs them
    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
        test_in = np.load(io.BytesIO(archive.read("test_input.npy")))
        readme = archive.read("README.md").decode()
        cover = archive.read("cover.png")
    assert {"weights.onnx", "weights.pt", "cover.png", "README.md", "rdf.yaml"} <= names
    raw = plate.read("A/2/0", 0, plate.channel_indices(["Phase3D"]), slice(1, 2))
    np.testing.assert_array_equal(test_in[0], raw)  # the central slice, the whole 96 x 112 (a valid size, < 256)
    assert "## Validation" in readme and "val_pearson_Nuclei" in readme and "dataset statistics" in readme
    from PIL import Image

    with Image.open(io.BytesIO(cover)) as image:
        assert image.format == "PNG" and image.size[0] == 2 * image.size[1]
    # what training knew travels: viscy reads the card of training back from the package
    assert read_package_card(package) == read_card(checkpoint)
    assert descr.config.model_extra["viscy"]["training_config"]["trainer"]["max_epochs"] == 4
    assert descr.weights.pytorch_state_dict.architecture.import_from == "viscy.models.bioimageio"
    # nothing else beside it: the package was written under a unique partial name and renamed
    assert sorted(p.name for p in package.parent.iterdir()) == ["nuclei.viscy_config.yaml", "nuclei.zip"]


def test_our_package_predicts_through_viscy_as_bioimageio_core_does(exported, tmp_path):
    """viscy predict of the held-out FOV with the package equals bioimageio.core's prediction of it (1e-4)."""
    from viscy.data.plate import Plate

    package, _ = exported
    plate_path = Path(load_package(package).config.model_extra["viscy"]["training_config"]["data"]["data_path"][0])
    api.predict(data_path=plate_path, onnx=package, positions=["A/2/0"], output=tmp_path / "p.zarr", progress=False)
    raw = Plate(plate_path).read("A/2/0", 0, [0])[0]
    with Plate(tmp_path / "p.zarr") as written:
        ours = written.read("A/2/0", 0, [0, 1])
    for z in range(raw.shape[0]):
        reference = core_prediction(package, raw[z])
        assert np.abs(ours[:, z] - reference).max() < 1e-4 * max(1.0, np.abs(reference).max())


def test_a_25d_model_exports_from_a_checkpoint_without_its_run_record(checkpoint, tmp_path):
    """A 3 -> 1 slice U-Net whose run left no run_info.json: the test tensors come from the plate's first FOV,
    and the package maps a Z window of 3 to one slice."""
    import torch
    import yaml

    from tests.helpers import tiny_kwargs
    from viscy.models import create_model, get_spec
    from viscy.models.card import ModelCard
    from viscy.models.checkpoint import save_model

    plate = checkpoint.parents[2] / "plate.zarr"
    torch.manual_seed(0)
    kwargs = tiny_kwargs("unet25d") | {"in_channels": 1, "out_channels": 1}
    net = create_model("unet25d", **kwargs)
    norm = [{"level": "dataset_statistics", "subtrahend": "mean", "divisor": "std"}]  # one group for every channel
    card = ModelCard("unet25d", kwargs, get_spec(net), ["Phase3D"], ["Nuclei"], norm, {"run_name": "x"})
    best = save_model(net.state_dict(), card, tmp_path / "x" / "best_model.pt")
    (best.parent / "viscy_config.yaml").write_text(yaml.safe_dump({"data": {"data_path": [str(plate)]}}))
    package = api.export(model={"checkpoint": best}, format="bioimageio", output=tmp_path / "z.zip").onnx
    (inp,), (out,) = load_package(package).inputs, load_package(package).outputs
    assert (inp.axes[2].size, out.axes[2].size, out.postprocessing[-1].id) == (3, 1, "ensure_dtype")
    from viscy.data.plate import Plate

    stats = Plate(plate).normalization("A/1/0")
    pre = [p for p in inp.preprocessing if p.id == "fixed_zero_mean_unit_variance"][0].kwargs
    post = [p for p in out.postprocessing if p.id == "scale_linear"][0].kwargs
    assert pre.mean == [pytest.approx(stats["Phase3D"]["dataset_statistics"]["mean"])]
    assert post.gain == [pytest.approx(stats["Nuclei"]["dataset_statistics"]["std"])]
    with zipfile.ZipFile(package) as archive:
        test_in = np.load(io.BytesIO(archive.read("test_input.npy")))
    np.testing.assert_array_equal(test_in[0], Plate(plate).read("A/1/0", 0, [0]))  # the first FOV's 3 slices


def test_a_package_made_by_bioimageio_spec_runs_through_viscy_predict_like_bioimageio_core(tmp_path):
    from tests.conftest import write_iohub_plate
    from viscy.data.plate import Plate

    package = foreign_package(tmp_path / "pkg")
    assert is_package(package) and not is_package(tmp_path)
    # a plate never preprocessed (the package normalises each image itself), two slices, other channels
    plate_path = write_iohub_plate(tmp_path / "plate.zarr", shape=(1, 2, 2, 64, 80),
                                   positions=(("A", "1", "0"), ("A", "1", "1")), channel_names=("Phase3D", "GFP"))
    result = api.predict(data_path=plate_path, onnx=package, output=tmp_path / "out.zarr", progress=False)
    assert result.channels == ["nuc_prediction", "mem_prediction"]
    plate, written = Plate(plate_path), Plate(tmp_path / "out.zarr")
    for fov in ("A/1/0", "A/1/1"):
        raw = plate.read(fov, 0, [0])[0]
        ours = written.read(fov, 0, [0, 1])
        for z in range(2):
            np.testing.assert_allclose(ours[:, z], core_prediction(package, raw[z]), atol=1e-4, rtol=1e-4)
    # a size the package does not take (min 16 + n * 8) is padded to one it takes and cropped back
    from viscy.models.bioimageio import PackageBackend

    odd = PackageBackend(package)(np.ones((1, 1, 1, 61, 77), np.float32))
    assert odd.shape == (1, 2, 1, 61, 77) and np.isfinite(odd).all()
    with pytest.raises(ModelError, match="bioimage.io package: its own pre- and postprocessing"):
        api.predict(data_path=plate_path, onnx=package, output=tmp_path / "d.zarr", denormalize=True)


def test_packages_viscy_cannot_run_are_refused_naming_what_was_found(tmp_path):
    from bioimageio.spec import ValidationContext
    from bioimageio.spec.model import v0_5 as bmz

    timed = foreign_description(tmp_path / "t", extra_input_axes=[bmz.TimeInputAxis(size=3)])
    with pytest.raises(ModelError, match=r"its input has axes \['batch', 'channel', 'y', 'x', 'time'\]"):
        read_layout(timed, "timed.zip")
    (tmp_path / "w.h5").write_bytes(b"keras")
    with ValidationContext(perform_io_checks=False):
        keras = bmz.WeightsDescr(keras_hdf5=bmz.KerasHdf5WeightsDescr(source=tmp_path / "w.h5",
                                                                      tensorflow_version=bmz.Version("2.15")))
    with pytest.raises(ModelError, match=r"has weights \['keras_hdf5'\]; viscy runs onnx, pytorch_state_dict"):
        read_layout(timed.model_copy(update={"weights": keras}), "keras.zip")
    not_a_package = tmp_path / "other.zip"
    with zipfile.ZipFile(not_a_package, "w") as archive:
        archive.writestr("notes.txt", "hello")
    assert not is_package(not_a_package)
    with pytest.raises(ModelError, match="is not a bioimage.io model package"):
        load_package(not_a_package)


def test_export_never_replaces_what_it_did_not_write_and_needs_the_plate(exported, checkpoint, tmp_path):
    import shutil

    package, _ = exported
    with pytest.raises(ModelError, match="already exists; pass --overwrite true"):
        api.export(model={"checkpoint": checkpoint}, format="bioimageio", output=package)
    theirs = tmp_path / "theirs.zip"
    shutil.copy(foreign_package(tmp_path / "pkg"), theirs)
    before = theirs.read_bytes()
    with pytest.raises(ModelError, match="was not written by `viscy export`"):
        api.export(model={"checkpoint": checkpoint}, format="bioimageio", output=theirs, overwrite=True)
    assert theirs.read_bytes() == before
    link = tmp_path / "link.zip"
    link.symlink_to(theirs)
    with pytest.raises(ModelError, match="is a link; it is left untouched"):
        api.export(model={"checkpoint": checkpoint}, format="bioimageio", output=link, overwrite=True)
    assert link.is_symlink() and theirs.read_bytes() == before
    moved = tmp_path / "moved" / "best_model.pt"
    moved.parent.mkdir()
    shutil.copy(checkpoint, moved)
    (moved.parent / "viscy_config.yaml").write_text("data: {data_path: [/nowhere/plate.zarr]}\n")
    with pytest.raises(ModelError, match="pass --data_path"):
        api.export(model={"checkpoint": moved}, format="bioimageio", output=tmp_path / "x")
    assert not (tmp_path / "x.zip").exists()


@given(minimum=st.integers(1, 300), step=st.integers(1, 64), y=st.integers(8, 5000), x=st.integers(8, 5000),
       block=st.one_of(st.none(), st.tuples(st.integers(8, 2048), st.integers(8, 2048))))
@settings(max_examples=300, deadline=None)
def test_padding_of_any_image_is_a_size_the_package_takes_and_bounded(minimum, step, y, x, block):
    """For any min + n*step package and image: the padded image is accepted as a whole or cut into accepted blocks,
    covers the image, and grows it by less than one step beyond the package's minimum (serving bounds the cost of a
    request with this before any work)."""
    from bioimageio.spec.model.v0_5 import ParameterizedSize

    from viscy.models.bioimageio import padded_yx

    size = ParameterizedSize(min=minimum, step=step)
    (py, px), blocks = padded_yx({"y": size, "x": size}, y, x, block)
    assert py >= y and px >= x
    assert py < max(y, minimum) + step and px < max(x, minimum) + step
    for n in ((py, px) if blocks is None else blocks):
        assert n >= minimum and (n - minimum) % step == 0
    if blocks is not None:
        assert blocks[0] <= py and blocks[1] <= px


def test_serving_refuses_an_image_a_package_would_pad_past_the_pixel_limit(tmp_path):
    from bioimageio.spec.model.v0_5 import ParameterizedSize

    from viscy.models.bioimageio import package_card
    from viscy.serve.codecs import PayloadError
    from viscy.serve.models import ServedModel

    package = foreign_package(tmp_path / "pkg")
    big_minimum = {"y": ParameterizedSize(min=512, step=8), "x": ParameterizedSize(min=512, step=8)}
    served = ServedModel("wide", package, package_card(package), None, big_minimum)
    served.check_padding((1, 1, 512, 512), 2**20, None)  # as it is
    with pytest.raises(PayloadError, match=r"pads an image of shape \(1, 1, 8, 131072\) to 512 x 131072"):
        served.check_padding((1, 1, 8, 131072), 2**20, None)  # 1 Mi values sent, 64 Mi after padding
