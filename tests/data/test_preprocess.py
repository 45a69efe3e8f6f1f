"""``viscy preprocess``: VisCy's normalisation layout, real Ray tasks, idempotence, masks, bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_iohub_plate
from viscy.data.config import ForegroundMaskConfig, PreprocessConfig
from viscy.data.plate import Plate
from viscy.data.preprocess import STAT_KEYS, compute_statistics, fg_mask_threshold, run_preprocess
from viscy.errors import ChannelNotFoundError, DataError

VISCY_KEYS = {"mean", "std", "median", "iqr", "p1", "p5", "p95", "p99"}
FOV_LEVELS = {"dataset_statistics", "fov_statistics", "timepoint_statistics"}


def walk_like_viscy(norm: dict) -> int:
    """Read a ``normalization`` attribute the way VisCy's reader does; the number of statistics read.

    VisCy's ``_read_norm_meta`` (``HCSDataModule``, 0.4.1 and HEAD) walks channel -> level -> statistic name ->
    value, ``timepoint_statistics`` one level deeper (time point -> statistic), and turns every value into a
    float32 tensor. So an entry under a channel that is not a level of statistics fails here as it fails there
    (a number: ``AttributeError: 'float' object has no attribute 'items'``).
    """
    read = 0
    for _channel, levels in norm.items():
        for level, level_values in levels.items():
            per_t = level_values.items() if level == "timepoint_statistics" else [(None, level_values)]
            for _t, stats in per_t:
                for stat, value in stats.items():
                    assert isinstance(value, (int, float)) and not isinstance(value, bool), (level, stat, value)
                    read += 1
    return read


def _attrs(path: Path) -> dict:
    return json.loads((path / ".zattrs").read_text())


def _pixels(plate: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(plate)): p.read_bytes()
        for p in sorted(plate.rglob("*"))
        if p.is_file() and p.name[0] != "." and "viscy_preprocess" not in p.parts  # its config and log
    }


def test_statistics_values():
    v = np.arange(1, 101, dtype=np.float32)
    s = compute_statistics(v)
    assert set(s) == set(STAT_KEYS)
    assert s["median"] == pytest.approx(50.5) and s["mean"] == pytest.approx(50.5)
    assert s["iqr"] == pytest.approx(np.percentile(v, 75) - np.percentile(v, 25))
    assert s["p99_p1"] == pytest.approx(s["p99"] - s["p1"])


def test_writes_viscy_layout_and_is_idempotent(small_plate, ray_local):
    before = _pixels(small_plate)
    cfg = PreprocessConfig(data_path=small_plate, grid_spacing=4)
    summary = run_preprocess(cfg, progress=False)
    assert summary.fovs == ["A/1/0", "A/1/1", "B/2/0"] and not summary.skipped

    plate_norm = _attrs(small_plate)["normalization"]
    assert set(plate_norm) == {"Phase3D", "Nuclei", "Membrane"}
    for meta in plate_norm.values():
        assert VISCY_KEYS <= set(meta["dataset_statistics"])
    for fov in ("A/1/0", "A/1/1", "B/2/0"):
        fov_norm = _attrs(small_plate / fov)["normalization"]
        for ch in ("Phase3D", "Nuclei", "Membrane"):
            assert {"dataset_statistics", "fov_statistics", "timepoint_statistics"} <= set(fov_norm[ch])
            assert VISCY_KEYS <= set(fov_norm[ch]["fov_statistics"])
            assert fov_norm[ch]["dataset_statistics"] == plate_norm[ch]["dataset_statistics"]
    # FOV statistics match a direct computation on the same grid.
    with Plate(small_plate) as plate:
        grid = plate.read("A/1/1", 0, [1], slice(None), slice(None, None, 4), slice(None, None, 4))
    fov_stats = _attrs(small_plate / "A/1/1")["normalization"]["Nuclei"]["fov_statistics"]
    assert fov_stats["median"] == pytest.approx(float(np.median(grid)), rel=1e-6)
    # The channel scales of the fixture (Nuclei ~ 100, Membrane ~ 200) come through.
    assert plate_norm["Membrane"]["dataset_statistics"]["median"] == pytest.approx(200, abs=5)

    run_preprocess(cfg, progress=False)
    assert _attrs(small_plate)["normalization"] == plate_norm  # idempotent
    assert _pixels(small_plate) == before  # never modifies pixel data


def test_fg_mask_and_otsu_threshold(tmp_path, ray_local):
    from viscy.data.config import SynthConfig
    from viscy.data.synth import write_synthetic_plate

    path = write_synthetic_plate(SynthConfig(output=tmp_path / "s.zarr", cols=["1"], fovs_per_well=1, z=2))
    cfg = PreprocessConfig(data_path=path, fg_mask=ForegroundMaskConfig(channel="Nuclei"))
    run_preprocess(cfg, progress=False)
    with Plate(path) as plate:
        mask = plate.read("A/1/0", 0, [0], array="fg_mask")
        nuclei = plate.read("A/1/0", 0, [1])[0]
        assert mask.shape == (1, 2, 256, 256) and mask.dtype == np.uint8
        assert 0.02 < mask.mean() < 0.8
        # Foreground is where the nuclei are bright.
        assert nuclei[mask[0] > 0].mean() > 2 * nuclei[mask[0] == 0].mean()
        # the threshold is the mask's attribute, outside VisCy's normalisation layout
        threshold = _attrs(path / "A/1/0/fg_mask")["otsu_threshold"]
        assert fg_mask_threshold(plate, "A/1/0") == threshold and nuclei.min() < threshold < nuclei.max()
        assert set(plate.normalization("A/1/0")["Nuclei"]) == FOV_LEVELS
        assert not plate.has_array("A/1/0", "fg_mask.partial")


def test_written_layout_is_the_shape_viscy_reads(tmp_path, ray_local):
    """With a foreground mask, plate and every FOV hold only channel -> level -> statistic -> number."""
    from viscy.data.config import SynthConfig
    from viscy.data.synth import write_synthetic_plate

    path = write_synthetic_plate(SynthConfig(output=tmp_path / "s.zarr", yx=(128, 128), z=2))
    cfg = PreprocessConfig(data_path=path, grid_spacing=4, fg_mask=ForegroundMaskConfig(channel="Nuclei"))
    summary = run_preprocess(cfg, progress=False)
    assert len(summary.fovs) == 4
    channels = {"Phase3D", "Nuclei", "Membrane"}
    plate_norm = _attrs(path)["normalization"]
    assert set(plate_norm) == channels
    assert all(set(levels) == {"dataset_statistics", "timepoint_statistics"} for levels in plate_norm.values())
    assert walk_like_viscy(plate_norm) == 3 * 2 * len(STAT_KEYS)  # 2 levels: dataset, one time point
    for fov in summary.fovs:
        fov_norm = _attrs(path / fov)["normalization"]
        assert set(fov_norm) == channels and all(set(levels) == FOV_LEVELS for levels in fov_norm.values())
        assert walk_like_viscy(fov_norm) == 3 * 3 * len(STAT_KEYS)
        assert isinstance(_attrs(path / fov / "fg_mask")["otsu_threshold"], float)
    # the walk catches the layout earlier versions wrote, as VisCy 0.4.1 did
    fov_norm["Nuclei"]["otsu_threshold"] = 812.5
    with pytest.raises(AttributeError, match="'float' object has no attribute 'items'"):
        walk_like_viscy(fov_norm)


def test_plate_with_the_old_threshold_key_works_and_a_rerun_removes_it(tmp_path, ray_local):
    """A plate an earlier viscy preprocessed (the threshold under ``normalization``) still trains and predicts, its
    threshold is still read, and preprocessing it again (any channels) leaves VisCy's layout clean."""
    from viscy.data.config import NormalizationConfig, SynthConfig
    from viscy.data.patches import PatchSampler, PatchSpec, normalization_params
    from viscy.data.store_writer import delete_attr, write_attrs
    from viscy.data.synth import write_synthetic_plate

    path = write_synthetic_plate(SynthConfig(output=tmp_path / "s.zarr", cols=["1"], yx=(128, 128), z=3))
    cfg = PreprocessConfig(data_path=path, grid_spacing=4, fg_mask=ForegroundMaskConfig(channel="Nuclei"))
    run_preprocess(cfg, progress=False)
    fovs = ["A/1/0", "A/1/1"]
    thresholds = {fov: _attrs(path / fov / "fg_mask")["otsu_threshold"] for fov in fovs}
    for fov in fovs:  # the layout earlier versions wrote
        norm = _attrs(path / fov)["normalization"]
        norm["Nuclei"]["otsu_threshold"] = thresholds[fov]
        write_attrs(path / fov, "normalization", norm)
    delete_attr(path / "A/1/1/fg_mask", "otsu_threshold")  # found only under normalization: still read there
    with pytest.raises(AttributeError):
        walk_like_viscy(_attrs(path / "A/1/0")["normalization"])

    with Plate(path) as plate:
        assert {fov: fg_mask_threshold(plate, fov) for fov in fovs} == thresholds
        # predict's read of the statistics, and training's fg-weighted, fg-rejecting patches
        norms = [NormalizationConfig()]
        params = normalization_params(plate.normalization("A/1/1"), ["Phase3D", "Nuclei"], norms)
        assert np.isfinite(params).all() and (params[:, 1] > 0).all()
    spec = PatchSpec(("Phase3D",), ("Nuclei",), z_window_size=3, yx_patch=(32, 32), target_2d=True)
    sampler = PatchSampler(path, spec, norms, fg_min_fraction=0.1, fg_weighted=True)
    sampler.validate(fovs)
    batch = sampler.sample("A/1/1", 4, seed=0, augment=False)
    assert batch["source"].shape == (4, 1, 3, 32, 32) and np.isfinite(batch["target"]).all()

    # a rerun over other channels, without the mask, removes the old key from every channel it rewrites
    run_preprocess(PreprocessConfig(data_path=path, grid_spacing=4, channels=["Phase3D"]), progress=False)
    for group in (path, *(path / fov for fov in fovs)):
        walk_like_viscy(_attrs(group)["normalization"])
    with Plate(path) as plate:
        for fov in fovs:
            assert set(plate.normalization(fov)["Nuclei"]) == FOV_LEVELS
            # the threshold moved onto the mask where only normalization held it
            assert _attrs(path / fov / "fg_mask")["otsu_threshold"] == thresholds[fov]
            assert fg_mask_threshold(plate, fov) == thresholds[fov]


