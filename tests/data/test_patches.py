"""Patch primitives: extraction, normalisation, seeded MONAI augmentation, foreground rejection."""

from __future__ import annotations

import numpy as np
import pytest

from viscy.config import AugmentationConfig, NormalizationConfig, PreprocessConfig, SynthConfig
from viscy.data.patches import (
    PatchSampler,
    PatchSpec,
    build_augmentation,
    denormalize,
    normalization_params,
    normalize,
)
from viscy.data.plate import Plate
from viscy.errors import DataError, ShapeError


@pytest.fixture(scope="module")
def synth_plate(tmp_path_factory, ray_local):
    from viscy.config import ForegroundMaskConfig
    from viscy.data.preprocess import run_preprocess
    from viscy.data.synth import write_synthetic_plate

    path = write_synthetic_plate(
        SynthConfig(output=tmp_path_factory.mktemp("p") / "p.zarr", cols=["1"], fovs_per_well=2, z=7, yx=(128, 160))
    )
    run_preprocess(PreprocessConfig(data_path=path, fg_mask=ForegroundMaskConfig(channel="Nuclei")), progress=False)
    return path


SPEC = PatchSpec(("Phase3D",), ("Nuclei", "Membrane"), z_window=5, yx_patch=(64, 48), target_2d=True)
NORMS = [NormalizationConfig()]


def test_normalize_round_trip_and_params(synth_plate):
    with Plate(synth_plate) as plate:
        meta = plate.normalization("A/1/0")
    params = normalization_params(meta, ["Phase3D", "Nuclei"], NORMS)
    assert params[1, 0] == pytest.approx(meta["Nuclei"]["fov_statistics"]["median"])
    assert params[1, 1] == pytest.approx(meta["Nuclei"]["fov_statistics"]["iqr"])
    mean_std = normalization_params(
        meta, ["Nuclei"], [NormalizationConfig(level="dataset_statistics", subtrahend="mean", divisor="std")]
    )
    assert mean_std[0, 0] == pytest.approx(meta["Nuclei"]["dataset_statistics"]["mean"])
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32) * 50 + 100
    np.testing.assert_allclose(denormalize(normalize(x, params), params), x, rtol=1e-5, atol=1e-3)
    # Per-group settings: channels not listed in any group stay unnormalised.
    only_phase = normalization_params(meta, ["Phase3D", "Nuclei"], [NormalizationConfig(channels=["Phase3D"])])
    assert tuple(only_phase[1]) == (0.0, 1.0)
    with pytest.raises(DataError, match="viscy preprocess"):
        normalization_params({}, ["Nuclei"], NORMS)


def test_plain_patches_are_normalised_crops(synth_plate):
    sampler = PatchSampler(synth_plate, SPEC, NORMS)
    sampler.validate(["A/1/0", "A/1/1"])
    batch = sampler.sample("A/1/0", 6, seed=3, augment=False)
    assert batch["source"].shape == (6, 1, 5, 64, 48)
    assert batch["target"].shape == (6, 2, 1, 64, 48)
    assert batch["source"].dtype == np.float32
    # Each patch is a real crop of the normalised FOV: find it in the full image.
    with Plate(synth_plate) as plate:
        full = plate.read("A/1/0", 0, [1])[0]
        params = normalization_params(plate.normalization("A/1/0"), ["Nuclei"], NORMS)
    norm_full = normalize(full[None], params)[0]
    tgt = batch["target"][0, 0, 0]
    hits = [
        (z, y, x)
        for z in range(norm_full.shape[0])
        for y in range(norm_full.shape[1] - 63)
        for x in range(norm_full.shape[2] - 47)
        if np.array_equal(norm_full[z, y : y + 64, x : x + 48], tgt)
    ]
    assert len(hits) == 1
    # Seeded: the same seed gives the same patches, another seed others.
    again = sampler.sample("A/1/0", 6, seed=3, augment=False)
    np.testing.assert_array_equal(again["source"], batch["source"])
    assert not np.array_equal(sampler.sample("A/1/0", 6, seed=4, augment=False)["source"], batch["source"])


