"""``viscy predict`` end to end on a small synthetic plate: torch and ONNX, new store and append, errors, and
the segmentation stage (masks, object table, NGFF 0.4 and 0.5, append-mode ownership)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.predict.predict_helpers import check_table, read_masks
from viscy.config import ConfigError, load_config
from viscy.data.config import SynthConfig
from viscy.models.config import ModelConfig
from viscy.predict.config import PredictConfig

UNET_KW = {"in_channels": 1, "out_channels": 2, "num_blocks": 2, "num_filters": 4}
PHASE_NORM = {"level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, ray_local):
    """A preprocessed 2-FOV plate (T=2, Z=3, 60x90), a tiny unet2d checkpoint and its ONNX export."""
    import torch

    from tests.helpers import save_lightning_checkpoint
    from viscy.data.config import PreprocessConfig
    from viscy.data.preprocess import run_preprocess
    from viscy.data.synth import write_synthetic_plate
    from viscy.models import create_model
    from viscy.models.export import export_onnx, onnx_metadata

    root = tmp_path_factory.mktemp("predict")
    plate = write_synthetic_plate(
        SynthConfig(output=root / "plate.zarr", cols=["1", "2"], fovs_per_well=1, t=2, z=3, yx=(60, 90))
    )
    run_preprocess(PreprocessConfig(data_path=plate), progress=False)
    torch.manual_seed(0)
    model = create_model("unet2d", **UNET_KW).eval()
    ckpt = save_lightning_checkpoint(model, root / "unet2d.ckpt")
    meta = onnx_metadata(
        model, source_channels=["Phase3D"], target_channels=["Nuclei", "Membrane"],
        normalization=[{"channels": ["Phase3D"], **PHASE_NORM}], kwargs=UNET_KW,
    )
    onnx = export_onnx(model, root / "unet2d.onnx", example_yx=(64, 96), metadata=meta)
    return {"root": root, "plate": plate, "ckpt": ckpt, "onnx": onnx, "model": model}


def _torch_cfg(a, **kw) -> PredictConfig:
    return PredictConfig(
        data_path=[a["plate"]], model=ModelConfig(name="unet2d", kwargs=UNET_KW, checkpoint=a["ckpt"]),
        progress=False, **kw,
    )


def _read(path: Path, fov: str, channels: list[str] | None = None) -> np.ndarray:
    from iohub.ngff import open_ome_zarr

    with open_ome_zarr(path, mode="r") as store:
        pos = store[fov]
        names = list(pos.channel_names)
        idx = [names.index(c) for c in channels] if channels else list(range(len(names)))
        return np.asarray(pos["0"][:])[:, idx]


def _expected(a, fov: str) -> np.ndarray:
    """Direct computation: normalise phase with fov median/iqr, pad to 4, run the model slice by slice."""
    import torch

    from viscy.data.patches import normalization_params, normalize
    from viscy.data.plate import Plate

    plate = Plate(a["plate"])
    from viscy.data.config import NormalizationConfig

    params = normalization_params(plate.normalization(fov), ["Phase3D"], [NormalizationConfig(**PHASE_NORM)])
    t_n, _, z_n, y, x = plate.info(fov).shape
    out = np.zeros((t_n, 2, z_n, y, x), np.float32)
    for t in range(t_n):
        src = normalize(plate.read(fov, t, plate.channel_indices(["Phase3D"])).astype(np.float32), params)
        padded = np.pad(src, ((0, 0), (0, 0), (0, 0), (0, 92 - x)), mode="reflect")  # X to a multiple of 4
        for z in range(z_n):
            with torch.no_grad():
                pred = a["model"](torch.from_numpy(padded[None, :, z : z + 1].copy())).numpy()
            out[t, :, z] = pred[0, :, 0, :y, :x]
    return out


def test_torch_new_store_opens_everywhere(assets):
    from iohub.ngff import open_ome_zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from viscy.predict.run import run_predict

    out = assets["root"] / "torch.zarr"
    theirs = assets["root"] / "viscy_config.yaml"  # e.g. the demo's own config beside its outputs
    theirs.write_text("# not predict's\n")
    assert run_predict(_torch_cfg(assets, output=out)).fovs > 0
    with open_ome_zarr(assets["plate"], mode="r") as src, open_ome_zarr(out, mode="r") as dst:
        assert [n for n, _ in dst.positions()] == [n for n, _ in src.positions()]
        for (_name, p_in), (_, p_out) in zip(src.positions(), dst.positions(), strict=True):
            assert list(p_out.channel_names) == ["Nuclei_prediction", "Membrane_prediction"]
            assert p_out.scale == p_in.scale
            assert p_out["0"].shape == (2, 2, 3, 60, 90) and p_out["0"].chunks == (1, 1, 1, 60, 90)
            assert p_out.zattrs["viscy_prediction"]["complete"] is True
    np.testing.assert_allclose(_read(out, "A/1/0"), _expected(assets, "A/1/0"), rtol=1e-4, atol=1e-4)
    nodes = list(Reader(parse_url(str(out / "A" / "1" / "0")))())
    assert nodes and nodes[0].data[0].shape == (2, 2, 3, 60, 90)
    plate_nodes = list(Reader(parse_url(str(out)))())
    assert plate_nodes  # the plate itself parses as an HCS plate
    assert load_config(PredictConfig, out / "viscy_config.yaml").output == out  # its config, inside its store
    assert theirs.read_text() == "# not predict's\n"


def test_onnx_matches_torch(assets):
    from viscy.predict.run import run_predict

    out = assets["root"] / "onnx.zarr"
    cfg = PredictConfig(data_path=[assets["plate"]], onnx=assets["onnx"], output=out, progress=False, num_actors=2)
    assert run_predict(cfg).fovs > 0
    for fov in ("A/1/0", "A/2/0"):
        np.testing.assert_allclose(_read(out, fov), _expected(assets, fov), rtol=1e-4, atol=1e-4)


def test_append_mode_and_denormalize(assets):
    from viscy.data.plate import Plate
    from viscy.predict.run import run_predict

    plate = assets["root"] / "append.zarr"
    shutil.copytree(assets["plate"], plate)
    cfg = _torch_cfg(assets, denormalize=True, z_block=2)
    cfg.data_path = [plate]
    assert run_predict(cfg).fovs > 0
    p = Plate(plate)
    assert p.channel_names == ["Phase3D", "Nuclei", "Membrane", "Nuclei_prediction", "Membrane_prediction"]
    assert load_config(PredictConfig, plate / "viscy_predict" / "viscy_config.yaml").denormalize is True
    assert p.plate_attrs()["viscy_prediction"]["channels"] == ["Membrane_prediction", "Nuclei_prediction"]
    pred = _read(plate, "A/2/0", ["Nuclei_prediction", "Membrane_prediction"])
    # original channels untouched
    np.testing.assert_array_equal(_read(plate, "A/2/0", ["Phase3D"]), _read(assets["plate"], "A/2/0", ["Phase3D"]))
    # de-normalised with the targets' fov median/iqr (the default normalisation of targets)
    stats = p.normalization("A/2/0")
    ref = _expected(assets, "A/2/0")
    for c, ch in enumerate(["Nuclei", "Membrane"]):
        s = stats[ch]["fov_statistics"]
        np.testing.assert_allclose(pred[:, c], ref[:, c] * s["iqr"] + s["median"], rtol=1e-4, atol=1e-4 * s["iqr"])
    # a rerun of the same job is a no-op (everything complete); another job needs overwrite
    rerun = run_predict(cfg)
    assert rerun.fovs == 0 and rerun.skipped == len(p.positions)
    from viscy.errors import DataError

    with pytest.raises(DataError, match="overwrite"):
        run_predict(cfg.model_copy(update={"denormalize": False}))
    assert run_predict(cfg.model_copy(update={"denormalize": False, "overwrite": True})).fovs > 0
    np.testing.assert_allclose(
        _read(plate, "A/2/0", ["Nuclei_prediction", "Membrane_prediction"]), ref, rtol=1e-4, atol=1e-4
    )
    assert Plate(plate).channel_names[-2:] == ["Nuclei_prediction", "Membrane_prediction"]


def test_bad_inputs_write_nothing(assets, tmp_path):
    from viscy.errors import ChannelNotFoundError, DataError
    from viscy.predict.run import run_predict

    out = tmp_path / "bad.zarr"
    with pytest.raises(ChannelNotFoundError, match="'Nope' not found"):
        run_predict(_torch_cfg(assets, output=out, source_channels=["Nope"]))
    assert not out.exists()
    with pytest.raises(ConfigError, match="exactly one of 'model'"):
        load_config(PredictConfig, overrides={"data_path": str(assets["plate"]), "onnx": str(assets["onnx"]),
                                              "model.name": "unet2d"})
    with pytest.raises(ConfigError, match="exactly one of 'model'"):
        load_config(PredictConfig, overrides={"data_path": str(assets["plate"])})
    existing = tmp_path / "exists.zarr"
    existing.mkdir()
    (existing / "keep.txt").write_text("user data")
    before = sorted(p.stat().st_mtime_ns for p in existing.rglob("*"))
    for overwrite in (False, True):  # overwrite replaces only what viscy predict wrote
        with pytest.raises(DataError, match=f"{existing} exists and is not a prediction store viscy predict wrote"):
            run_predict(_torch_cfg(assets, output=existing, tta="rot90", overwrite=overwrite))
        assert sorted(p.stat().st_mtime_ns for p in existing.rglob("*")) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.zarr"]
    assert (existing / "keep.txt").read_text() == "user data"
    # nor an input plate (it carries predict's marker once predictions were appended to it)
    with pytest.raises(DataError, match="contains the input plate"):
        run_predict(_torch_cfg(assets, output=assets["root"], overwrite=True))
    assert (assets["plate"] / ".zattrs").is_file()
    from viscy.errors import ModelError

    with pytest.raises(ModelError, match="source_channels"):
        run_predict(_torch_cfg(assets, output=out, source_channels=["Phase3D", "Nuclei"]))
    assert not out.exists()


def test_25d_unit_z_blocks_equal_whole_stack(assets, tmp_path):
    """A 2.5D model through the actor's unit path: Z blocks give the same slices as one whole-stack unit."""
    import torch

    from viscy.data.config import NormalizationConfig
    from viscy.data.plate import Plate
    from viscy.models import create_model
    from viscy.predict.backends import TorchBackend, describe_model
    from viscy.predict.run import predict_unit
    from viscy.predict.tiling import TilingOptions
    from viscy.predict.writer import prepare_output

    kw = {"in_channels": 1, "out_channels": 2, "in_stack_depth": 3, "num_blocks": 2, "num_filters": 4}
    torch.manual_seed(1)
    ckpt = tmp_path / "u25.pt"
    torch.save(create_model("unet25d", **kw).state_dict(), ckpt)
    backend = TorchBackend(describe_model(ModelConfig(name="unet25d", kwargs=kw)), checkpoint=ckpt)
    plate = Plate(assets["plate"])
    norms = [NormalizationConfig(channels=["Phase3D"], **PHASE_NORM)]
    opts = TilingOptions(z_window_size=3, out_depth=1, yx_multiple=4)
    results = []
    for name, blocks in (("whole", [(0, 3)]), ("blocks", [(0, 2), (2, 3)])):
        target = prepare_output(plate, ["A/1/0"], tmp_path / f"{name}.zarr", ["Nuclei", "Membrane"], "fp", "create", {})
        for z in blocks:
            predict_unit(plate, "A/1/0", 1, z, backend, opts, ["Phase3D"], ["Nuclei", "Membrane"], norms, False, target)
        results.append(_read(tmp_path / f"{name}.zarr", "A/1/0"))
    # batch composition differs (3 windows vs 2 + 1), so conv sums may differ in the last bits
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-5)
    assert np.abs(results[0][1]).max() > 0 and np.all(results[0][0] == 0)  # t=1 written, t=0 untouched


