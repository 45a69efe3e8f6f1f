"""Where a small ``viscy train`` run's wall time goes, against a plain single-process Lightning run.

Both train the demo's model (``viscy.train.demo_settings``: 2D U-Net, 96² patches, batch 8 per worker × 2
workers, 10 steps per epoch, 3 validation batches, figures every 4 epochs) on the demo plate, for the same
epochs, with the same ``VSModule``:

1. ``viscy train`` (``run_train``, as the CLI calls it): Ray start, Ray Train worker group (2 × 0.5 CPU,
   gloo DDP), Ray Data patch streams, a checkpoint and report every epoch;
2. the baseline: one process, Lightning's own loop, a torch ``DataLoader`` with 2 worker processes over
   ``PatchSampler`` (VisCy's layout), global batch 16, a Lightning checkpoint every epoch.

Both runs time their phases with the same callbacks (``timings/rank0.json``). Prints total wall time and
the ratio (goal: at most 1.2), and a breakdown: Ray start, worker-group start, per-epoch fixed cost
(dataset start, validation with figures, checkpoint + report), steady-state step time and samples/s.

``python benchmarks/bench_overhead.py [--epochs 16] [--json]``
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from viscy.config import PreprocessConfig, SynthConfig, TrainConfig
from viscy.data.preprocess import run_preprocess
from viscy.data.synth import write_synthetic_plate
from viscy.train.demo_settings import demo_train_config


def epoch_summary(timings: dict[str, Any], global_batch: int) -> dict[str, float]:
    """Medians over epochs after the first: step time, samples/s, and each per-epoch fixed cost."""
    epochs = [e for e in timings["epochs"][1:] if "epoch_s" in e and e.get("steps", 0) > 1]
    step = statistics.median(e["train_s"] / (e["steps"] - 1) for e in epochs)
    fixed = [e["epoch_s"] - e["steps"] * step for e in epochs]
    return {
        "step_s": step,
        "samples_per_s": global_batch / step,
        "data_start_s": statistics.median(e["data_start_s"] for e in epochs),
        "val_s": statistics.median(e.get("val_s", 0.0) for e in epochs),
        "report_s": statistics.median(e["report_s"] for e in epochs),
        "fixed_per_epoch_s": statistics.median(fixed),
        "first_batch_s": timings["train_started"] - timings["fit_started"],
        "first_epoch_s": timings["epochs"][0]["epoch_s"],
    }


def run_viscy(config: TrainConfig) -> dict[str, Any]:
    """``run_train`` with Ray started inside it (as the CLI does); its phases."""
    import ray

    from viscy.train.trainer import TIMINGS, run_train

    ray.shutdown()
    start = time.time()
    result = run_train(config, quiet=True)
    wall = time.time() - start
    driver = json.loads((result.run_dir / "run_info.json").read_text())["timings"]
    rank0 = json.loads((result.run_dir / TIMINGS).read_text())
    ray.shutdown()
    return {
        "wall_s": wall,
        "ray_start_s": driver["ray_start_s"],
        "before_fit_s": driver["fit_called"] - start,
        "worker_group_start_s": rank0["fit_started"] - driver["fit_called"],
        "after_fit_s": driver["finished"] - rank0["fit_ended"],
        **epoch_summary(rank0, config.data.batch_size * config.trainer.num_workers),
        "val_pearson": {k: v for k, v in result.metrics.items() if k.startswith("val_pearson")},
    }


def run_lightning(config: TrainConfig, out: Path) -> dict[str, Any]:
    """The same module, data and budget in one process with Lightning's loop and a torch DataLoader."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from viscy.data.patches import PatchSampler, PatchSpec
    from viscy.train.datasource import list_fovs, split_fovs
    from viscy.train.module import VSModule
    from viscy.train.trainer import _phase_timers, model_card_for

    start = time.time()
    data, tc = config.data, config.trainer
    card = model_card_for(config)
    split = split_fovs(list_fovs(data), data)
    spec, pps = PatchSpec.from_config(data), data.patches_per_stack
    global_batch = data.batch_size * tc.num_workers

    class Patches(torch.utils.data.IterableDataset):
        """``n_reads`` region reads of ``patches_per_stack`` patches each, cycling over ``fovs``."""

        def __init__(self, fovs, n_reads: int, augment: bool, seed: int | None) -> None:
            self.fovs, self.n_reads, self.augment, self.seed = fovs, n_reads, augment, seed

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            wid, nw = (info.id, info.num_workers) if info else (0, 1)
            sampler = PatchSampler(data.data_path[0], spec, data.normalization, data.augmentation)
            for k in range(wid, self.n_reads, nw):
                plate, fov = self.fovs[k % len(self.fovs)]
                seed = k if self.seed is not None else secrets.randbits(62)
                batch = sampler.sample(fov, pps, seed=seed, augment=self.augment)
                for i in range(pps):
                    yield {"source": batch["source"][i], "target": batch["target"][i]}

    train_reads = tc.train_steps_per_epoch * global_batch // pps
    val_reads = tc.val_steps * global_batch // pps
    loaders = [
        torch.utils.data.DataLoader(
            Patches(fovs, n, augment, seed),
            batch_size=global_batch,
            num_workers=2,
            persistent_workers=True,
            drop_last=True,
        )
        for fovs, n, augment, seed in ((split.train, train_reads, True, None), (split.val, val_reads, False, 0))
    ]
    module = VSModule(
        card.name,
        card.kwargs,
        data.source_channel,
        data.target_channel,
        tc.model_dump(mode="json"),
        figure_dir=str(out / "figures"),
    )
    timers = _phase_timers(out / "timings" / "rank0.json", start)
    trainer = pl.Trainer(
        max_epochs=tc.max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[timers[0], ModelCheckpoint(dirpath=out / "checkpoints", save_last=True), timers[1]],
        logger=TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=tc.train_steps_per_epoch,
    )
    trainer.fit(module, *loaders)
    wall = time.time() - start
    rank0 = json.loads((out / "timings" / "rank0.json").read_text())
    return {
        "wall_s": wall,
        "ray_start_s": 0.0,
        "before_fit_s": rank0["fit_started"] - start,
        "worker_group_start_s": 0.0,
        "after_fit_s": time.time() - rank0["fit_ended"],
        **epoch_summary(rank0, global_batch),
        "val_pearson": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_pearson")},
    }


