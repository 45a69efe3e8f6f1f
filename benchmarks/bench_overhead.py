"""Where a small ``viscy train`` run's wall time goes, against a plain single-process Lightning run.

Both train the demo's model (``viscy.train.demo_settings``: 2D U-Net, 96² patches, batch 8 per worker × 2
workers, 10 steps per epoch, 3 validation batches, figures every 4 epochs) on the demo plate, for the same
epochs, with the same ``VSModule``, each as the command a user runs, from a fresh process:

1. ``viscy train --config <the demo config>``: config check (Ray starts meanwhile), Ray Train worker group
   (2 × 0.5 CPU, gloo DDP), Ray Data patch streams, a checkpoint and report every epoch, the self-describing
   best model;
2. the baseline, ``python bench_overhead.py --lightning-run <config> <dir>``: one process, Lightning's own
   loop, a torch ``DataLoader`` with 2 worker processes over ``PatchSampler`` (VisCy's layout), global batch
   16, a Lightning checkpoint every epoch.

The goal (at most 1.2) is the ratio of the two commands' wall times, process start and imports included,
as a user times them. Both runs also time their phases with the same callbacks (``timings/rank0.json``),
so it prints the in-process ratio (from the call into training to its return, imports excluded) and a
breakdown: Ray start, worker-group start, per-epoch fixed cost (dataset start, validation with figures,
checkpoint + report), steady-state step time and samples/s.

``python benchmarks/bench_overhead.py [--epochs 16] [--repeats 1] [--json]``

``--gpu`` measures a GPU job instead (one CUDA worker, NCCL, bf16-mixed, UNeXt2 on 256² patches of a
5-slice window, batch 16, 40 steps per epoch, 8 DataLoader workers / CPUs for Ray Data reads), where the
question is whether the steady state keeps up with plain Lightning.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from viscy.data.config import PreprocessConfig, SynthConfig
from viscy.data.preprocess import run_preprocess
from viscy.data.synth import write_synthetic_plate
from viscy.train.config import TrainConfig
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


def gpu_config(config: TrainConfig) -> TrainConfig:
    """The GPU variant: UNeXt2 2.5D, 256² patches of 5 slices, batch 16, bf16-mixed, one CUDA worker."""
    tree = config.model_dump(mode="json")
    tree["data"] |= {"z_window_size": 5, "yx_patch_size": [256, 256], "batch_size": 16, "augmentation": {}}
    tree["model"] = {"name": "unext2", "kwargs": {}}
    tree["trainer"] |= {
        "use_gpu": True,
        "num_workers": 1,
        "cpus_per_worker": 4,
        "precision": "bf16-mixed",
        "train_steps_per_epoch": 40,
        "val_steps": 4,
        "log_every_n_epochs": 2,
    }
    return TrainConfig.model_validate(tree)


def run_command(argv: list[str], log: Path) -> float:
    """Run a command to completion with its output in ``log``; its wall time (s), start-up included."""
    start = time.time()
    with log.open("w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.time() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}); see {log}")
    return wall


def run_viscy(config_path: Path, config: TrainConfig, log: Path) -> dict[str, Any]:
    """``viscy train --config`` as a user runs it; its command wall time and its phases."""
    from viscy.models import read_card
    from viscy.train.trainer import BEST_MODEL
    from viscy.train.worker import TIMINGS

    viscy_cli = str(Path(sys.executable).with_name("viscy"))
    command_wall = run_command([viscy_cli, "train", "--config", str(config_path)], log)
    run_dir = Path(config.trainer.storage_path) / str(config.trainer.run_name)
    driver = json.loads((run_dir / "run_info.json").read_text())["timings"]
    rank0 = json.loads((run_dir / TIMINGS).read_text())
    best = read_card(run_dir / BEST_MODEL).training.get("metrics", {})
    return {
        "command_wall_s": command_wall,
        "wall_s": driver["finished"] - driver["started"],
        "ray_start_s": driver["ray_start_s"],
        "before_fit_s": driver["fit_called"] - driver["started"],
        "worker_group_start_s": rank0["fit_started"] - driver["fit_called"],
        "after_fit_s": driver["finished"] - rank0["fit_ended"],
        **epoch_summary(rank0, config.data.batch_size * config.trainer.num_workers),
        "val_pearson": {k: v for k, v in best.items() if k.startswith("val_pearson")},
    }


def run_lightning_command(config_path: Path, out: Path, log: Path) -> dict[str, Any]:
    """The baseline as a command (``--lightning-run``); its command wall time and its phases."""
    command_wall = run_command([sys.executable, __file__, "--lightning-run", str(config_path), str(out)], log)
    return json.loads((out / "summary.json").read_text()) | {"command_wall_s": command_wall}


def run_lightning(config: TrainConfig, out: Path, loader_workers: int = 2) -> dict[str, Any]:
    """The same module, data and budget in one process with Lightning's loop and a torch DataLoader."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from viscy.data.patches import PatchSampler, PatchSpec
    from viscy.train.check import check_model
    from viscy.train.datasource import list_fovs, split_fovs
    from viscy.train.module import VSModule
    from viscy.train.worker import _phase_timers

    start = time.time()
    data, tc = config.data, config.trainer
    card = check_model(config)
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
            per_batch = max(1, global_batch // pps)  # whole batches per DataLoader worker
            for k in (k for k in range(self.n_reads) if (k // per_batch) % nw == wid):
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
            num_workers=loader_workers,
            persistent_workers=True,
            drop_last=True,
        )
        for fovs, n, augment, seed in ((split.train, train_reads, True, None), (split.val, val_reads, False, 0))
    ]
    module = VSModule(
        card.name,
        card.kwargs,
        data.source_channels,
        data.target_channels,
        tc.model_dump(mode="json"),
        figure_dir=str(out / "figures"),
    )
    timers = _phase_timers(out / "timings" / "rank0.json", start)
    trainer = pl.Trainer(
        max_epochs=tc.max_epochs,
        accelerator="gpu" if tc.use_gpu else "cpu",
        devices=1,
        precision=tc.precision if tc.use_gpu else "32",
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
    ("wall_s", "in-process wall time, call to return (s)"),
    ("ray_start_s", "Ray start, what the driver waited for (s)"),
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
    ("after_fit_s", "after fit: Ray Train returns, best model export (s)"),
]


ROWS = [("command_wall_s", "command wall time, process start to exit (s)"), *ROWS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=16, help="epochs of both runs (the demo trains 16)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--gpu", action="store_true", help="a GPU job (see above) instead of the CPU demo")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs; the table shows the median pair")
    parser.add_argument(
        "--lightning-run", nargs=2, metavar=("CONFIG", "DIR"), help="(internal) run the baseline command only"
    )
    args = parser.parse_args()
    import ray

    if args.lightning_run:
        config = TrainConfig.model_validate(yaml.safe_load(Path(args.lightning_run[0]).read_text()))
        out = Path(args.lightning_run[1])
        out.mkdir(parents=True, exist_ok=True)
        loaders = 8 if config.trainer.use_gpu else 2
        (out / "summary.json").write_text(json.dumps(run_lightning(config, out, loader_workers=loaders)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        synth = SynthConfig(output=Path(tmp) / "demo.zarr")
        if args.gpu:
            synth = synth.model_copy(update={"yx": (1024, 1024), "z": 8, "fovs_per_well": 2})
        plate = write_synthetic_plate(synth)
        run_preprocess(PreprocessConfig(data_path=plate, grid_spacing=4 if not args.gpu else 16), progress=False)
        ray.shutdown()  # the commands below start their own; this one would only take CPU from them
        config = demo_train_config(plate, Path(tmp) / "runs", epochs=args.epochs, run_name="overhead")
        if args.gpu:
            config = gpu_config(config)
        pairs = []
        for k in range(args.repeats):  # alternated, so a slower spell of a shared machine hits both
            run = config.model_copy(update={"trainer": config.trainer.model_copy(update={"run_name": f"overhead{k}"})})
            config_path = Path(tmp) / f"train{k}.yaml"
            config_path.write_text(yaml.safe_dump(run.model_dump(mode="json")))
            baseline = run_lightning_command(config_path, Path(tmp) / f"lightning{k}", Path(tmp) / f"lightning{k}.log")
            viscy = run_viscy(config_path, run, Path(tmp) / f"viscy{k}.log")
            pairs.append((viscy, baseline))
            ratio = viscy["command_wall_s"] / baseline["command_wall_s"]
            walls = f"viscy train {viscy['command_wall_s']:.1f} s, Lightning {baseline['command_wall_s']:.1f} s"
            print(f"run {k + 1}: {walls}, ratio {ratio:.2f}")
    # the pair with the median command ratio
    viscy, baseline = sorted(pairs, key=lambda p: p[0]["command_wall_s"] / p[1]["command_wall_s"])[len(pairs) // 2]
    print(f"{'GPU' if args.gpu else 'demo'} training, {args.epochs} epochs, same module and budget:")
    print(f"{'':55s} {'viscy train':>12s} {'Lightning':>12s}")
    for key, label in ROWS:
        print(f"{label:55s} {viscy[key]:12.3f} {baseline[key]:12.3f}")
    commands = viscy["command_wall_s"] / baseline["command_wall_s"]
    print(f"ratio of command wall times, viscy train / single-process Lightning (goal <= 1.2): {commands:.2f}")
    in_process = viscy["wall_s"] / baseline["wall_s"]
    print(f"ratio of in-process wall times (imports and config check excluded): {in_process:.2f}")
    print(f"val Pearson, viscy: {viscy['val_pearson']}  Lightning: {baseline['val_pearson']}")
    if args.json:
        print(json.dumps({"viscy": viscy, "lightning": baseline}))


if __name__ == "__main__":
    main()
