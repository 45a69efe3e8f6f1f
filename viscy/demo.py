"""The embedded default job behind ``make demo``: synthesise a plate, preprocess it, summarise it."""

from __future__ import annotations

import time

from viscy.config import DemoConfig, ForegroundMaskConfig, PreprocessConfig, save_config


def run_demo(config: DemoConfig) -> None:
    """Run every stage that exists on a synthetic plate in ``config.workdir``."""
    from viscy.data.plate import summarize_plate
    from viscy.data.preprocess import preprocess_plate
    from viscy.data.synth import write_synthetic_plate

    started = time.perf_counter()
    workdir = config.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir, "demo")
    synth = config.synth.model_copy(update={"output": workdir / "synthetic.zarr", "overwrite": True})
    print(f"[1/3] synthesising {synth.output} ...")
    plate_path = write_synthetic_plate(synth)
    print("[2/3] computing normalisation statistics with Ray ...")
    fg = ForegroundMaskConfig(channel=config.fg_mask_channel) if config.fg_mask_channel else None
    summary = preprocess_plate(PreprocessConfig(data_path=plate_path, fg_mask=fg))
    print(f"      {len(summary['fovs'])} FOVs in {summary['seconds']:.1f} s; skipped: {summary['skipped'] or 'none'}")
    print("[3/3] plate summary")
    print(summarize_plate(plate_path))
    print(f"demo finished in {time.perf_counter() - started:.1f} s; outputs in {workdir.resolve()}")