def test_bad_channel_and_patterns(small_plate, ray_local):
    with pytest.raises(ChannelNotFoundError, match="available channels"):
        run_preprocess(PreprocessConfig(data_path=small_plate, channels=["DAPI"]), progress=False)
    with pytest.raises(DataError, match="no position"):
        run_preprocess(PreprocessConfig(data_path=small_plate, positions=["Z/*"]), progress=False)
    assert "normalization" not in _attrs(small_plate)


def test_corrupt_fov_is_skipped_and_reported(tmp_path, ray_local):
    path = write_iohub_plate(tmp_path / "c.zarr", positions=(("A", "1", "0"), ("A", "1", "1"), ("B", "2", "0"),
                                                             ("B", "2", "1")))
    (path / "A/1/1/0/0/0/0/0/0").write_bytes(b"corrupt")
    truncated = path / "B/2/1/0/0/2/1/0/0"  # a real Blosc chunk cut in half, as an interrupted copy leaves it
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    summary = run_preprocess(PreprocessConfig(data_path=path), progress=False)
    assert summary.fovs == ["A/1/0", "B/2/0"]
    assert set(summary.skipped) == {"A/1/1", "B/2/1"}
    for fov in ("A/1/1", "B/2/1"):
        # the read engine's own words (tensorstore: "Invalid blosc-compressed data"; zarr: "blosc decompression")
        assert "blosc" in summary.skipped[fov].lower() and "re-copy" in summary.skipped[fov]
        assert "normalization" not in _attrs(path / fov)