def _two_plates(assets, root: Path) -> list[Path]:
    plates = [root / "in" / "p1.zarr", root / "in" / "p2.zarr"]
    for p in plates:
        shutil.copytree(assets["plate"], p)
    return plates


def test_multi_plate_overwrite_refuses_unrelated_store(assets, tmp_path):
    from viscy.errors import DataError
    from viscy.predict.run import run_predict

    plates = _two_plates(assets, tmp_path)
    out = tmp_path / "out"
    (out / "p2.zarr").mkdir(parents=True)
    (out / "p2.zarr" / "keep.txt").write_text("user data")
    cfg = _torch_cfg(assets, output=out, overwrite=True)
    cfg.data_path = plates
    with pytest.raises(DataError, match=f"{out / 'p2.zarr'} exists and is not a prediction store"):
        run_predict(cfg)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["p2.zarr", "p2.zarr/keep.txt"]
    assert (out / "p2.zarr" / "keep.txt").read_text() == "user data"


def test_replacement_is_atomic_per_store_and_resumes(assets, tmp_path, monkeypatch):
    """Two plates into one directory; a replacement cut short between its two renames, then rerun."""
    from tests.faults import InjectedFault, inject
    from viscy.errors import DataError
    from viscy.predict.run import run_predict

    out = tmp_path / "out"
    cfg = _torch_cfg(assets, output=out, positions=["A/1/0"])
    cfg.data_path = _two_plates(assets, tmp_path)
    assert run_predict(cfg).fovs == 2
    stores = [out / "p1.zarr", out / "p2.zarr"]
    old = [_read(s, "A/1/0") for s in stores]
    old_fp = [json.loads((s / ".zattrs").read_text())["viscy_prediction"]["fingerprint"] for s in stores]

    # the driver raises between moving p1.zarr aside and moving its replacement in
    new_cfg = cfg.model_copy(update={"denormalize": True, "overwrite": True})
    with monkeypatch.context() as patched:
        inject(patched, "crash_at_swap")
        with pytest.raises(InjectedFault):
            run_predict(new_cfg)
    assert sorted(p.name for p in out.iterdir()) == [
        "p1.zarr.viscy-old", "p1.zarr.viscy-partial", "p2.zarr", "p2.zarr.viscy-partial"
    ]
    np.testing.assert_array_equal(_read(out / "p1.zarr.viscy-old", "A/1/0"), old[0])
    np.testing.assert_array_equal(_read(stores[1], "A/1/0"), old[1])
    # another job without overwrite: refused, and the set-aside store still counts as the output
    with pytest.raises(DataError, match="different prediction job"):
        run_predict(cfg.model_copy(update={"tta": "flips"}))
    np.testing.assert_array_equal(_read(out / "p1.zarr.viscy-old", "A/1/0"), old[0])

    # the rerun finds both replacements complete: nothing to predict, it only swaps them in
    stats = run_predict(new_cfg)
    assert stats.units == 0 and stats.skipped == 2
    assert sorted(p.name for p in out.iterdir()) == ["p1.zarr", "p2.zarr"]
    for store, before, fp in zip(stores, old, old_fp, strict=True):
        state = json.loads((store / ".zattrs").read_text())["viscy_prediction"]
        assert state["store"] is True and state["fingerprint"] != fp
        assert json.loads((store / "A/1/0/.zattrs").read_text())["viscy_prediction"]["complete"] is True
        assert not np.allclose(_read(store, "A/1/0"), before)
        assert load_config(PredictConfig, store / "viscy_config.yaml").denormalize is True
    assert not (out / "viscy_config.yaml").exists()


