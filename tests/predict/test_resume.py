"""A ``viscy predict`` process killed mid-way resumes: complete FOVs are skipped, the result is identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from viscy.config import ModelConfig, PredictConfig, SynthConfig

UNET_KW = {"in_channels": 1, "out_channels": 2, "num_blocks": 2, "num_filters": 4}
FOVS = ["A/1/0", "A/1/1", "A/2/0", "A/2/1"]


def _complete(out: Path) -> list[str]:
    done = []
    for fov in FOVS:
        try:
            attrs = json.loads((out / fov / ".zattrs").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if attrs.get("viscy_prediction", {}).get("complete"):
            done.append(fov)
    return done


def _cli(cfg: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "viscy.cli", "predict", "--config", str(cfg)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


@pytest.mark.slow
def test_killed_job_resumes_identically(tmp_path, ray_local):
    import torch

    from viscy.config import PreprocessConfig
    from viscy.data.preprocess import preprocess_plate
    from viscy.data.synth import write_synthetic_plate
    from viscy.models import create_model
    from viscy.models.checkpoint import save_lightning_checkpoint
    from viscy.predict.run import run_predict
    from viscy.testing import HOOK_ENV

    plate = write_synthetic_plate(SynthConfig(output=tmp_path / "plate.zarr", cols=["1", "2"], yx=(64, 64)))
    preprocess_plate(PreprocessConfig(data_path=plate), progress=False)
    torch.manual_seed(0)
    ckpt = save_lightning_checkpoint(create_model("unet2d", **UNET_KW), tmp_path / "m.ckpt")
    out = tmp_path / "out" / "pred.zarr"
    tree = {
        "data_path": [str(plate)], "output": str(out), "progress": False, "tile_yx": [32, 32],
        "model": {"name": "unet2d", "kwargs": UNET_KW, "checkpoint": str(ckpt)},
    }
    cfg = tmp_path / "predict.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "RAY_AUTH_MODE": "token", HOOK_ENV: "viscy_hooks:slow_predict_units"}
    env.pop("RAY_ADDRESS", None)

    proc = _cli(cfg, env)
    deadline = time.time() + 400
    try:
        while not _complete(out):
            assert proc.poll() is None, f"predict exited early:\n{proc.stdout.read()}"
            assert time.time() < deadline, "no FOV completed in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started (driver + its local Ray)
        proc.wait()
    done_before = _complete(out)
    assert 1 <= len(done_before) < len(FOVS)

    env.pop(HOOK_ENV)
    rerun = _cli(cfg, env)
    stdout, _ = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, stdout
    assert f"{len(done_before)} FOV(s) already complete" in stdout
    assert _complete(out) == FOVS

    ref = tmp_path / "ref.zarr"
    run_predict(PredictConfig(**{**tree, "output": ref, "model": ModelConfig(**tree["model"])}))
    import zarr

    for fov in FOVS:
        resumed, uninterrupted = zarr.open_array(str(out / fov / "0"))[:], zarr.open_array(str(ref / fov / "0"))[:]
        np.testing.assert_array_equal(resumed, uninterrupted)
