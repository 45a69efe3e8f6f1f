"""Training-input and training-throughput benchmark (CPU by default).

1. Patch stream: patches/s from our Ray Data source (``viscy.train.datasource``) consumed with
   ``iter_torch_batches`` vs a plain torch ``DataLoader`` (2 worker processes) running the same reads with the
   same ``PatchSampler`` (same augmentations): Ray Data with ``data.reads_per_task`` 1 and the default, with
   ``op_resource_reservation_enabled`` on and off, plus the CPU seconds each process spent (what limits it).
2. Training: samples/s of UNeXt2 (VSCyto3D preset) at 256x256 through ``viscy train`` (Ray Train, CPU) with
   1 and 2 workers (first batch of the epoch excluded).

``python benchmarks/bench_train.py`` (defaults: 4096 patches, 4 training steps); ``--skip-train`` / ``--skip-stream``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from viscy.data.config import DataConfig, PreprocessConfig, SynthConfig
from viscy.data.plate import Plate
from viscy.data.preprocess import run_preprocess
from viscy.data.synth import write_synthetic_plate
from viscy.ray_utils import ensure_ray
from viscy.train.config import TrainConfig
from viscy.train.datasource import patch_dataset, plan_reads

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.helpers
from tests.helpers import read_patches  # noqa: E402


class _ReadsDataset(torch.utils.data.IterableDataset):
    """The same reads as the Ray Data source, split over DataLoader workers, one patch per item."""

    def __init__(self, reads, data: DataConfig) -> None:
        self.reads, self.data = reads, data

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        reads = self.reads if info is None else self.reads[info.id :: info.num_workers]
        for r in reads:
            out = read_patches(r, self.data, augment=True)
            for i in range(r.n):
                yield {"source": torch.from_numpy(out["source"][i]), "target": torch.from_numpy(out["target"][i])}


def _cpu_seconds() -> dict[int, tuple[float, str]]:
    """CPU seconds so far and a short label of every process on the machine."""
    out, children = {}, {c.pid for c in psutil.Process().children(recursive=True)}
    for p in psutil.process_iter(["cmdline"]):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid == os.getpid():
            label = "consumer"
        elif cmd.startswith("ray::"):
            label = "Ray worker"
        elif p.pid in children and "multiprocessing" in cmd:
            label = "DataLoader worker"
        else:
            label = "other"  # raylet, GCS, dashboard, ...
        out[p.pid] = (t.user + t.system, label)
    return out


def _rate(batches, n_expected: int) -> tuple[float, dict[str, float]]:
    """Patches/s of one pass, and the CPU seconds per patch spent in each kind of process during it."""
    before, start, n = _cpu_seconds(), time.perf_counter(), 0
    for b in batches:
        n += b["source"].shape[0]
    elapsed, after = time.perf_counter() - start, _cpu_seconds()
    assert n >= n_expected * 0.9, (n, n_expected)
    cpu: dict[str, float] = {}
    for pid, (t, label) in after.items():
        if pid in before:
            cpu[label] = cpu.get(label, 0.0) + (t - before[pid][0]) / n
    return n / elapsed, cpu


def _best(passes) -> tuple[float, dict[str, float]]:
    return max(passes, key=lambda r: r[0])


def bench_stream(plate: Path, patches: int, patch: int, batch: int, pps: int) -> None:
    from ray.data import DataContext

    data = DataConfig(data_path=[plate], yx_patch_size=(patch, patch), patches_per_stack=pps, batch_size=batch)
    fovs = [(str(plate), f) for f in Plate(plate).positions]
    reads = plan_reads(fovs, pps, 1, total=patches)
    default_rpt = data.reads_per_task
    results = {}
    for reserve, rpt in ((True, default_rpt), (False, 1), (False, default_rpt), (False, 4 * default_rpt)):
        DataContext.get_current().op_resource_reservation_enabled = reserve
        ds = patch_dataset(reads, data.model_copy(update={"reads_per_task": rpt}), augment=True)
        _rate(ds.iter_torch_batches(batch_size=batch), patches // 4)  # warm-up pass (workers, imports)
        label = f"ray_data reads_per_task={rpt} reservation={'on' if reserve else 'off'}"
        results[label] = _best(_rate(ds.iter_torch_batches(batch_size=batch, dtypes=torch.float32), patches)
                               for _ in range(3))
    # spawn: forking a process that holds a Ray driver connection can hang.
    dl = torch.utils.data.DataLoader(
        _ReadsDataset(reads, data), batch_size=batch, num_workers=2, multiprocessing_context="spawn",
        persistent_workers=True,
    )
    _rate(dl, patches)  # warm-up pass (worker start)
    results["torch DataLoader num_workers=2"] = _best(_rate(dl, patches) for _ in range(3))
    base = results["torch DataLoader num_workers=2"][0]
    print(f"\npatch stream: {patches} patches of {patch}x{patch}, {pps} per read, batch {batch} (augmentations on)")
    print(f"  {'pipeline':<50} {'patches/s':>9} {'vs DataLoader':>13}   CPU ms per patch")
    for k, (rate, cpu) in results.items():
        parts = ", ".join(f"{lbl} {1e3 * v:.2f}" for lbl, v in sorted(cpu.items()) if v * 1e3 >= 0.05)
        print(f"  {k:<50} {rate:9.0f} {rate / base:13.2f}   {parts}")


def bench_train(root: Path, steps: int, workers: list[int], batch: int) -> None:
    from viscy.train.trainer import run_train

    plate = root / "bench3d.zarr"
    if not plate.exists():
        write_synthetic_plate(SynthConfig(output=plate, z=5, yx=(256, 256), cols=["1"], fovs_per_well=2))
        run_preprocess(PreprocessConfig(data_path=plate), progress=False)
    print(f"\ntraining: UNeXt2 (VSCyto3D preset), input (B,1,5,256,256), batch {batch}/worker, {steps} steps, CPU")
    for n in workers:
        cfg = TrainConfig.model_validate({
            "data": {"data_path": [str(plate)], "z_window_size": 5, "target_2d": False, "yx_patch_size": [256, 256],
                     "batch_size": batch, "patches_per_stack": batch, "val_fraction": 0.0, "augmentation": None},
            "model": {"name": "VSCyto3D"},
            "trainer": {"max_epochs": 1, "num_workers": n, "cpus_per_worker": 0.5, "storage_path": str(root / "runs"),
                        "run_name": f"bench_{n}w_{time.time():.0f}", "train_steps_per_epoch": steps,
                        "log_every_n_epochs": 100},
        })
        start = time.perf_counter()
        summary = run_train(cfg)
        rate = summary["result"].metrics.get("train_samples_per_s", float("nan"))
        print(f"  workers={n}: {rate:.2f} samples/s (steps 2..{steps}); fit wall {time.perf_counter() - start:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=int, default=4096)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--patches-per-read", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--skip-stream", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    ensure_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.skip_stream:
            plate = write_synthetic_plate(SynthConfig(output=root / "bench2d.zarr", cols=["1", "2"]))
            run_preprocess(PreprocessConfig(data_path=plate), progress=False)
            bench_stream(plate, args.patches, args.patch, args.batch, args.patches_per_read)
        if not args.skip_train:
            bench_train(root, args.train_steps, args.workers, args.train_batch)


if __name__ == "__main__":
    main()