def test_append_overwrite_refuses_channels_viscy_did_not_write(assets, tmp_path):
    from iohub.ngff import open_ome_zarr

    from viscy.errors import DataError
    from viscy.predict.run import run_predict

    plate = tmp_path / "user.zarr"
    shutil.copytree(assets["plate"], plate)
    with open_ome_zarr(plate, mode="r+") as store:  # the user's own channels that happen to use the names
        for _, pos in store.positions():
            for name in ("Nuclei_prediction", "Membrane_prediction"):
                pos.append_channel(name, resize_arrays=True)
            pos["0"][:, 3:] = 7.0
    cfg = _torch_cfg(assets, overwrite=True)
    cfg.data_path = [plate]
    files = {p: p.read_bytes() for p in plate.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=r"channel\(s\) \['Nuclei_prediction', 'Membrane_prediction'\] that viscy"):
        run_predict(cfg)
    assert {p: p.read_bytes() for p in plate.rglob("*") if p.is_file()} == files

    # even channels viscy wrote are refused when writing them would spill onto a neighbour
    import zarr

    zarr.open_group(str(plate), mode="r+").attrs["viscy_prediction"] = {
        "fingerprint": "x", "channels": ["Nuclei_prediction", "Membrane_prediction"]
    }
    files = {p: p.read_bytes() for p in plate.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match="not adjacent"):
        run_predict(cfg.model_copy(update={"target_channels": ["Membrane", "Nuclei"]}))
    assert {p: p.read_bytes() for p in plate.rglob("*") if p.is_file()} == files


