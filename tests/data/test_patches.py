"""Patch primitives: extraction, normalisation, seeded batched augmentation, foreground rejection."""

from __future__ import annotations

import numpy as np
import pytest

from viscy.data.config import AugmentationConfig, NormalizationConfig, PreprocessConfig, SynthConfig
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
    from viscy.data.config import ForegroundMaskConfig
    from viscy.data.preprocess import run_preprocess
    from viscy.data.synth import write_synthetic_plate

    path = write_synthetic_plate(
        SynthConfig(output=tmp_path_factory.mktemp("p") / "p.zarr", cols=["1"], fovs_per_well=2, z=7, yx=(128, 160))
    )
    run_preprocess(PreprocessConfig(data_path=path, fg_mask=ForegroundMaskConfig(channel="Nuclei")), progress=False)
    return path


SPEC = PatchSpec(("Phase3D",), ("Nuclei", "Membrane"), z_window_size=5, yx_patch=(64, 48), target_2d=True)
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


def test_plain_patches_carry_label_crops_at_the_target_plane(synth_plate):
    spec = PatchSpec(("Phase3D",), ("Nuclei",), z_window_size=3, yx_patch=(40, 56), target_2d=True)
    sampler = PatchSampler(synth_plate, spec, NORMS, labels=("nuclei", "cells"))
    sampler.validate(["A/1/0"])
    batch = sampler.sample("A/1/0", 2, seed=2, augment=False)
    assert batch["labels"].shape == (2, 2, 1, 40, 56) and batch["labels"].dtype == np.int32
    plain = PatchSampler(synth_plate, spec, NORMS).sample("A/1/0", 2, seed=2, augment=False)
    np.testing.assert_array_equal(plain["target"], batch["target"])  # labels change nothing else
    assert set(plain) == {"source", "target"}
    with Plate(synth_plate) as plate:
        raw = plate.read("A/1/0", 0, [1])[0]
        params = normalization_params(plate.normalization("A/1/0"), ["Nuclei"], NORMS)
        nuclei = np.asarray(plate.read("A/1/0", 0, [0], array=plate.label_key("A/1/0", "nuclei"))[0])
        t_n = plate.info("A/1/0").shape[0]
    assert t_n == 1
    norm = normalize(raw[None], params)[0]
    for k in range(2):  # each label crop sits where its target crop came from
        tgt = batch["target"][k, 0, 0]
        hits = [(z, y, x) for z in range(norm.shape[0]) for y in range(norm.shape[1] - 39)
                for x in range(norm.shape[2] - 55) if np.array_equal(norm[z, y : y + 40, x : x + 56], tgt)]
        assert len(hits) == 1
        z, y, x = hits[0]
        np.testing.assert_array_equal(batch["labels"][k, 0, 0], nuclei[z, y : y + 40, x : x + 56])
    with pytest.raises(DataError, match=r"has no label image 'nucleus' \(it has nuclei, cells\)"):
        PatchSampler(synth_plate, spec, NORMS, labels=("nucleus",)).validate(["A/1/0"])
    with pytest.raises(ValueError, match="plain"):
        PatchSampler(synth_plate, spec, NORMS, augmentation=AugmentationConfig(), labels=("nuclei",))


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


SPATIAL_ONLY = dict(contrast_prob=0, intensity_scale_prob=0, noise_prob=0, smooth_prob=0)


def _region(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, 3, 80, 96)).astype(np.float32)


def test_spatial_transforms_move_source_and_target_together():
    img = _region()
    aug = AugmentationConfig(affine_prob=1.0, flip_prob=1.0, rot90_prob=1.0, **SPATIAL_ONLY)
    origins = [(0, 0), (10, 30), (16, 48)]
    src, tgt = build_augmentation(aug, (32, 40), seed=5).spatial(img, 2 * img[:1], origins)
    assert src.shape == (3, 2, 3, 32, 40) and tgt.shape == (3, 1, 3, 32, 40)
    # Same spatial transform on both: the target is still twice the source, voxel for voxel.
    np.testing.assert_allclose(2 * src[:, :1], tgt, atol=1e-4)
    plain = np.stack([img[..., y : y + 32, x : x + 40] for y, x in origins])
    assert not np.allclose(src, plain, atol=1e-2)


