"""The embedded default job behind ``make demo``.

Synthesise a plate → preprocess it → train a small 2D U-Net with Ray Train → export the best weights to
ONNX → predict and segment the held-out FOVs in one Ray Data pass (masks and a per-cell table) → evaluate them
(regression and segmentation metrics, on those masks).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import Field

from viscy import api
from viscy.config import StrictModel, save_config
from viscy.data.config import SynthConfig


class DemoConfig(StrictModel):
    """The embedded default job: synthesise, preprocess, train, export, predict held-out FOVs, evaluate."""

    workdir: Path = Field(Path("demo_output"), description="Directory for the plate and every result.")
    synth: SynthConfig = Field(default_factory=SynthConfig)
    fg_mask_channel: str | None = Field("Nuclei", description="Channel for the foreground mask; null: none.")
    train: bool = Field(
        True, description="Train a small model with Ray Train, then export, predict and evaluate held-out FOVs."
    )
    train_epochs: int = Field(16, ge=1, description="Training epochs of the demo model.")
    train_workers: int = Field(2, ge=1, description="Ray Train workers of the demo (CPU, gloo).")


def run_demo(config: DemoConfig) -> None:
    """Run the whole pipeline on a synthetic plate in ``config.workdir``."""
    from viscy.console import place_log
    from viscy.data.plate import summarize_plate
    from viscy.data.synth import write_synthetic_plate

    started = time.perf_counter()
    workdir = config.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir, "demo")
    print(f"viscy demo: outputs in {workdir.resolve()}; log {place_log(workdir)}")
    steps = 7 if config.train else 3
    synth = config.synth.model_copy(update={"output": workdir / "synthetic.zarr", "overwrite": True})
    print(f"[1/{steps}] synthesising {synth.output} ...")
    plate_path = write_synthetic_plate(synth)
    print(f"[2/{steps}] computing normalisation statistics with Ray ...")
    # A 4-pixel grid: VisCy's 32 leaves only 64 pixels per 256x256 FOV, and std estimates off by 2x.
    fg_mask = {"channel": config.fg_mask_channel} if config.fg_mask_channel else None
    api.preprocess(data_path=plate_path, fg_mask=fg_mask, grid_spacing=4)
    print(f"[3/{steps}] plate summary")
    print(summarize_plate(plate_path))
    if config.train:
        _train_predict_evaluate(config, plate_path)
    print(f"viscy demo: finished in {time.perf_counter() - started:.1f} s; outputs in {workdir.resolve()}")


def _train_predict_evaluate(config: DemoConfig, plate_path) -> None:
    from viscy.train.demo_settings import demo_train_config

    workdir = config.workdir
    print(f"[4/7] training a small 2D U-Net with {config.train_workers} Ray Train workers on CPU ...")
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    train_cfg = demo_train_config(plate_path, workdir / "runs", config.train_epochs, config.train_workers, run_name)
    trained = api.train(train_cfg)
    if trained.best_model is None:
        raise RuntimeError("training reported no checkpoint; nothing to predict with")
    val_fovs = [
        entry.split("::", 1)[1] for entry in json.loads((trained.run_dir / "run_info.json").read_text())["split"]["val"]
    ]

    # The best model carries its card: export and predict need no channel or normalisation settings.
    print("[5/7] exporting the best model to ONNX ...")
    exported = api.export(
        model={"checkpoint": trained.best_model}, output=workdir / "model" / "demo_unet2d.onnx", overwrite=True
    )

    print(f"[6/7] predicting and segmenting the held-out FOVs {', '.join(val_fovs)} with Ray Data (ONNX) ...")
    predicted = api.predict(
        data_path=[plate_path],
        positions=val_fovs,
        onnx=exported.onnx,
        output=workdir / "predictions.zarr",
        overwrite=True,
        denormalize=True,
        segment={"method": "classical", "measure_channels": ["Phase3D"]},
    )
    store = predicted.outputs[0]
    print(
        f"  {predicted.objects} nuclei: masks {store / val_fovs[0] / 'labels' / predicted.masks[0]}, per-cell table "
        f"{store / 'viscy_objects.csv'}\n  view: napari --plugin napari-ome-zarr {store / val_fovs[0]}"
    )

    print("[7/7] evaluating predictions (and their masks) against the targets and the ground-truth nuclei ...")
    api.evaluate(
        data_path=plate_path,
        prediction_path=store,
        positions=val_fovs,
        segmentation={"method": "classical", "use_ground_truth_labels": "nuclei"},
        output_dir=workdir / "evaluation",
    )