def test_store_ownership_marker(tmp_path):
    """What counts as a prediction store: the "store" flag, or (older stores) only prediction channels."""
    import zarr

    from tests.conftest import write_iohub_plate
    from viscy.predict.writer import is_prediction_store

    plain = write_iohub_plate(tmp_path / "plain.zarr")
    two, one = (1, 2, 1, 16, 16), (1, 1, 1, 16, 16)
    legacy_input = write_iohub_plate(tmp_path / "input.zarr", two, channel_names=("Phase3D", "Nuclei_prediction"))
    legacy_store = write_iohub_plate(tmp_path / "legacy.zarr", one, channel_names=("Nuclei_prediction",))
    flagged = write_iohub_plate(tmp_path / "flagged.zarr", one, channel_names=("Phase3D",))
    for path in (legacy_input, legacy_store):
        zarr.open_group(str(path), mode="r+").attrs["viscy_prediction"] = {"fingerprint": "f", "targets": ["Nuclei"]}
    zarr.open_group(str(flagged), mode="r+").attrs["viscy_prediction"] = {"fingerprint": "f", "store": True}
    (tmp_path / "dir").mkdir()
    verdicts = {p.name: is_prediction_store(p) for p in (plain, legacy_input, legacy_store, flagged, tmp_path / "dir")}
    assert verdicts == {
        "plain.zarr": False, "input.zarr": False, "legacy.zarr": True, "flagged.zarr": True, "dir": False
    }


