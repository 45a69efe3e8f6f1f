"""Ray Data patch source: FOV split, per-epoch crops, fixed validation crops, shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import write_iohub_plate
from viscy.data.config import DataConfig, PreprocessConfig
from viscy.data.preprocess import run_preprocess
from viscy.errors import DataError
from viscy.train.datasource import (
    build_datasets,
    list_fovs,
    patch_dataset,
    patch_datasource,
    plan_reads,
    split_fovs,
)
from viscy.train.shard import RayShardIterable

POSITIONS = tuple(("A", str(c), str(f)) for c in (1, 2) for f in range(3))


@pytest.fixture(scope="module")
def plate(tmp_path_factory, ray_local):
    path = write_iohub_plate(tmp_path_factory.mktemp("ds") / "p.zarr", shape=(1, 3, 3, 48, 48), positions=POSITIONS)
    run_preprocess(PreprocessConfig(data_path=path), progress=False)
    return path


def _data(plate, **kw) -> DataConfig:
    base = {
        "data_path": [str(plate)],
        "z_window_size": 3,
        "target_2d": True,
        "yx_patch_size": (16, 16),
        "patches_per_stack": 4,
        "batch_size": 4,
        "val_fraction": 0.34,
    }
    return DataConfig.model_validate(base | kw)


def test_split_deterministic_and_disjoint(plate):
    fovs = [(f"/p{i}.zarr", f"A/1/{j}") for i in range(2) for j in range(5)]
    data = _data(plate)
    a, b = split_fovs(fovs, data), split_fovs(list(reversed(fovs)), data)
    assert a == b
    assert set(a.train).isdisjoint(a.val) and set(a.train) | set(a.val) == set(fovs)
    assert len(a.val) == round(0.34 * 10)
    assert split_fovs(fovs, _data(plate, split_seed=1)) != a
    explicit = split_fovs(fovs, _data(plate, val_positions=["A/1/0"]))
    assert {f for _, f in explicit.val} == {"A/1/0"} and len(explicit.val) == 2
    with pytest.raises(DataError, match="match no FOV"):
        split_fovs(fovs, _data(plate, val_positions=["Z/*"]))


def test_plan_reads_exact_total():
    fovs = [("p", "A/1/0"), ("p", "A/1/1")]
    reads = plan_reads(fovs, 4, 2, total=10, seed=3)
    assert [r.n for r in reads] == [4, 4, 2] and [r.fov for r in reads] == ["A/1/0", "A/1/1", "A/1/0"]
    assert plan_reads(fovs, 4, 2, total=10, seed=3) == reads
    assert all(r.seed is None for r in plan_reads(fovs, 4, 2))


def _sorted_rows(ds) -> np.ndarray:
    rows = ds.take_all()
    return np.stack(sorted((r["source"] for r in rows), key=lambda a: a.tobytes()))


def test_train_patches_change_and_validation_is_fixed(plate):
    data = _data(plate)
    fovs = list_fovs(data)
    assert len(fovs) == 6
    train, val, split, steps = build_datasets(data, world_size=2, reads_per_fov=1, val_reads_per_fov=1, seed=0)
    assert len(split.val) == 2 and len(split.train) == 4
    assert steps == {"train_steps": 2, "val_steps": 1, "val_cache": 1}
    batch = next(iter(train.iter_batches(batch_size=4)))
    assert batch["source"].shape == (4, 1, 3, 16, 16) and batch["target"].shape == (4, 2, 1, 16, 16)
    assert batch["source"].dtype == np.float32
    assert train.count() == 2 * 4 * 2
    first, second = _sorted_rows(train), _sorted_rows(train)
    assert not np.array_equal(first, second)
    v1, v2 = _sorted_rows(val), _sorted_rows(val)
    assert v1.shape == (8, 1, 3, 16, 16)
    np.testing.assert_array_equal(v1, v2)
    val_fovs = {f for _, f in split.val}
    assert val_fovs.isdisjoint({f for _, f in split.train})


def test_validation_batches_are_read_once_and_replayed(plate):
    _, val, _, steps = build_datasets(_data(plate), world_size=2, reads_per_fov=1, val_reads_per_fov=1, seed=0)
    assert steps["val_cache"] == 1
    cached = RayShardIterable(val.iterator(), 4, cache=True)
    once, again = list(cached), list(cached)
    assert len(once) == 2 and all(a is b for a, b in zip(once, again, strict=True))
    # Without the cache every pass reads again: equal crops (fixed seeds), new tensors.
    plain = RayShardIterable(val.iterator(), 4)
    first, second = list(plain), list(plain)
    assert not any(a is b for a, b in zip(first, second, strict=True))
    np.testing.assert_array_equal(_sorted_rows_of(first), _sorted_rows_of(second))


def _sorted_rows_of(batches) -> np.ndarray:
    rows = [row.numpy() for b in batches for row in b["source"]]
    return np.stack(sorted(rows, key=lambda a: a.tobytes()))


def test_read_tasks_group_consecutive_reads(plate):
    data = _data(plate, reads_per_task=3)
    reads = plan_reads(list_fovs(data), 4, 1, total=4 * 7 - 2, seed=1)
    assert len(reads) == 7
    tasks = patch_datasource(reads, data, augment=False).get_read_tasks(math.ceil(len(reads) / 3))
    assert [t.metadata.num_rows for t in tasks] == [8, 8, 10]
    blocks = [b for t in tasks for b in t()]
    assert [b.num_rows for b in blocks] == [r.n for r in reads]
    ds = patch_dataset(reads, data, augment=False)
    assert ds.count() == sum(r.n for r in reads)
    one_each = patch_dataset(reads, _data(plate, reads_per_task=1), augment=False)
    np.testing.assert_array_equal(_sorted_rows(ds), _sorted_rows(one_each))


def test_training_read_order_changes_every_pass_validation_order_does_not(plate, monkeypatch):
    import viscy.train.datasource as datasource

    data = _data(plate, reads_per_task=8)
    fovs = list_fovs(data)
    seen: list[tuple[str, int | None]] = []
    real = datasource.start_read

    def recording(read, data, augment, labels):
        seen.append((read.fov, read.seed))
        return real(read, data, augment, labels)

    monkeypatch.setattr(datasource, "start_read", recording)
    for seed in (None, 5):
        reads = plan_reads(fovs, 4, 1, total=4 * 8, seed=seed)
        (task,) = patch_datasource(reads, data, augment=False).get_read_tasks(1)
        passes = []
        for _ in range(2):
            seen.clear()
            assert sum(b.num_rows for b in task()) == 32
            passes.append(list(seen))
        assert sorted(passes[0]) == sorted(passes[1]) and len(passes[0]) == 8
        if seed is None:
            assert passes[0] != passes[1]
        else:
            assert passes[0] == passes[1] == [(r.fov, r.seed) for r in reads]


def test_next_pass_started_early_yields_the_same_pass(plate):
    _, val, _, _ = build_datasets(_data(plate), world_size=2, reads_per_fov=1, val_reads_per_fov=1, seed=0)
    batches = RayShardIterable(val.iterator(), 4)
    plain = list(batches)
    batches.start_next_pass()
    batches.start_next_pass()  # once started, a second call changes nothing
    early = list(batches)
    assert len(early) == len(plain) == 2
    np.testing.assert_array_equal(_sorted_rows_of(early), _sorted_rows_of(plain))
    assert len(list(batches)) == 2  # the pass after an early one starts as usual


def test_next_pass_of_an_empty_shard_and_errors(plate):
    import ray.data

    empty = RayShardIterable(ray.data.from_items([{"source": np.zeros(2, np.float32)}]).iterator(), 4)
    empty.start_next_pass()
    assert list(empty) == []  # fewer rows than a batch: nothing, as a plain pass

    def explode(batch):
        raise ValueError("unreadable chunk")

    failing = RayShardIterable(ray.data.range(8).map_batches(explode).iterator(), 4)
    failing.start_next_pass()
    with pytest.raises(Exception, match="unreadable chunk"):
        list(failing)


def test_cached_validation_is_not_restarted(plate):
    _, val, _, _ = build_datasets(_data(plate), world_size=2, reads_per_fov=1, val_reads_per_fov=1, seed=0)
    cached = RayShardIterable(val.iterator(), 4, cache=True)
    once = list(cached)
    cached.start_next_pass()
    assert cached._next is None
    assert all(a is b for a, b in zip(once, list(cached), strict=True))


def test_warm_read_workers_open_the_plates(plate, tmp_path):
    import ray

    import viscy.train.datasource as datasource

    data = _data(plate)
    pids = ray.get(datasource.warm_read_workers(data, 2))
    assert len(pids) == 2 and all(isinstance(p, int) for p in pids)
    # the sampler it cached in that worker is the one a read task of the same config uses
    assert datasource._warm_read_worker(data, augment=True) is not None
    assert (str(plate), data.model_dump_json(), True, ()) in datasource._SAMPLERS
    # best effort: a plate this worker cannot open is left to the read task's own error
    missing = data.model_copy(update={"data_path": [tmp_path / "absent.zarr"]})
    assert ray.get(datasource.warm_read_workers(missing, 1)) == [None]


def test_read_path_does_not_import_torch(plate):
    """Ray Data's coordinators unpickle the datasource, and a read with flips and turns only needs no torch."""
    import subprocess
    import sys

    code = f"""
import sys
import numpy as np
from viscy.data.config import AugmentationConfig, DataConfig
from viscy.train.datasource import Read, start_read
aug = AugmentationConfig(affine_prob=0, contrast_prob=0, intensity_scale_prob=0, noise_prob=0, smooth_prob=0)
data = DataConfig(data_path=[{str(plate)!r}], z_window_size=3, target_2d=True, yx_patch_size=[16, 16],
                  augmentation=aug)
batch = start_read(Read({str(plate)!r}, "A/1/0", 4, 7), data, augment=True)()
assert batch["source"].shape[0] == 4 and np.isfinite(batch["source"]).all()
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
