"""The small training job of ``viscy demo`` (also written out as ``configs/demo.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from viscy.train.config import TrainConfig


def demo_train_dict(plate: str | Path, storage: str | Path, epochs: int = 16, workers: int = 2) -> dict[str, Any]:
    """Config tree of the demo: a small 2D U-Net from phase to nuclei and membrane on CPU."""
    return {
        "data": {
            "data_path": [str(plate)],
            "source_channels": ["Phase3D"],
            "target_channels": ["Nuclei", "Membrane"],
            "yx_patch_size": [96, 96],
            "batch_size": 8,
            "patches_per_stack": 8,
            "val_fraction": 0.25,
            # Flips and 90-degree rotations only: a short CPU run converges faster without the heavy ones.
            "augmentation": {
                "affine_prob": 0.0,
                "contrast_prob": 0.0,
                "intensity_scale_prob": 0.0,
                "noise_prob": 0.0,
                "smooth_prob": 0.0,
            },
            "normalization": [
                {"channels": ["Phase3D"], "level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"},
                {"channels": ["Nuclei", "Membrane"], "level": "fov_statistics", "subtrahend": "mean", "divisor": "std"},
            ],
        },
        "model": {
            "name": "unet2d",
            "kwargs": {"in_channels": 1, "out_channels": 2, "num_blocks": 3, "num_filters": 16},
        },
        "trainer": {
            "max_epochs": epochs,
            "lr": 2e-3,
            "warmup_epochs": 1,
            "schedule": "WarmupCosine",
            "num_workers": workers,
            "cpus_per_worker": 0.5,
            "storage_path": str(storage),
            "train_steps_per_epoch": 10,
            "val_steps": 3,
            "log_every_n_epochs": 4,
            "num_to_keep": 2,
            # Each epoch also scores the nuclei segmented from the validation predictions (val_ap50_Nuclei).
            "val_segmentation": {"channels": ["Nuclei"], "labels": {"Nuclei": "nuclei"}},
        },
        "logging": {"wandb": False},
    }


def demo_train_config(
    plate: str | Path, storage: str | Path, epochs: int = 16, workers: int = 2, run_name: str | None = None
) -> TrainConfig:
    """Validated demo training config."""
    tree = demo_train_dict(plate, storage, epochs, workers)
    tree["trainer"]["run_name"] = run_name
    return TrainConfig.model_validate(tree)
