"""Tests of the synthetic HCS plate writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from iohub.ngff import open_ome_zarr
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from viscy.config import CONFIG_FILENAME
from viscy.data import synth
from viscy.data.config import SynthConfig
from viscy.data.synth import CHANNEL_NAMES, LABEL_NAMES, run_synth, write_synthetic_plate
from viscy.errors import DataError


def _small(tmp_path: Path, name: str = "plate.zarr", **kw) -> SynthConfig:
    base = dict(output=tmp_path / name, yx=(96, 96), fovs_per_well=1, cell_diameter=20.0)
    base.update(kw)
    return SynthConfig(**base)


def _read(path: Path, fov: str = "A/1/0") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open_ome_zarr(path, mode="r") as plate:
        image = plate[fov]["0"].numpy()
    group = zarr.open_group(str(path / fov), mode="r")
    return image, group["labels/nuclei/0"][:], group["labels/cells/0"][:]


@pytest.fixture(scope="module")
def default_plate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthConfig]:
    config = SynthConfig(output=tmp_path_factory.mktemp("synth") / "default.zarr")
    start = time.perf_counter()
    out = run_synth(config)
    print(f"default synthetic plate written in {time.perf_counter() - start:.2f} s")
    return out, config


@pytest.fixture(scope="module")
def plate_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = SynthConfig(
        output=tmp_path_factory.mktemp("synth3d") / "p3d.zarr",
        z=16,
        t=2,
        rows=["B"],
        cols=["3"],
        fovs_per_well=1,
        chunk_yx=128,
    )
    start = time.perf_counter()
    out = write_synthetic_plate(config)
    print(f"3D synthetic plate (z=16, t=2, 256x256) written in {time.perf_counter() - start:.2f} s")
    return out


def test_layout_shape_dtype(default_plate: tuple[Path, SynthConfig]) -> None:
    path, config = default_plate
    assert (path / CONFIG_FILENAME).is_file()
    with open_ome_zarr(path, mode="r") as plate:
        assert plate.channel_names == list(CHANNEL_NAMES)
        names = sorted(name for name, _ in plate.positions())
        assert names == ["A/1/0", "A/1/1", "A/2/0", "A/2/1"]
        pos = plate["A/2/1"]
        assert pos.array_keys() == ["0"]  # the labels group is not an image array
        img = pos["0"]
        assert img.shape == (1, 3, 1, 256, 256)
        assert img.dtype == np.float32
        assert img.chunks == (1, 1, 1, 256, 256)
        assert pos.scale == [1.0, 1.0, 1.0, 0.325, 0.325]
        data = img.numpy()
    assert np.isfinite(data).all()
    # Channels live on different intensity scales, so normalisation matters.
    phase, nuc, mem = data[0, :, 0]
    assert abs(np.median(phase)) < 0.2 and np.ptp(phase) < 2
    assert np.median(nuc) > 50 and np.median(mem) > 50
    assert not path.with_name(path.name + ".viscy-partial").exists()
    assert zarr.open_group(str(path), mode="r").attrs["viscy_synth"]["seed"] == config.seed


def test_labels_metadata_and_nesting(default_plate: tuple[Path, SynthConfig]) -> None:
    path, _ = default_plate
    group = zarr.open_group(str(path / "A/1/1"), mode="r")
    assert list(group["labels"].attrs["labels"]) == list(LABEL_NAMES)
    image_axes = group.attrs["multiscales"][0]["axes"]
    image_ds = group.attrs["multiscales"][0]["datasets"][0]
    for name in LABEL_NAMES:
        attrs = group[f"labels/{name}"].attrs.asdict()
        ms = attrs["multiscales"][0]
        assert ms["version"] == "0.4" and ms["name"] == name
        assert ms["axes"] == image_axes
        assert ms["datasets"][0]["path"] == "0"
        assert ms["datasets"][0]["coordinateTransformations"] == image_ds["coordinateTransformations"]
        assert attrs["image-label"] == {"version": "0.4", "source": {"image": "../../"}}
        arr = group[f"labels/{name}/0"]
        assert arr.shape == (1, 1, 1, 256, 256) and arr.dtype == np.int32
    _, nuclei, cells = _read(path, "A/1/1")
    assert 0.3 < (cells > 0).mean() < 0.95
    assert 0.03 < (nuclei > 0).mean() < 0.3
    inside = nuclei > 0
    assert np.array_equal(cells[inside], nuclei[inside])  # every nucleus voxel lies in its own cell
    assert len(np.unique(nuclei)) > 20


def test_membrane_on_borders(default_plate: tuple[Path, SynthConfig]) -> None:
    path, _ = default_plate
    image, _, cells = _read(path)
    mem = image[0, 2, 0]
    lab = cells[0, 0, 0]
    border = find_boundaries(lab, mode="inner") & (lab > 0)
    interior = ndi.binary_erosion(lab > 0, iterations=4) & ~ndi.binary_dilation(border, iterations=4)
    assert np.median(mem[border]) > 1.5 * np.median(mem[interior])


def test_phase_predicts_nuclei_but_is_not_a_copy(default_plate: tuple[Path, SynthConfig]) -> None:
    path, _ = default_plate
    image, _, cells = _read(path)
    phase, nuc = image[0, 0, 0], image[0, 1, 0]
    interior = ndi.binary_erosion(cells[0, 0, 0] > 0, iterations=2)
    smooth = ndi.gaussian_filter(phase, 1.5)
    r = np.corrcoef(smooth[interior], nuc[interior])[0, 1]
    assert 0.2 < r < 0.95, r
    assert np.corrcoef(phase.ravel(), nuc.ravel())[0, 1] < 0.95


def test_reproducible(tmp_path: Path) -> None:
    a = _read(write_synthetic_plate(_small(tmp_path, "a.zarr", t=2)))
    b = _read(write_synthetic_plate(_small(tmp_path, "b.zarr", t=2)))
    c = _read(write_synthetic_plate(_small(tmp_path, "c.zarr", t=2, seed=1)))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    # Seeds are per position index, so each position is independent of the others.
    x = synth.synthesize_position(_small(tmp_path), 1)
    y = synth.synthesize_position(_small(tmp_path, cols=["9", "8"]), 1)
    assert all(np.array_equal(p, q) for p, q in zip(x, y, strict=True))
    # Cells drift a little between time points.
    cells = a[2]
    assert not np.array_equal(cells[0], cells[1])
    assert (cells[0] == cells[1]).mean() > 0.7


def test_negative_seed(tmp_path: Path) -> None:
    image, _, _ = synth.synthesize_position(_small(tmp_path, seed=-3), 0)
    assert np.isfinite(image).all()


def test_3d_defocus_and_labels(plate_3d: Path) -> None:
    with open_ome_zarr(plate_3d, mode="r") as plate:
        pos = plate["B/3/0"]
        img = pos["0"]
        assert img.shape == (2, 3, 16, 256, 256)
        assert img.chunks == (1, 1, 1, 128, 128)
        assert pos.scale == [1.0, 1.0, 0.25, 0.325, 0.325]
        data = img.numpy()
    phase = data[0, 0]
    hf = [np.mean((s - ndi.gaussian_filter(s, 2.0)) ** 2) for s in phase]
    assert int(np.argmax(hf)) == phase.shape[0] // 2  # the focal plane is the middle slice
    assert hf[0] < 0.5 * max(hf) and hf[-1] < 0.5 * max(hf)

    group = zarr.open_group(str(plate_3d / "B/3/0"), mode="r")
    nuclei, cells = group["labels/nuclei/0"][:], group["labels/cells/0"][:]
    assert nuclei.shape == cells.shape == (2, 1, 16, 256, 256)
    inside = nuclei > 0
    assert inside.any() and np.array_equal(cells[inside], nuclei[inside])
    # Cells have a z extent: occupied slices differ and the top slice is (nearly) empty.
    per_slice = (cells[0, 0] > 0).mean(axis=(1, 2))
    assert per_slice.max() > 0.3 and per_slice[-1] < 0.5 * per_slice.max()
    # Nuclear fluorescence is blurred in Z and follows the nuclear labels.
    nuc = data[0, 1]
    assert nuc[inside[0, 0]].mean() > 2 * nuc[cells[0, 0] == 0].mean()


def test_labels_readable_by_ome_zarr(plate_3d: Path) -> None:
    reader_mod = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    nodes = list(reader_mod.Reader(parse_url(str(plate_3d / "B/3/0")))())
    found = {
        n.metadata.get("name"): n.data[0].shape
        for n in nodes
        if any(isinstance(s, reader_mod.Label) for s in n.specs)
    }
    assert found == {name: (2, 1, 16, 256, 256) for name in LABEL_NAMES}


def test_existing_output_is_kept(tmp_path: Path) -> None:
    config = _small(tmp_path)
    write_synthetic_plate(config)
    before = _read(config.output)
    with pytest.raises(DataError, match="--overwrite true"):
        write_synthetic_plate(config.model_copy(update={"seed": 5}))
    after = _read(config.output)
    assert all(np.array_equal(x, y) for x, y in zip(before, after, strict=True))

    write_synthetic_plate(config.model_copy(update={"seed": 5, "overwrite": True}))
    replaced = _read(config.output)
    assert not np.array_equal(before[0], replaced[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plate.zarr"]


def test_interrupted_write_leaves_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.faults import InjectedFault, inject

    config = _small(tmp_path, cols=["1", "2", "3"])
    with monkeypatch.context() as patched:
        inject(patched, "crash_synth_at_position2")
        with pytest.raises(InjectedFault, match="simulated crash"):
            write_synthetic_plate(config)
    assert list(tmp_path.iterdir()) == []

    # A failed overwrite keeps the previous plate.
    write_synthetic_plate(config)
    with monkeypatch.context() as patched:
        inject(patched, "crash_synth_at_position2")
        with pytest.raises(InjectedFault):
            write_synthetic_plate(config.model_copy(update={"overwrite": True}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plate.zarr"]
    with open_ome_zarr(config.output, mode="r") as plate:
        assert len(list(plate.positions())) == 3


def test_overwrite_replaces_only_synth_plates(tmp_path: Path) -> None:
    from tests.conftest import write_iohub_plate

    # a user's directory and a user's OME-Zarr plate: refused, byte for byte untouched
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("user data")
    user_plate = write_iohub_plate(tmp_path / "user.zarr")
    for path in (user_dir, user_plate):
        before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
        with pytest.raises(DataError, match=f"{path} exists and is not a plate viscy synth wrote"):
            write_synthetic_plate(_small(tmp_path, path.name, overwrite=True))
        assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "user.zarr"]

    # a plate viscy synth wrote carries its marker and is replaced
    config = _small(tmp_path, "synth.zarr")
    write_synthetic_plate(config)
    assert zarr.open_group(str(config.output), mode="r").attrs["viscy_synth"]["seed"] == 0
    write_synthetic_plate(config.model_copy(update={"seed": 7, "overwrite": True}))
    assert zarr.open_group(str(config.output), mode="r").attrs["viscy_synth"]["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "synth.zarr", "user.zarr"]


def test_interrupted_swap_restores_the_old_plate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.faults import InjectedFault, inject

    config = _small(tmp_path)
    write_synthetic_plate(config)
    before = _read(config.output)
    with monkeypatch.context() as patched:
        inject(patched, "crash_at_swap")
        with pytest.raises(InjectedFault):
            write_synthetic_plate(config.model_copy(update={"seed": 3, "overwrite": True}))
    # cut short between the two renames: the old plate waits whole beside the complete new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plate.zarr.viscy-old", "plate.zarr.viscy-partial"]
    with pytest.raises(DataError, match="already exists"):
        write_synthetic_plate(config)
    assert all(np.array_equal(x, y) for x, y in zip(before, _read(tmp_path / "plate.zarr.viscy-old"), strict=True))
    write_synthetic_plate(config.model_copy(update={"seed": 3, "overwrite": True}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plate.zarr"]
    assert zarr.open_group(str(config.output), mode="r").attrs["viscy_synth"]["seed"] == 3


def _synth_cli(cfg: Path, fault: str | None) -> subprocess.CompletedProcess:
    """``viscy synth --config cfg``, run through tests.faults with ``fault`` when given."""
    entry = ["-m", "tests.faults", fault, "--"] if fault else ["-m", "viscy.cli"]
    return subprocess.run(
        [sys.executable, *entry, "synth", "--config", str(cfg)],
        env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )


def test_killed_overwrite_keeps_old_plate_and_rerun_completes(tmp_path: Path) -> None:
    work = tmp_path / "work"
    config = _small(work, cols=["1", "2", "3"])
    write_synthetic_plate(config)
    fovs = ["A/1/0", "A/2/0", "A/3/0"]
    before = [_read(config.output, f) for f in fovs]
    cfg = tmp_path / "synth.yaml"
    cfg.write_text(yaml.safe_dump({**config.model_dump(mode="json"), "seed": 9, "overwrite": True}))

    killed = _synth_cli(cfg, "kill_synth_at_position2")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert sorted(p.name for p in work.iterdir()) == ["plate.zarr", "plate.zarr.viscy-partial"]
    for fov, old in zip(fovs, before, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(old, _read(config.output, fov), strict=True))

    rerun = _synth_cli(cfg, None)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert sorted(p.name for p in work.iterdir()) == ["plate.zarr"]
    assert zarr.open_group(str(config.output), mode="r").attrs["viscy_synth"]["seed"] == 9
    assert (config.output / CONFIG_FILENAME).is_file()
    ref = write_synthetic_plate(_small(tmp_path, "ref.zarr", cols=["1", "2", "3"], seed=9))
    for fov in fovs:
        assert all(np.array_equal(x, y) for x, y in zip(_read(ref, fov), _read(config.output, fov), strict=True))


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_linked_output_or_sibling_is_refused_and_never_deleted_through(tmp_path: Path) -> None:
    from viscy.data.replace import swap_in

    real = write_synthetic_plate(_small(tmp_path, "real.zarr"))
    before = _tree(real)
    link = tmp_path / "link.zarr"
    link.symlink_to(real, target_is_directory=True)
    for attempt in (_small(tmp_path, "link.zarr", overwrite=True, seed=5), _small(tmp_path, "link.zarr", seed=5)):
        with pytest.raises(DataError, match=r"link.zarr is a symbolic link .*never through a link.*rm .*link.zarr"):
            write_synthetic_plate(attempt)
    with pytest.raises(DataError, match="is a symbolic link"):  # the swap itself refuses as well
        swap_in(tmp_path / "nothing.zarr", link, synth.is_synth_store)
    assert link.is_symlink() and _tree(real) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.zarr", "real.zarr"]

    # a link left at <output>.viscy-old (as a swap through a link used to leave) stops every rerun with the fix
    out = write_synthetic_plate(_small(tmp_path, "out.zarr"))
    old = tmp_path / "out.zarr.viscy-old"
    old.symlink_to(real, target_is_directory=True)
    with pytest.raises(DataError, match=r"out.zarr.viscy-old is a symbolic link"):
        write_synthetic_plate(_small(tmp_path, "out.zarr", overwrite=True, seed=5))
    assert old.is_symlink() and _tree(real) == before and synth.is_synth_store(out)
    old.unlink()  # the fix the message names; the rerun then replaces the plate
    write_synthetic_plate(_small(tmp_path, "out.zarr", overwrite=True, seed=5))
    assert zarr.open_group(str(out), mode="r").attrs["viscy_synth"]["seed"] == 5
    assert _tree(real) == before
