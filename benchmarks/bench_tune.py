"""How much of a sweep's wall time is trial start-up against training (issue goal: at most 25 % overhead).

The same trials run on a small synthetic plate, CPU, three ways:

1. back to back with the ``viscy train`` command, as a user would run them on a workstation: one process per
   trial, each starting its own local Ray (the issue's baseline);
2. back to back with ``run_train`` (what ``viscy train`` calls) in this process, on one warm local Ray cluster
   after an untimed warm-up run: the stricter baseline, with no process or cluster start at all;
3. as one ``viscy tune`` sweep on that cluster (FIFO scheduler, so no trial is cut short;
   ``max_concurrent_trials`` 1, so it does the same work in the same order), whose trials are exactly those
   runs (``points_to_evaluate``).

Prints each wall time, the sweep's overhead ``tune / baseline - 1`` against both baselines, and the same sweep
with 2 trials at a time (what a user would run) for reference.

``python benchmarks/bench_tune.py`` (4 trials of 3 epochs); ``--trials N --epochs E --json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from viscy.data.config import SynthConfig
from viscy.data.synth import write_synthetic_plate
from viscy.ray_utils import ensure_ray
from viscy.train.config import TrainConfig
from viscy.tune.config import TuneConfig

LRS = [2e-3, 1e-3, 5e-4, 3e-3, 7e-4, 1.5e-3, 4e-3, 2.5e-4]


def _tree(plate: Path, storage: Path, epochs: int) -> dict[str, Any]:
    return {
        "data": {"data_path": [str(plate)], "yx_patch_size": [64, 64], "batch_size": 8, "patches_per_stack": 8,
                 "val_fraction": 0.25, "augmentation": {"affine_prob": 0.0}},
        "model": {"name": "unet2d", "kwargs": {"in_channels": 1, "out_channels": 2, "num_blocks": 3,
                                               "num_filters": 8}},
        "trainer": {"max_epochs": epochs, "num_workers": 1, "cpus_per_worker": 0.5, "storage_path": str(storage),
                    "train_steps_per_epoch": 6, "val_steps": 2, "log_every_n_epochs": epochs, "warmup_epochs": 0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    lrs = LRS[: args.trials]

    from viscy.train.trainer import run_train
    from viscy.tune.run import run_tune

    work = Path(tempfile.mkdtemp(prefix="bench_tune_"))
    plate = work / "plate.zarr"
    write_synthetic_plate(SynthConfig(output=plate, yx=(128, 128), cell_diameter=16))
    base = _tree(plate, work / "train", args.epochs)

    # 1. the viscy train command, one process (and one local Ray) per trial; the plate's statistics first
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run([sys.executable, "-m", "viscy.cli", "preprocess", "--data_path", str(plate), "--grid_spacing",
                    "4"], env=env, check=True, capture_output=True)
    per_cli = []
    for i, lr in enumerate(lrs):
        tree = json.loads(json.dumps(base))
        tree["trainer"] |= {"lr": lr, "run_name": f"cli{i}"}
        config = work / f"cli{i}.yaml"
        config.write_text(yaml.safe_dump(tree))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "viscy.cli", "train", "--config", str(config)], env=env, check=True,
                       capture_output=True)
        per_cli.append(time.perf_counter() - t0)
    cli = sum(per_cli)

    ensure_ray(num_cpus=2)
    # warm-up, not timed: the first Train run on a fresh cluster also pays for worker processes and imports
    warm = json.loads(json.dumps(base))
    warm["trainer"] |= {"max_epochs": 1, "run_name": "warm-up"}
    run_train(TrainConfig.model_validate(warm), quiet=True)
    start = time.perf_counter()
    per_run = []
    for i, lr in enumerate(lrs):
        t0 = time.perf_counter()
        tree = json.loads(json.dumps(base))
        tree["trainer"] |= {"lr": lr, "run_name": f"t{i}"}
        run_train(TrainConfig.model_validate(tree), quiet=True)
        per_run.append(time.perf_counter() - t0)
    sequential = time.perf_counter() - start

    def sweep(name: str, concurrent: int) -> float:
        tree = _tree(plate, work / "tune", args.epochs)
        tree["search"] = {
            "experiment": name, "num_samples": len(lrs), "max_concurrent_trials": concurrent,
            "scheduler": {"name": "fifo"}, "space": {"trainer.lr": {"choice": lrs}},
            "points_to_evaluate": [{"trainer.lr": lr} for lr in lrs],
        }
        t0 = time.perf_counter()
        result = run_tune(TuneConfig.model_validate(tree))
        wall = time.perf_counter() - t0
        assert len(result.leaderboard) == len(lrs) and all(r.status == "finished" for r in result.leaderboard)
        return wall

    tuned = sweep("one-at-a-time", 1)
    tuned2 = sweep("two-at-a-time", 2)
    overhead = tuned / sequential - 1
    overhead_cli = tuned / cli - 1
    figures = {
        "trials": len(lrs), "epochs": args.epochs, "cli_back_to_back_s": round(cli, 1),
        "cli_run_s": [round(t, 1) for t in per_cli], "tune_overhead_vs_cli": round(overhead_cli, 3),
        "back_to_back_s": round(sequential, 1),
        "train_run_s": [round(t, 1) for t in per_run], "tune_1_at_a_time_s": round(tuned, 1),
        "tune_overhead": round(overhead, 3), "tune_2_at_a_time_s": round(tuned2, 1),
        "tune_2_vs_back_to_back": round(tuned2 / sequential, 3),
    }
    print(f"\n{len(lrs)} trials x {args.epochs} epochs, 1 worker x 0.5 CPU each, 2-core local Ray")
    print(f"  viscy train commands, back to back:    {cli:7.1f} s  (runs: {', '.join(f'{t:.1f}' for t in per_cli)})")
    print(f"  run_train on a warm cluster, back to back: {sequential:7.1f} s  "
          f"(runs: {', '.join(f'{t:.1f}' for t in per_run)})")
    print(f"  viscy tune, 1 at a time:               {tuned:7.1f} s  overhead {overhead_cli:+.1%} against the viscy "
          f"train commands (goal: at most +25 %), {overhead:+.1%} against the warm run_train")
    print(f"  viscy tune, 2 at a time:               {tuned2:7.1f} s  ratio {tuned2 / cli:.2f} of the commands")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