def test_augmented_patches_are_seeded_and_joint(synth_plate):
    aug = AugmentationConfig(
        affine_prob=1.0, flip_prob=0.5, noise_prob=0.0, smooth_prob=0.0, contrast_prob=0.0, intensity_scale_prob=0.0
    )
    sampler = PatchSampler(synth_plate, SPEC, NORMS, augmentation=aug)
    a = sampler.sample("A/1/1", 4, seed=11)
    b = sampler.sample("A/1/1", 4, seed=11)
    np.testing.assert_array_equal(a["source"], b["source"])
    np.testing.assert_array_equal(a["target"], b["target"])
    assert a["source"].shape == (4, 1, 5, 64, 48) and a["target"].shape == (4, 2, 1, 64, 48)
    plain = sampler.sample("A/1/1", 4, seed=11, augment=False)
    assert not np.allclose(a["source"], plain["source"])
    assert np.isfinite(a["source"]).all() and np.isfinite(a["target"]).all()


def test_spatial_transforms_move_source_and_target_together():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    sample = {"source": img.copy(), "target": 2 * img}
    aug = AugmentationConfig(
        affine_prob=1.0,
        flip_prob=1.0,
        rot90_prob=1.0,
        contrast_prob=0,
        intensity_scale_prob=0,
        noise_prob=0,
        smooth_prob=0,
    )
    out = build_augmentation(aug, seed=5)(sample)
    # Same spatial transform on both: the target is still twice the source, voxel for voxel.
    np.testing.assert_allclose(2 * np.asarray(out["source"]), np.asarray(out["target"]), atol=1e-4)
    assert not np.allclose(np.asarray(out["target"]), sample["target"])


def test_intensity_transforms_touch_the_source_only():
    sample = {"source": np.ones((1, 1, 16, 16), np.float32), "target": np.ones((1, 1, 16, 16), np.float32)}
    aug = AugmentationConfig(affine_prob=0, flip_prob=0, rot90_prob=0, noise_prob=1.0, intensity_scale_prob=1.0)
    out = build_augmentation(aug, seed=1)(sample)
    assert not np.allclose(np.asarray(out["source"]), 1.0)
    np.testing.assert_array_equal(np.asarray(out["target"]), 1.0)


def test_foreground_rejection_and_weighting(synth_plate):
    spec = PatchSpec(("Phase3D",), ("Nuclei",), z_window=1, yx_patch=(24, 24))
    with Plate(synth_plate) as plate:
        fg = plate.read("A/1/0", 0, [0], array="fg_mask")[0]
    strict = PatchSampler(synth_plate, spec, NORMS, fg_min_fraction=0.3, fg_weighted=True)
    batch = strict.sample("A/1/0", 16, seed=2, augment=False)
    loose = PatchSampler(synth_plate, spec, NORMS).sample("A/1/0", 16, seed=2, augment=False)
    # Foreground-weighted patches see more nuclei signal than uniform ones.
    assert batch["target"].mean() > loose["target"].mean()
    assert fg.mean() < 0.9


def test_validate_names_problems(synth_plate, tmp_path):
    with pytest.raises(ShapeError, match="z_window_size"):
        PatchSampler(synth_plate, PatchSpec(("Phase3D",), ("Nuclei",), z_window=9), NORMS).validate(["A/1/0"])
    with pytest.raises(ShapeError, match="yx_patch_size"):
        PatchSampler(synth_plate, PatchSpec(("Phase3D",), ("Nuclei",), yx_patch=(512, 64)), NORMS).validate(["A/1/0"])
    from viscy.errors import ChannelNotFoundError

    with pytest.raises(ChannelNotFoundError):
        PatchSampler(synth_plate, PatchSpec(("BF",), ("Nuclei",), yx_patch=(32, 32)), NORMS).validate(["A/1/0"])
