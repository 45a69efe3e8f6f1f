"""Training-input and training-throughput benchmark (CPU by default).

1. Patch stream: patches/s from our Ray Data source (``viscy.train.datasource``) consumed with
   ``iter_torch_batches`` vs a plain torch ``DataLoader`` (2 worker processes) running the same reads with the
   same ``PatchSampler`` (same augmentations), with Ray Data's ``op_resource_reservation_enabled`` on and off.
2. Training: samples/s of UNeXt2 (VSCyto3D preset) at 256x256 through ``viscy train`` (Ray Train, CPU) with
   1 and 2 workers (first batch of the epoch excluded).

``python benchmarks/bench_train.py --patches 512 --train-steps 3``; ``--skip-train`` / ``--skip-stream``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from viscy.config import DataConfig, PreprocessConfig, SynthConfig, TrainConfig
from viscy.data.plate import Plate
from viscy.data.preprocess import preprocess_plate
from viscy.data.synth import write_synthetic_plate
from viscy.ray_utils import ensure_ray
from viscy.train.datasource import patch_dataset, plan_reads, read_patches


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


def _rate(batches, n_expected: int) -> float:
    start, n = time.perf_counter(), 0
    for b in batches:
        n += b["source"].shape[0]
    assert n >= n_expected * 0.9, (n, n_expected)
    return n / (time.perf_counter() - start)


def bench_stream(plate: Path, patches: int, patch: int, batch: int, pps: int) -> None:
    from ray.data import DataContext

    data = DataConfig(data_path=[plate], yx_patch_size=(patch, patch), patches_per_stack=pps, batch_size=batch)
    fovs = [(str(plate), f) for f in Plate(plate).positions]
    reads = plan_reads(fovs, pps, 1, total=patches)
    results = {}
    for reserve in (True, False):
        DataContext.get_current().op_resource_reservation_enabled = reserve
        ds = patch_dataset(reads, data, augment=True)
        _rate(ds.iter_torch_batches(batch_size=batch), patches // 4)  # warm-up pass (workers, imports)
        best = max(_rate(ds.iter_torch_batches(batch_size=batch, dtypes=torch.float32), patches) for _ in range(2))
        results[f"ray_data reservation={'on' if reserve else 'off'}"] = best
    # spawn: forking a process that holds a Ray driver connection can hang.
    dl = torch.utils.data.DataLoader(
        _ReadsDataset(reads, data), batch_size=batch, num_workers=2, multiprocessing_context="spawn",
        persistent_workers=True,
    )
    results["torch DataLoader num_workers=2"] = max(_rate(dl, patches) for _ in range(2))
    base = results["torch DataLoader num_workers=2"]
    print(f"\npatch stream: {patches} patches of {patch}x{patch}, {pps} per read, batch {batch} (augmentations on)")
    for k, v in results.items():
        print(f"  {k:<36} {v:8.0f} patches/s   ratio vs DataLoader {v / base:5.2f}")


def bench_train(root: Path, steps: int, workers: list[int], batch: int) -> None:
    from viscy.train.trainer import run_train

    plate = root / "bench3d.zarr"
    if not plate.exists():
        write_synthetic_plate(SynthConfig(output=plate, z=5, yx=(256, 256), cols=["1"], fovs_per_well=2))
        preprocess_plate(PreprocessConfig(data_path=plate), progress=False)
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
    p.add_argument("--patches", type=int, default=1024)
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
            preprocess_plate(PreprocessConfig(data_path=plate), progress=False)
            bench_stream(plate, args.patches, args.patch, args.batch, args.patches_per_read)
        if not args.skip_train:
            bench_train(root, args.train_steps, args.workers, args.train_batch)


if __name__ == "__main__":
    main()