def test_a_linked_output_store_is_refused_before_anything_is_written(tmp_path):
    """A link to a viscy store at output (or its .viscy-old) would be swapped and deleted through: refused."""
    import zarr

    from tests.conftest import write_iohub_plate
    from viscy.data.plate import Plate
    from viscy.errors import DataError
    from viscy.predict.writer import check_output

    source = Plate(write_iohub_plate(tmp_path / "input.zarr", (1, 1, 1, 16, 16), positions=(("A", "1", "0"),)))
    store = write_iohub_plate(tmp_path / "real.zarr", (1, 1, 1, 16, 16), channel_names=("Nuclei_prediction",))
    zarr.open_group(str(store), mode="r+").attrs["viscy_prediction"] = {"fingerprint": "fp", "store": True}
    files = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    for linked in ("pred.zarr", "pred.zarr.viscy-old", "pred.zarr.viscy-partial"):
        (tmp_path / linked).symlink_to(store, target_is_directory=True)
        for overwrite in (True, False):
            with pytest.raises(DataError, match=rf"{linked} is a symbolic link .*never through a link"):
                check_output(source, ["A/1/0"], tmp_path / "pred.zarr", ["Nuclei"], "fp", overwrite)
        (tmp_path / linked).unlink()
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.zarr", "real.zarr"]


# ------------------------------------------------------------------------------------------ segmentation stage
SEGMENT = {"method": "classical", "channels": ["Nuclei"], "measure_channels": ["Phase3D"]}
MASKS = "Nuclei_prediction_masks"
COLUMNS = [
    "plate", "fov", "t", "channel", "label", "centroid_z", "centroid_y", "centroid_x", "area",
    "mean_Nuclei_prediction", "mean_Membrane_prediction", "mean_Phase3D",
]