def test_no_transform_resamples_the_exact_crop():
    img = _region(1)
    aug = AugmentationConfig(affine_prob=0, flip_prob=0, rot90_prob=0, **SPATIAL_ONLY)
    origins = [(0, 0), (7, 13), (48, 56)]
    src, _ = build_augmentation(aug, (32, 40), seed=0).spatial(img, img, origins)
    np.testing.assert_allclose(src, np.stack([img[..., y : y + 32, x : x + 40] for y, x in origins]), atol=1e-4)


def test_flips_and_rot90_are_exact_pixel_permutations():
    img = _region(2)
    crop = img[..., 20:52, 30:62]
    rots = [np.rot90(crop, k, axes=(-2, -1)) for k in (1, 2, 3)]
    flips = [crop[..., ::-1, :], crop[..., :, ::-1], crop[..., ::-1, ::-1]]
    for config, allowed in (
        (AugmentationConfig(affine_prob=0, flip_prob=0, rot90_prob=1.0, **SPATIAL_ONLY), rots),
        (AugmentationConfig(affine_prob=0, flip_prob=1.0, rot90_prob=0, **SPATIAL_ONLY), flips[2:]),
        (AugmentationConfig(affine_prob=0, flip_prob=0.5, rot90_prob=0, **SPATIAL_ONLY), [crop, *flips]),
    ):
        src, _ = build_augmentation(config, (32, 32), seed=3).spatial(img, img, [(20, 30)] * 12)
        for patch in src:
            assert any(np.allclose(patch, a, atol=1e-4) for a in allowed)


def _grid_sample_reference(region: np.ndarray, affines: np.ndarray, yx: tuple[int, int]) -> np.ndarray:
    """torch's bilinear ``grid_sample`` (reflection, ``align_corners=False``) at the affines' input positions."""
    import torch
    import torch.nn.functional as F

    (py, px), (h, w) = yx, region.shape[-2:]
    v, u = np.meshgrid(np.arange(py), np.arange(px), indexing="ij")
    out = []
    for affine in affines:
        x_in, y_in = (affine[:, :2] @ np.stack([u.ravel(), v.ravel()]) + affine[:, 2:]).reshape(2, py, px)
        grid = np.stack([(2 * x_in + 1) / w - 1, (2 * y_in + 1) / h - 1], axis=-1)[None].astype(np.float32)
        planes = torch.from_numpy(region.reshape(1, -1, h, w))
        sampled = F.grid_sample(planes, torch.from_numpy(grid), "bilinear", "reflection", align_corners=False)
        out.append(sampled.numpy().reshape(*region.shape[:2], py, px))
    return np.stack(out)


def test_resampling_equals_torch_grid_sample_including_the_reflected_border():
    img = _region(3)
    # Patches nearly the image's size, zoomed out: their windows reach past the border into its reflection.
    aug = AugmentationConfig(affine_prob=1.0, scale_range=(1.2, 1.6), **SPATIAL_ONLY)
    origins = [(0, 0), (16, 16), (8, 4), (0, 16)]
    yx, (h, w) = (64, 80), img.shape[-2:]
    affines = build_augmentation(aug, yx, seed=9).affines(origins, (h, w))
    corners = [a[:, :2] @ [[0, 79, 0, 79], [0, 0, 63, 63]] + a[:, 2:] for a in affines]
    assert all(c.min() < 0 or c[0].max() > w - 1 or c[1].max() > h - 1 for c in corners)
    src, _ = build_augmentation(aug, yx, seed=9).spatial(img, img[:1], origins)
    np.testing.assert_allclose(src, _grid_sample_reference(img, affines, yx), atol=2e-4)


@pytest.mark.parametrize("yx", [(32, 32), (24, 40)])
def test_whole_pixel_transforms_are_copies_equal_to_resampling(yx):
    import cv2

    from viscy.data.patches import _pixel_window

    img = _region(4)
    (py, px), (h, w) = yx, img.shape[-2:]
    turns = [np.linalg.matrix_power(np.array([[0, -1], [1, 0]]), k) for k in range(4)]
    mats = [t @ f for t in turns for f in (np.eye(2), np.diag([-1.0, 1.0]))]  # all 8 flips and turns
    copied = 0
    for mat in mats:
        ex, ey = np.abs(mat) @ [px - 1, py - 1]  # the window's extent in the input
        for x0, y0 in ((0, 0), (w - 1 - ex, h - 1 - ey), (5, 7), (w - ex, 0)):
            corner = np.array([x0, y0]) + np.where(mat @ [px - 1, py - 1] < 0, -(mat @ [px - 1, py - 1]), 0)
            affine = np.hstack([mat, corner[:, None]]).astype(np.float64)
            window = _pixel_window(affine, yx, (h, w))
            if x0 + ex >= w:
                assert window is None  # one pixel past the border: resampled, not copied
                continue
            copied += 1
            flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
            planes = [cv2.warpAffine(p, affine, (px, py), flags=flags) for p in img.reshape(-1, h, w)]
            expected = np.stack(planes).reshape(*img.shape[:2], py, px)
            np.testing.assert_allclose(window(img), expected, atol=1e-6)
    assert copied == 24
    assert _pixel_window(np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]), yx, (h, w)) is None  # half-pixel shift


