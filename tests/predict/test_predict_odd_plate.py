"""``viscy preprocess`` and ``viscy predict`` with segmentation on a plate unlike the synthetic one: NGFF 0.5
(zarr v3) with a two-level ``s0``/``s1`` pyramid and chunks smaller than a plane, uint16 pixels, T=2, Z=2,
non-square 48x80 FOVs, two fields of one well, and channels ``BF`` and ``DAPI``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.predict.predict_helpers import check_table, read_masks

CHANNELS = ["BF", "DAPI"]
SHAPE = (2, 2, 2, 48, 80)  # T, C, Z, Y, X
FOVS = ["C/4/0", "C/4/1"]
SCALE = (1.0, 1.0, 1.5, 0.325, 0.325)
AXES = [
    {"name": "t", "type": "time", "unit": "second"},
    {"name": "c", "type": "channel"},
    *({"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"),
]
UNET_KW = {"in_channels": 1, "out_channels": 1, "num_blocks": 2, "num_filters": 4}
MASKS = "DAPI_prediction_masks"
COLUMNS = [
    "plate", "fov", "t", "channel", "label", "centroid_z", "centroid_y", "centroid_x", "area",
    "mean_DAPI_prediction", "mean_BF", "mean_DAPI",
]


def _pixels(seed: int) -> np.ndarray:
    """uint16 TCZYX: a bright-field background with dim discs, DAPI discs on a dark background."""
    rng = np.random.default_rng(seed)
    t_n, _, z_n, y_n, x_n = SHAPE
    yy, xx = np.mgrid[:y_n, :x_n]
    out = np.empty(SHAPE, np.uint16)
    for t in range(t_n):
        nuclei = np.zeros((y_n, x_n), bool)
        for cy, cx in rng.uniform((6, 6), (y_n - 6, x_n - 6), size=(5, 2)):
            nuclei |= (yy - cy) ** 2 + (xx - cx) ** 2 < 25
        for z in range(z_n):
            out[t, 0, z] = 30000 - 8000 * nuclei + rng.integers(0, 2000, (y_n, x_n))
            out[t, 1, z] = 400 + 50000 * nuclei + rng.integers(0, 3000, (y_n, x_n))
    return out


def write_v3_plate(path: Path) -> dict[str, np.ndarray]:
    """An NGFF 0.5 plate of ``FOVS`` (full resolution ``s0``, ``s1`` at half YX); the pixels of each FOV."""
    from viscy.data.store_writer import (
        create_v3_array,
        image_metadata,
        plate_metadata,
        write_v3_group,
        write_v3_image_groups,
    )

    write_v3_group(path, {"ome": {"version": "0.5", "plate": plate_metadata(FOVS, "odd", version="0.5")}})
    pixels = {}
    for i, fov in enumerate(FOVS):
        pixels[fov] = _pixels(i)
        image = image_metadata(AXES, SCALE, CHANNELS, "s0")
        half = [*SCALE[:3], SCALE[3] * 2, SCALE[4] * 2]
        image["multiscales"][0]["datasets"].append(
            {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": half}]}
        )
        group = write_v3_image_groups(path, fov, image, None)
        for key, data in (("s0", pixels[fov]), ("s1", pixels[fov][..., ::2, ::2])):
            chunks = (1, 1, 1, data.shape[3] // 2, data.shape[4] // 2)
            create_v3_array(group / key, data.shape, chunks, "uint16").write(data).result()
    return pixels


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory, ray_local):
    """The plate preprocessed, a BF -> DAPI unet2d with random weights in a self-describing checkpoint, and its
    prediction with classical segmentation of DAPI into an NGFF 0.4 store (which ome-zarr-py 0.10 reads)."""
    import torch

    from viscy import api
    from viscy.models import create_model, model_spec
    from viscy.models.card import ModelCard
    from viscy.models.checkpoint import save_model

    root = tmp_path_factory.mktemp("odd")
    plate = root / "odd.zarr"
    pixels = write_v3_plate(plate)
    api.preprocess(data_path=plate, grid_spacing=1)
    torch.manual_seed(0)
    card = ModelCard(
        name="unet2d", kwargs=UNET_KW, spec=model_spec("unet2d", UNET_KW), source_channels=["BF"],
        target_channels=["DAPI"],
        normalization=[{"channels": ["BF"], "level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"}],
    )
    best = save_model(create_model("unet2d", **UNET_KW).state_dict(), card, root / "best_model.pt")
    out = root / "pred.zarr"
    segment = {"method": "classical", "measure_channels": CHANNELS}
    result = api.predict(data_path=[plate], model={"checkpoint": best}, output=out, ngff_version="0.4",
                         segment=segment, progress=False)
    return plate, pixels, out, result


def test_odd_plate_predicts_and_segments(odd_run):
    """Predictions of the input's shape, masks every NGFF reader opens with the image's scale, and a table of
    every object with the means of the plate's own channels, the uint16 ones from the stored integers."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    from viscy.data.plate import Plate

    plate, pixels, out, result = odd_run
    assert (result.fovs, result.channels, result.masks) == (2, ["DAPI_prediction"], [MASKS])
    source = Plate(plate)
    assert (source.version, source.zarr_format, source.channel_names) == ("0.5", 3, CHANNELS)
    for fov in FOVS:
        raw = source.read(fov, 1, source.channel_indices(["DAPI"]))
        assert raw.dtype == np.uint16
        np.testing.assert_array_equal(raw, pixels[fov][1, 1:])
        stats = source.normalization(fov)
        assert set(stats) == set(CHANNELS)  # preprocess wrote them into the v3 store

        image = json.loads((out / fov / ".zattrs").read_text())["multiscales"][0]
        assert image["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": list(SCALE)}]
        nodes = list(Reader(parse_url(str(out / fov)))())
        assert nodes[0].data[0].shape == (2, 1, 2, 48, 80)
        labels = [n for n in nodes if n.load(Label) is not None]
        assert [n.metadata["name"] for n in labels] == [MASKS]
        mask = np.asarray(labels[0].data[0])
        assert mask.shape == (2, 1, 2, 48, 80) and mask.dtype == np.int32
        np.testing.assert_array_equal(mask[:, 0], read_masks(out, fov, MASKS))
        attrs = json.loads((out / fov / "labels" / MASKS / ".zattrs").read_text())
        assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"] == (
            image["datasets"][0]["coordinateTransformations"]
        )
        assert attrs["viscy_segmentation"]["complete"] is True
    table = check_table(out, plate, FOVS, result.objects, MASKS, CHANNELS, COLUMNS)
    assert set(table.t) == {0, 1} and set(table.plate) == {"odd.zarr"}
    assert table.mean_DAPI.min() >= 400 and table.mean_BF.max() < 32000  # raw units, not normalised ones