def _masks_named(store: Path, fov: str, name: str) -> np.ndarray:
    import zarr

    return zarr.open_array(str(store / fov / "labels" / name / "0"), mode="r")[:]


def _check_table(store: Path, source: Path, fovs: list[str], objects: int) -> None:
    check_table(store, source, fovs, objects, MASKS, ["Phase3D"], COLUMNS)


def test_segment_new_store_masks_table_and_resume(assets):
    """NGFF 0.4 store, 2D segmentation of a T=2, Z=3 non-square plate: label images every NGFF reader opens,
    a table equal to the masks' objects, predictions unchanged, a rerun skipping complete FOVs."""
    import pandas as pd
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    from viscy.errors import DataError
    from viscy.predict.run import run_predict

    out = assets["root"] / "segmented.zarr"
    result = run_predict(_torch_cfg(assets, output=out, segment=SEGMENT))
    assert result.masks == [MASKS] and result.tables == [out / "viscy_objects.parquet"] and result.fovs == 2
    for fov in ("A/1/0", "A/2/0"):
        np.testing.assert_allclose(_read(out, fov), _expected(assets, fov), rtol=1e-4, atol=1e-4)
        group = out / fov / "labels" / MASKS
        attrs = json.loads((group / ".zattrs").read_text())
        assert attrs["viscy_segmentation"] == {
            "channel": "Nuclei_prediction", "method": "classical", "model": None, "diameter": None, "dims": "2d",
            "complete": True,
        }
        assert attrs["image-label"]["source"] == {"image": "../../"}
        image = json.loads((out / fov / ".zattrs").read_text())["multiscales"][0]
        assert attrs["multiscales"][0]["axes"] == image["axes"]
        assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"] == (
            image["datasets"][0]["coordinateTransformations"]
        )
        zarray = json.loads((group / "0" / ".zarray").read_text())
        assert zarray["shape"] == [2, 1, 3, 60, 90] and zarray["chunks"] == [1, 1, 1, 60, 90]
        assert zarray["dtype"] == "<i4"
        for volume in read_masks(out, fov, MASKS):  # 2D: every object lies in one slice, ids unique in the volume
            for label in np.unique(volume[volume > 0]):
                assert len(np.unique(np.nonzero(volume == label)[0])) == 1
    nodes = list(Reader(parse_url(str(out / "A" / "1" / "0")))())
    labels = [n for n in nodes if n.load(Label) is not None]
    assert [n.metadata["name"] for n in labels] == [MASKS] and labels[0].data[0].shape == (2, 1, 3, 60, 90)
    _check_table(out, assets["plate"], ["A/1/0", "A/2/0"], result.objects)
    table = pd.read_parquet(out / "viscy_objects.parquet")

    again = run_predict(_torch_cfg(assets, output=out, segment=SEGMENT))
    assert (again.fovs, again.skipped, again.objects) == (0, 2, result.objects)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "viscy_objects.parquet"), table)
    with pytest.raises(DataError, match="different prediction job"):  # another segmentation is another job
        run_predict(_torch_cfg(assets, output=out, segment={**SEGMENT, "dims": "3d"}))


