"""The embedded default job behind ``make demo``.

Synthesise a plate → preprocess it → train a small 2D U-Net with Ray Train → export the best weights to
ONNX → predict the held-out FOVs with Ray Data → evaluate them (regression and segmentation metrics).
"""

from __future__ import annotations

import json
import time

from viscy.config import (
    DemoConfig,
    EvaluateConfig,
    ExportConfig,
    ForegroundMaskConfig,
    ModelConfig,
    PredictConfig,
    PreprocessConfig,
    SegmentationConfig,
    save_config,
)


def run_demo(config: DemoConfig) -> None:
    """Run the whole pipeline on a synthetic plate in ``config.workdir``."""
    from viscy.data.plate import summarize_plate
    from viscy.data.preprocess import preprocess_plate
    from viscy.data.synth import write_synthetic_plate

    started = time.perf_counter()
    workdir = config.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir, "demo")
    steps = 7 if config.train else 3
    synth = config.synth.model_copy(update={"output": workdir / "synthetic.zarr", "overwrite": True})
    print(f"[1/{steps}] synthesising {synth.output} ...")
    plate_path = write_synthetic_plate(synth)
    print(f"[2/{steps}] computing normalisation statistics with Ray ...")
    fg = ForegroundMaskConfig(channel=config.fg_mask_channel) if config.fg_mask_channel else None
    # A 4-pixel grid: VisCy's 32 leaves only 64 pixels per 256x256 FOV, and std estimates off by 2x.
    summary = preprocess_plate(PreprocessConfig(data_path=plate_path, fg_mask=fg, grid_spacing=4))
    print(f"      {len(summary['fovs'])} FOVs in {summary['seconds']:.1f} s; skipped: {summary['skipped'] or 'none'}")
    print(f"[3/{steps}] plate summary")
    print(summarize_plate(plate_path))
    if config.train:
        _train_predict_evaluate(config, plate_path)
    print(f"demo finished in {time.perf_counter() - started:.1f} s; outputs in {workdir.resolve()}")


def _train_predict_evaluate(config: DemoConfig, plate_path) -> None:
    from viscy.evaluate.run import run_evaluate
    from viscy.models.export import run_export
    from viscy.predict.run import predict_plates
    from viscy.train.demo_settings import demo_train_config
    from viscy.train.trainer import run_train

    workdir = config.workdir
    print(f"[4/7] training a small 2D U-Net with {config.train_workers} Ray Train workers on CPU ...")
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    train_cfg = demo_train_config(plate_path, workdir / "runs", config.train_epochs, config.train_workers, run_name)
    trained = run_train(train_cfg)
    if trained["best_model"] is None:
        raise RuntimeError("training reported no checkpoint; nothing to predict with")
    val_fovs = [
        entry.split("::", 1)[1]
        for entry in json.loads((trained["run_dir"] / "run_info.json").read_text())["split"]["val"]
    ]

    print("[5/7] exporting the best weights to ONNX ...")
    model = ModelConfig(name=train_cfg.model.name, kwargs=train_cfg.model.kwargs, checkpoint=trained["best_model"])
    onnx_path = workdir / "model" / "demo_unet2d.onnx"
    run_export(ExportConfig(model=model, output=onnx_path, example_yx=(256, 256)))

    print(f"[6/7] predicting the held-out FOVs {', '.join(val_fovs)} with Ray Data (ONNX) ...")
    predictions = workdir / "predictions.zarr"
    predict_plates(
        PredictConfig(
            data_path=[plate_path],
            positions=val_fovs,
            onnx=onnx_path,
            output=predictions,
            overwrite=True,
            source_channel=train_cfg.data.source_channel,
            target_channel=train_cfg.data.target_channel,
            normalization=train_cfg.data.normalization,
            denormalize=True,
        )
    )

    print("[7/7] evaluating predictions against the targets and the ground-truth nuclei ...")
    run_evaluate(
        EvaluateConfig(
            data_path=plate_path,
            prediction_path=predictions,
            positions=val_fovs,
            target_channel=train_cfg.data.target_channel,
            segmentation=SegmentationConfig(method="classical", channel="Nuclei", use_ground_truth_labels="nuclei"),
            output_dir=workdir / "evaluation",
        )
    )
    print(
        f"results: checkpoints and figures under {trained['run_dir']}, ONNX model {onnx_path}, predictions "
        f"{predictions}, metrics and figures under {workdir / 'evaluation'}"
    )
