"""Ray Data patch source over one or many HCS plates, split into train/validation by FOV.

Each read (one ``PatchSampler.sample`` call) reads one region and cuts many patches from it; a read task runs
up to ``data.reads_per_task`` consecutive reads and yields each read's patches as it goes (Ray Data merges them
into blocks of up to ``DataContext.target_max_block_size``, 128 MiB); augmentation runs there, in Ray Data
workers. Training reads draw fresh seeds, and each task a fresh order of its reads, every time the
pipeline executes (every ``iter_torch_batches`` pass, i.e. every epoch), so crops and order differ between
epochs; validation reads use fixed seeds and no augmentation, so every pass yields the same crops.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from viscy.data.config import DataConfig
from viscy.data.patches import PatchSampler, PatchSpec, prefetched
from viscy.data.plate import Plate
from viscy.errors import DataError

_SAMPLERS: dict[tuple, PatchSampler] = {}


@dataclass(frozen=True)
class Read:
    """One region read: ``n`` patches from FOV ``fov`` of ``plate``; ``seed`` None draws fresh entropy."""

    plate: str
    fov: str
    n: int
    seed: int | None


@dataclass(frozen=True)
class Split:
    """FOVs (``(plate, fov)``) used for training and validation."""

    train: tuple[tuple[str, str], ...]
    val: tuple[tuple[str, str], ...]

    def to_json(self) -> str:
        return json.dumps({"train": [f"{p}::{f}" for p, f in self.train], "val": [f"{p}::{f}" for p, f in self.val]})


def _sampler(plate: str, data: DataConfig, augment: bool, labels: tuple[str, ...] = ()) -> PatchSampler:
    """One sampler (and open plate) per process, plate, mode and label images."""
    key = (plate, data.model_dump_json(), augment, labels)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = PatchSampler(
            plate,
            PatchSpec.from_config(data),
            data.normalization,
            data.augmentation if augment else None,
            data.fg_mask_min_fraction,
            data.fg_weighted_crops,
            labels,
        )
    return _SAMPLERS[key]


def list_fovs(data: DataConfig) -> list[tuple[str, str]]:
    """(plate path, FOV name) of every selected FOV of every plate, checked against the patch spec."""
    out = []
    for path in data.data_path:
        plate = Plate(path)
        names = plate.select(data.positions)
        _sampler(str(path), data, augment=False).validate(names)
        out.extend((str(path), n) for n in names)
        plate.close()
    return out


def split_fovs(fovs: list[tuple[str, str]], data: DataConfig) -> Split:
    """Deterministic, disjoint train/validation split by FOV (seeded by ``data.split_seed``).

    ``data.val_positions`` (fnmatch patterns on the FOV name or ``plate/FOV``) overrides ``val_fraction``.
    """
    fovs = sorted(fovs)
    if data.val_positions is not None:

        def is_val(p: str, f: str) -> bool:
            full = f"{Path(p).as_posix().rstrip('/')}/{f}"
            return any(fnmatch.fnmatchcase(f, pat) or fnmatch.fnmatchcase(full, pat) for pat in data.val_positions)

        val = [x for x in fovs if is_val(*x)]
        if not val:
            raise DataError(f"data.val_positions {data.val_positions} match no FOV; e.g. {fovs[0][1]!r}")
    else:
        n_val = 0 if data.val_fraction == 0 or len(fovs) < 2 else max(1, round(data.val_fraction * len(fovs)))
        order = np.random.default_rng(data.split_seed).permutation(len(fovs))
        val = [fovs[i] for i in sorted(order[:n_val])]
    train = [x for x in fovs if x not in val]
    if not train:
        raise DataError("no training FOVs left after the validation split; lower data.val_fraction")
    return Split(tuple(train), tuple(val))


def check_val_labels(fovs: list[tuple[str, str]], data: DataConfig, labels: tuple[str, ...]) -> None:
    """Check that every validation FOV has the label images ``labels`` in the image's shape.

    Raises
    ------
    DataError
        Naming the FOV, the label images it has, and the fix.
    """
    val: dict[str, list[str]] = {}
    for plate, fov in split_fovs(fovs, data).val:
        val.setdefault(plate, []).append(fov)
    for plate, names in val.items():
        _sampler(plate, data, augment=False, labels=labels).validate(names)


def plan_reads(
    fovs: tuple[tuple[str, str], ...] | list[tuple[str, str]],
    patches_per_stack: int,
    reads_per_fov: int,
    total: int | None = None,
    seed: int | None = None,
) -> list[Read]:
    """Reads cycling over FOVs; ``total`` patches exactly if given, else ``reads_per_fov`` reads per FOV.

    ``seed`` None leaves read seeds to fresh entropy (training); an int fixes every read (validation).
    """
    if total is None:
        total = len(fovs) * reads_per_fov * patches_per_stack
    reads, k = [], 0
    while total > 0:
        plate, fov = fovs[k % len(fovs)]
        n = min(patches_per_stack, total)
        read_seed = None if seed is None else int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        reads.append(Read(plate, fov, n, read_seed))
        total -= n
        k += 1
    return reads


def start_read(
    read: Read, data: DataConfig, augment: bool, labels: tuple[str, ...] = ()
) -> Callable[[], dict[str, np.ndarray]]:
    """Start one read (in a Ray Data worker): its region is fetched in the background; call the result."""
    seed = read.seed if read.seed is not None else secrets.randbits(63)
    return _sampler(read.plate, data, augment, labels).start(read.fov, read.n, seed, augment=augment)


def _read_task_fn(reads: list[Read], data: DataConfig, augment: bool, labels: tuple[str, ...]):
    def fn():
        from ray.data.block import BlockAccessor

        # Unseeded (training) reads run in a fresh order every pass; seeded (validation) ones in plan order.
        fresh = any(r.seed is None for r in reads)
        order = np.random.default_rng().permutation(len(reads)) if fresh else range(len(reads))
        for batch in prefetched(start_read(reads[i], data, augment, labels) for i in order):
            yield BlockAccessor.batch_to_block(batch)

    return fn


def patch_datasource(reads: list[Read], data: DataConfig, augment: bool, labels: tuple[str, ...] = ()):
    """A ``ray.data.Datasource`` whose read tasks execute ``reads`` (the class is built lazily: Ray imports late)."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    bytes_per_patch = _bytes_per_patch(data, len(labels))

    class _Source(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(r.n for r in reads) * bytes_per_patch

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
            # Contiguous groups keep the planned read order (FOVs interleaved) when tasks run one after another.
            k = max(1, min(parallelism, len(reads)))
            groups = [reads[i * len(reads) // k : (i + 1) * len(reads) // k] for i in range(k)]
            tasks = []
            for group in groups:
                rows = sum(r.n for r in group)
                meta = BlockMetadata(num_rows=rows, size_bytes=rows * bytes_per_patch, exec_stats=None)
                tasks.append(ReadTask(_read_task_fn(group, data, augment, labels), meta))
            return tasks

        def get_name(self) -> str:
            return "ReadOmeZarrPatches"

    return _Source()


def patch_dataset(reads: list[Read], data: DataConfig, augment: bool, labels: tuple[str, ...] = ()):
    """A ``ray.data.Dataset`` of ``{"source", "target"}`` patches for ``reads`` (and ``"labels"`` with label images).

    Up to ``data.reads_per_task`` consecutive reads share one read task, because a Ray Data task costs about
    20 ms of worker time on top of its reads (measured in ``benchmarks/bench_train.py``). There are never fewer
    tasks than the cluster has CPUs (or reads). A task's memory is bounded by ``reads_per_task`` reads' patches
    or Ray Data's target block size (128 MiB), whichever is smaller, whatever the plate size.
    """
    import ray
    import ray.data

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    tasks = min(len(reads), max(math.ceil(len(reads) / data.reads_per_task), cpus))
    return ray.data.read_datasource(patch_datasource(reads, data, augment, labels), override_num_blocks=tasks)


def _warm_read_worker(data: DataConfig, augment: bool) -> int | None:
    """Import the read path and open every plate, in a Ray worker that Ray Data's read tasks then reuse.

    Returns the worker's pid, or None where a plate could not be opened here: the warm-up is best effort, and
    the read tasks report such a plate with their own error.
    """
    import ray.data.block  # noqa: F401  (what a read task imports to build its blocks)

    try:
        for plate in data.data_path:
            _sampler(str(plate), data, augment).plate  # noqa: B018  (opens it)
    except Exception:
        return None
    return os.getpid()


def warm_read_workers(data: DataConfig, count: int) -> list[Any]:
    """Start ``count`` Ray workers that import the read path and open the plates, without waiting for them.

    A Ray Data read task runs in an idle worker of the job when there is one. Warmed while Ray Train starts its
    worker group, the first epoch's reads do not wait for new processes to import torch and tensorstore and
    open the plates. The tasks take no CPU, so they never delay the worker group's placement.
    """
    import ray

    warm = ray.remote(num_cpus=0, max_retries=0)(_warm_read_worker).options(runtime_env=_read_task_runtime_env())
    augment = data.augmentation is not None
    return [warm.remote(data, augment) for _ in range(count)]


def _read_task_runtime_env() -> dict[str, Any] | None:
    """The runtime env of Ray Train's read tasks: what its controller gets, which its actors pass on.

    Ray reuses an idle worker only for tasks of the same runtime env. Ray Train gives its controller the
    driver's Ray Train settings as env vars (and Ray's blocking-get warning off); the dataset coordinators
    that launch the read tasks inherit them. Without those (a Ray that changed them), no env: the warm-up misses.
    """
    from viscy.ray_utils import train_controller_env_vars

    env_vars = train_controller_env_vars()
    return None if env_vars is None else {"env_vars": env_vars}


# Validation crops are fixed: a worker keeps its share in memory up to this size instead of re-reading it.
VAL_CACHE_BYTES = 1 << 30


def _bytes_per_patch(data: DataConfig, labels: int = 0) -> int:
    spec = PatchSpec.from_config(data)
    planes = len(spec.source_channels) * spec.z_window_size + (len(spec.target_channels) + labels) * spec.target_depth
    return 4 * spec.yx_patch[0] * spec.yx_patch[1] * planes


def build_datasets(
    data: DataConfig,
    world_size: int,
    reads_per_fov: int = 4,
    val_reads_per_fov: int = 2,
    train_steps_per_epoch: int | None = None,
    val_steps: int | None = None,
    seed: int = 42,
    fovs: list[tuple[str, str]] | None = None,
    val_labels: tuple[str, ...] = (),
) -> tuple[Any, Any | None, Split, dict[str, int]]:
    """Train and validation datasets sized so that every worker gets the same whole number of batches.

    Training reads are planned one epoch at a time (a dataset of many epochs' reads made Ray Data read ahead
    and slowed training steps on a 2-core machine: 111.5 s against 95.6 s for 8 demo epochs). The validation
    set is kept by each worker after its first pass when ``val_cache`` is set (at most
    :data:`VAL_CACHE_BYTES` per worker). ``fovs`` is :func:`list_fovs`' answer where the caller has it (the
    plates are then not listed again). ``val_labels``: label images the validation patches carry (ground truth).

    Returns
    -------
    tuple
        (train dataset, validation dataset or None, split, {"train_steps", "val_steps"} per worker and epoch
        and "val_cache")
    """
    split = split_fovs(list_fovs(data) if fovs is None else fovs, data)
    bs, pps = data.batch_size, data.patches_per_stack
    if train_steps_per_epoch is None:
        train_steps_per_epoch = max(1, (len(split.train) * reads_per_fov * pps) // (world_size * bs))
    train_reads = plan_reads(split.train, pps, reads_per_fov, train_steps_per_epoch * bs * world_size)
    train = patch_dataset(train_reads, data, augment=data.augmentation is not None)
    val, n_val = None, 0
    if split.val:
        if val_steps is None:
            val_steps = max(1, math.ceil(len(split.val) * val_reads_per_fov * pps / (world_size * bs)))
        n_val = val_steps
        val_reads = plan_reads(split.val, pps, val_reads_per_fov, val_steps * bs * world_size, seed=seed)
        val = patch_dataset(val_reads, data, augment=False, labels=val_labels)
    val_cache = n_val * bs * _bytes_per_patch(data, len(val_labels)) <= VAL_CACHE_BYTES
    return train, val, split, {"train_steps": train_steps_per_epoch, "val_steps": n_val, "val_cache": int(val_cache)}