def test_sparse_grid_warns_with_a_better_spacing(tmp_path, ray_local):
    from viscy.data.config import SynthConfig
    from viscy.data.synth import write_synthetic_plate

    path = write_synthetic_plate(SynthConfig(output=tmp_path / "s.zarr", yx=(256, 256), cols=["1"]))
    with pytest.warns(UserWarning, match=r"grid_spacing 32 samples only 64 pixels .* use --grid_spacing 4"):
        run_preprocess(PreprocessConfig(data_path=path, channels=["Nuclei"]), progress=False)
    coarse = Plate(path).position_attrs("A/1/0")["normalization"]["Nuclei"]["fov_statistics"]["std"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        run_preprocess(PreprocessConfig(data_path=path, channels=["Nuclei"], grid_spacing=4), progress=False)
    fine = Plate(path).position_attrs("A/1/0")["normalization"]["Nuclei"]["fov_statistics"]["std"]
    true = Plate(path).read("A/1/0", 0, Plate(path).channel_indices(["Nuclei"]), slice(None)).std()
    assert abs(fine - true) / true < 0.05  # the 4-pixel grid is close to every pixel; 32 need not be
    assert abs(fine - true) <= abs(coarse - true)


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_fg_mask_rerun_replaces_only_a_mask_viscy_wrote(tmp_path):
    import shutil

    import zarr

    from viscy.data.preprocess import MASK_ATTR, write_fg_mask
    from viscy.data.store_writer import delete_attr

    path = write_iohub_plate(tmp_path / "p.zarr", positions=(("A", "1", "0"),))
    mask = path / "A/1/0/fg_mask"
    with Plate(path) as plate:
        write_fg_mask(plate, "A/1/0", 1, 1.0)
        assert MASK_ATTR in _attrs(mask)
        write_fg_mask(plate, "A/1/0", 1, 1.0)  # viscy's own mask is replaced
        delete_attr(mask, MASK_ATTR)  # as written before the marker: channel, otsu_threshold, sigma only
        write_fg_mask(plate, "A/1/0", 1, 1.0)
        assert MASK_ATTR in _attrs(mask) and not (path / "A/1/0/fg_mask.partial").exists()

    # a user's array named fg_mask is refused by preprocess before anything is written, and left as it was
    shutil.rmtree(mask)
    users = zarr.open_group(str(path / "A/1/0"), mode="r+").create_dataset("fg_mask", data=np.ones((1, 1, 3, 64, 64)))
    users.attrs["note"] = "hand-drawn"
    before = _files(mask)
    cfg = PreprocessConfig(data_path=path, fg_mask=ForegroundMaskConfig(channel="Nuclei"))
    refused = r"A/1/0/fg_mask exists and was not written by viscy preprocess.*Move or rename"
    with pytest.raises(DataError, match=refused):
        run_preprocess(cfg, progress=False)
    with Plate(path) as plate, pytest.raises(DataError, match="not written by viscy preprocess"):
        write_fg_mask(plate, "A/1/0", 1, 1.0)  # the task checks again
    assert _files(mask) == before
    assert "normalization" not in _attrs(path) and "normalization" not in _attrs(path / "A/1/0")
    assert not (path / "A/1/0/fg_mask.partial").exists()


@pytest.mark.parametrize("key", ["fg_mask", "fg_mask.partial"])
def test_fg_mask_is_never_replaced_through_a_link(tmp_path, key):
    from viscy.data.preprocess import write_fg_mask

    path = write_iohub_plate(tmp_path / "p.zarr", positions=(("A", "1", "0"),))
    with Plate(path) as plate:
        write_fg_mask(plate, "A/1/0", 1, 1.0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (path / "A/1/0/fg_mask").rename(elsewhere / "fg_mask")  # a mask viscy wrote, reached through a link
    (path / "A/1/0" / key).symlink_to(elsewhere / "fg_mask", target_is_directory=True)
    before = _files(elsewhere)
    cfg = PreprocessConfig(data_path=path, fg_mask=ForegroundMaskConfig(channel="Nuclei"))
    with pytest.raises(DataError, match=rf"A/1/0/{key} is a symbolic link.*Remove the link"):
        run_preprocess(cfg, progress=False)
    with Plate(path) as plate, pytest.raises(DataError, match="is a symbolic link"):
        write_fg_mask(plate, "A/1/0", 1, 1.0)
    assert _files(elsewhere) == before and (path / "A/1/0" / key).is_symlink()