def test_segment_ngff05_store_in_3d(assets, tmp_path):
    """NGFF 0.5 (zarr v3) store, 3D segmentation: the label image's metadata live in attributes.ome."""
    from viscy.predict.run import run_predict

    out = tmp_path / "v3.zarr"
    cfg = _torch_cfg(assets, output=out, ngff_version="0.5", positions=["A/2/0"], segment={**SEGMENT, "dims": "3d"})
    result = run_predict(cfg)
    labels_group = json.loads((out / "A/2/0/labels/zarr.json").read_text())
    assert labels_group["attributes"]["ome"] == {"version": "0.5", "labels": [MASKS]}
    group = json.loads((out / "A/2/0/labels" / MASKS / "zarr.json").read_text())
    ome = group["attributes"]["ome"]
    assert ome["version"] == "0.5" and ome["image-label"]["source"] == {"image": "../../"}
    image = json.loads((out / "A/2/0/zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert ome["multiscales"][0]["axes"] == image["axes"]
    assert group["attributes"]["viscy_segmentation"]["dims"] == "3d"
    assert group["attributes"]["viscy_segmentation"]["complete"] is True
    array = json.loads((out / "A/2/0/labels" / MASKS / "0" / "zarr.json").read_text())
    assert array["shape"] == [2, 1, 3, 60, 90] and array["data_type"] == "int32"
    assert array["dimension_names"] == [a["name"] for a in image["axes"]]
    _check_table(out, assets["plate"], ["A/2/0"], result.objects)


def test_segment_append_refuses_what_viscy_did_not_write(assets, tmp_path):
    """Appending: a foreign label group or table file is refused untouched; viscy's masks join the plate's
    labels (its ground truth kept) and an overwrite without segmentation drops them."""
    import zarr

    from viscy.errors import DataError
    from viscy.predict.run import run_predict

    plate = tmp_path / "plate.zarr"
    shutil.copytree(assets["plate"], plate)
    cfg = _torch_cfg(assets, segment=SEGMENT)
    cfg.data_path = [plate]
    zarr.open_group(str(plate / "A/1/0/labels" / MASKS), mode="w").attrs["note"] = "the user's own masks"
    files = {p: p.read_bytes() for p in plate.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=rf"{MASKS} exists and was not written by viscy predict"):
        run_predict(cfg)
    assert {p: p.read_bytes() for p in plate.rglob("*") if p.is_file()} == files
    shutil.rmtree(plate / "A/1/0/labels" / MASKS)
    (plate / "viscy_objects.csv").write_text("the user's table\n")
    with pytest.raises(DataError, match="viscy_objects.csv exists and was not written by viscy"):
        run_predict(cfg)
    (plate / "viscy_objects.csv").unlink()

    gt = _masks_named(plate, "A/1/0", "nuclei")
    result = run_predict(cfg)
    assert json.loads((plate / "A/1/0/labels/.zattrs").read_text())["labels"] == ["nuclei", "cells", MASKS]
    np.testing.assert_array_equal(_masks_named(plate, "A/1/0", "nuclei"), gt)
    assert json.loads((plate / ".zattrs").read_text())["viscy_prediction"]["tables"] == [
        "viscy_objects.csv", "viscy_objects.parquet"
    ]
    parts = plate / "viscy_predict" / "viscy_objects"  # each FOV's rows, kept for a resumed job
    assert sorted(p.relative_to(parts).as_posix() for p in parts.rglob("*")) == [
        "A", "A/1", "A/1/0.parquet", "A/2", "A/2/0.parquet"
    ]
    _check_table(plate, plate, ["A/1/0", "A/2/0"], result.objects)

    run_predict(cfg.model_copy(update={"segment": None, "overwrite": True}))
    assert json.loads((plate / "A/1/0/labels/.zattrs").read_text())["labels"] == ["nuclei", "cells"]
    assert not (plate / "A/1/0/labels" / MASKS).exists()
    assert not list(plate.glob("viscy_objects.*")) and not list(parts.rglob("*.parquet"))
    np.testing.assert_array_equal(_masks_named(plate, "A/1/0", "nuclei"), gt)


def test_segment_settings_are_checked_before_writing(assets, tmp_path):
    """Bad segmentation settings fail before anything is written; the fingerprint follows what changes masks."""
    from viscy.data.config import NormalizationConfig
    from viscy.errors import ChannelNotFoundError, DataError, ModelError
    from viscy.predict.config import PredictSegmentConfig
    from viscy.predict.plan import fingerprint
    from viscy.predict.run import run_predict
    from viscy.predict.segmentation import plan_segmentation

    out = tmp_path / "never.zarr"
    bad = [
        ({**SEGMENT, "channels": ["DAPI"]}, ChannelNotFoundError, "does not predict"),
        ({**SEGMENT, "measure_channels": ["GFP"]}, ChannelNotFoundError, "'GFP' not found"),
        ({**SEGMENT, "measure_channels": ["Membrane_prediction"]}, DataError, "prediction channel"),
        ({"method": "cellpose", "model": "no_such_model"}, ModelError, "unknown Cellpose model"),
    ]
    for segment, error, message in bad:
        with pytest.raises(error, match=message):
            run_predict(_torch_cfg(assets, output=out, segment=segment))
        assert not out.exists()
    evaluate_key = r"unknown key 'segment.channel'; allowed keys here: channels"  # evaluate's key, not predict's
    for overrides, message in (({"segment.channel": "Nuclei"}, evaluate_key),
                               ({"segment.gpu": True}, "num_gpus_per_actor")):
        with pytest.raises(ConfigError, match=message):
            load_config(PredictConfig, overrides={"data_path": str(assets["plate"]), "onnx": str(assets["onnx"]),
                                                  **overrides})

    # resources are the cluster's business: checked once Ray runs (the store is then resumable), before any unit
    with pytest.raises(ModelError, match=r"segmentation actors ask for 0.5 GPU\(s\) but the Ray cluster has 0"):
        run_predict(_torch_cfg(assets, output=tmp_path / "gpu.zarr", segment={**SEGMENT, "num_gpus_per_actor": 0.5}))

    cfg = _torch_cfg(assets, output=out)
    norms = [NormalizationConfig(channels=["Phase3D"])]

    def fp(**segment) -> str:
        seg = plan_segmentation(cfg.segment.model_copy(update=segment), ["Nuclei", "Membrane"])
        return fingerprint(cfg, ["Phase3D"], ["Nuclei", "Membrane"], norms, seg.key(lambda p: None))

    cfg.segment = PredictSegmentConfig(**SEGMENT)
    assert fingerprint(cfg, ["Phase3D"], ["Nuclei", "Membrane"], norms) != fp()
    assert fp() == fp(num_actors=3, num_cpus_per_actor=0.5, gpu=False)  # resources do not change the masks
    assert len({fp(), fp(diameter=9.0), fp(dims="3d"), fp(channels=["Membrane"]), fp(measure_channels=[])}) == 5


@pytest.mark.slow
def test_segment_with_cellpose(assets, random_cpsam_checkpoint):
    """The Cellpose segmenter in predict's stage (a random-weight Cellpose-SAM checkpoint: no download), on one
    64² plane: masks recorded as Cellpose's, a table equal to their objects."""
    import pandas as pd

    from viscy.data.config import PreprocessConfig
    from viscy.data.preprocess import run_preprocess
    from viscy.data.synth import write_synthetic_plate
    from viscy.predict.run import run_predict

    root = assets["root"] / "cellpose"
    plate = write_synthetic_plate(SynthConfig(output=root / "plate.zarr", cols=["1"], fovs_per_well=1, yx=(64, 64)))
    run_preprocess(PreprocessConfig(data_path=plate, grid_spacing=2), progress=False)
    segment = {**SEGMENT, "method": "cellpose", "model": str(random_cpsam_checkpoint), "diameter": 15, "gpu": False}
    out = root / "out.zarr"
    cfg = PredictConfig(data_path=[plate], model=ModelConfig(name="unet2d", kwargs=UNET_KW, checkpoint=assets["ckpt"]),
                        output=out, progress=False, segment=segment)
    result = run_predict(cfg)
    attrs = json.loads((out / "A/1/0/labels" / MASKS / ".zattrs").read_text())["viscy_segmentation"]
    assert attrs["method"] == "cellpose" and attrs["model"] == str(random_cpsam_checkpoint) and attrs["complete"]
    masks = read_masks(out, "A/1/0", MASKS)
    assert masks.shape == (1, 1, 64, 64) and masks.dtype == np.int32
    # random weights may find no object in an untrained model's prediction: the table still lists exactly the masks'
    table = pd.read_parquet(out / "viscy_objects.parquet")
    assert list(table.columns) == COLUMNS and len(table) == result.objects
    assert sorted(table.label) == np.unique(masks[masks > 0]).tolist()
