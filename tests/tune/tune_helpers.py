"""A tiny tune config over a 64² synthetic plate (shared by the tune tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

UNET = {"in_channels": 1, "out_channels": 2, "num_blocks": 2, "num_filters": 4}


def make_plate(path: Path) -> Path:
    """A 64² synthetic plate with normalisation statistics (Ray must be up)."""
    from viscy.data.config import PreprocessConfig, SynthConfig
    from viscy.data.preprocess import run_preprocess
    from viscy.data.synth import write_synthetic_plate

    write_synthetic_plate(SynthConfig(output=path, yx=(64, 64), cell_diameter=12))
    run_preprocess(PreprocessConfig(data_path=path, grid_spacing=4), progress=False)
    return path


def tune_tree(plate: Path, storage: Path, experiment: str, **search: Any) -> dict[str, Any]:
    """A tune config tree: 2-step epochs of a 4-filter U-Net, one 0.5-CPU worker per trial."""
    return {
        "data": {"data_path": [str(plate)], "yx_patch_size": [32, 32], "batch_size": 4, "patches_per_stack": 4,
                 "val_fraction": 0.25, "augmentation": {"affine_prob": 0.0}},
        "model": {"name": "unet2d", "kwargs": dict(UNET)},
        "trainer": {"max_epochs": 3, "num_workers": 1, "cpus_per_worker": 0.5, "storage_path": str(storage),
                    "train_steps_per_epoch": 2, "val_steps": 1, "log_every_n_epochs": 1, "lr": 1e-3,
                    "warmup_epochs": 0},
        "search": {"experiment": experiment, "num_samples": 4, "max_concurrent_trials": 2, "seed": 1,
                   "space": {"trainer.lr": {"loguniform": [1e-6, 3e-2]},
                             "model.kwargs.num_filters": {"choice": [4, 8]}}} | search,
    }


def _note_epoch(epoch: int, rank: int, run_dir: Path | None) -> None:
    """tests.faults' ``slow_epochs`` without its sleep: rank 0 notes each epoch it starts in its run directory."""
    from tests.faults import EPOCH_STARTS

    if rank == 0 and run_dir is not None:
        with open(run_dir / EPOCH_STARTS, "a") as f:
            f.write(f"{epoch}\n")


def note_epochs_in_ray_worker() -> None:
    """A ``worker_process_setup_hook``: every training epoch a Ray Train worker of this job starts is noted."""
    from tests.faults import _at_epoch_start

    _at_epoch_start(_note_epoch)(setattr)


def start_ray_noting_epochs(monkeypatch: Any) -> None:
    """Start this process's local Ray (2 CPUs) with :func:`note_epochs_in_ray_worker` in every worker.

    Stop it with ``ray.shutdown()`` before the test ends: no other module may join it.
    """
    import ray

    from viscy.ray_utils import ensure_ray

    init = ray.init

    def init_noting_epochs(*args: Any, **kwargs: Any) -> Any:
        runtime_env = dict(kwargs.get("runtime_env") or {}) | {"worker_process_setup_hook": note_epochs_in_ray_worker}
        return init(*args, **{**kwargs, "runtime_env": runtime_env})

    monkeypatch.setattr(ray, "init", init_noting_epochs)
    ensure_ray(num_cpus=2)