def test_intensity_transforms_follow_monai_definitions():
    from monai.transforms import AdjustContrast

    x = np.random.default_rng(0).uniform(0, 3, size=(6, 1, 2, 16, 16)).astype(np.float32)
    only = dict(contrast_prob=0, intensity_scale_prob=0, noise_prob=0, smooth_prob=0)
    contrast = build_augmentation(AugmentationConfig(**{**only, "contrast_prob": 1.0}), (16, 16), seed=1).intensity(
        x.copy()
    )
    for before, after in zip(x, contrast, strict=True):
        # Some gamma in the configured range maps each patch the way MONAI's AdjustContrast does.
        gammas = np.linspace(0.8, 1.2, 401)
        errors = [np.abs(np.asarray(AdjustContrast(g)(before)) - after).max() for g in gammas]
        assert min(errors) < 2e-3
    scaled = build_augmentation(
        AugmentationConfig(**{**only, "intensity_scale_prob": 1.0}), (16, 16), seed=2
    ).intensity(x.copy())
    ratio = scaled / x
    assert np.allclose(ratio, ratio[:, :1, :1, :1, :1], rtol=1e-5) and np.all(np.abs(ratio - 1) <= 0.3 + 1e-6)
    noisy = build_augmentation(AugmentationConfig(**{**only, "noise_prob": 1.0}), (16, 16), seed=3).intensity(x.copy())
    stds = (noisy - x).reshape(6, -1).std(axis=1)
    assert np.all(stds > 0) and np.all(stds < 0.2 * 1.2)
    smooth = build_augmentation(AugmentationConfig(**{**only, "smooth_prob": 1.0}), (16, 16), seed=4).intensity(
        x.copy()
    )
    assert smooth.reshape(6, 2, -1).std(axis=2).max() < x.reshape(6, 2, -1).std(axis=2).min()


@pytest.mark.parametrize("sigmas", [(0.25, 1.0), (0.7, 0.4)])
def test_smoothing_equals_monai_gaussian_filter(sigmas):
    import torch
    from monai.networks.layers import GaussianFilter

    from viscy.data.patches import _smooth

    patch = _region(5)
    expected = GaussianFilter(2, sigma=sigmas)(torch.from_numpy(patch.reshape(1, -1, 80, 96))).numpy()
    _smooth(patch, *sigmas)
    np.testing.assert_allclose(patch, expected.reshape(patch.shape), atol=1e-5)


def test_sampler_augments_the_source_intensity_only(synth_plate):
    aug = AugmentationConfig(affine_prob=0, flip_prob=0, rot90_prob=0, noise_prob=1.0, intensity_scale_prob=1.0)
    sampler = PatchSampler(synth_plate, SPEC, NORMS, augmentation=aug)
    augmented = sampler.sample("A/1/0", 4, seed=8)
    plain = sampler.sample("A/1/0", 4, seed=8, augment=False)
    assert not np.allclose(augmented["source"], plain["source"], atol=1e-3)
    np.testing.assert_allclose(augmented["target"], plain["target"], atol=1e-4)


def test_foreground_rejection_and_weighting(synth_plate):
    spec = PatchSpec(("Phase3D",), ("Nuclei",), z_window_size=1, yx_patch=(24, 24))
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
        PatchSampler(synth_plate, PatchSpec(("Phase3D",), ("Nuclei",), z_window_size=9), NORMS).validate(["A/1/0"])
    with pytest.raises(ShapeError, match="yx_patch_size"):
        PatchSampler(synth_plate, PatchSpec(("Phase3D",), ("Nuclei",), yx_patch=(512, 64)), NORMS).validate(["A/1/0"])
    from viscy.errors import ChannelNotFoundError

    with pytest.raises(ChannelNotFoundError):
        PatchSampler(synth_plate, PatchSpec(("BF",), ("Nuclei",), yx_patch=(32, 32)), NORMS).validate(["A/1/0"])