ROWS = [
    ("wall_s", "total wall time (s)"),
    ("ray_start_s", "Ray start (s)"),
    ("before_fit_s", "start of the call to fit start, driver (s)"),
    ("worker_group_start_s", "worker group start: fit() to Lightning fit start (s)"),
    ("first_batch_s", "Lightning fit start to the first batch (s)"),
    ("first_epoch_s", "first epoch (s)"),
    ("data_start_s", "per epoch: dataset start to first batch (s)"),
    ("val_s", "per epoch: validation incl. figures (s)"),
    ("report_s", "per epoch: checkpoint + report (s)"),
    ("fixed_per_epoch_s", "per epoch: fixed cost, epoch minus steps x step (s)"),
    ("step_s", "steady-state step (s)"),
    ("samples_per_s", "steady-state samples/s"),
    ("after_fit_s", "after fit: best model export (s)"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=16, help="epochs of both runs (the demo trains 16)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plate = write_synthetic_plate(SynthConfig(output=Path(tmp) / "demo.zarr"))
        run_preprocess(PreprocessConfig(data_path=plate, grid_spacing=4), progress=False)
        config = demo_train_config(plate, Path(tmp) / "runs", epochs=args.epochs, run_name="overhead")
        baseline = run_lightning(config, Path(tmp) / "lightning")
        viscy = run_viscy(config)
    print(f"demo training, {args.epochs} epochs, same module and budget (2-core CPU figures are noisy):")
    print(f"{'':55s} {'viscy train':>12s} {'Lightning':>12s}")
    for key, label in ROWS:
        print(f"{label:55s} {viscy[key]:12.3f} {baseline[key]:12.3f}")
    print(f"ratio of wall times, viscy train / single-process Lightning: {viscy['wall_s'] / baseline['wall_s']:.2f}")
    print(f"val Pearson, viscy: {viscy['val_pearson']}  Lightning: {baseline['val_pearson']}")
    if args.json:
        print(json.dumps({"viscy": viscy, "lightning": baseline}))


if __name__ == "__main__":
    main()
