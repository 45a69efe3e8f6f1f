"""``ray job submit --working-dir . -- viscy train`` against a head started on loopback with token auth."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_head import ray_head

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head node of our own with token auth (Ray's default since 2.59)."""
    with ray_head(tmp_path_factory.mktemp("head"), _env()) as started:
        yield started.dashboard


def test_job_submit_viscy_train(head, tmp_path):
    from viscy.config import SynthConfig
    from viscy.data.synth import write_synthetic_plate

    plate = write_synthetic_plate(SynthConfig(output=tmp_path / "synth.zarr", yx=(64, 64), cell_diameter=12))
    cfg = {
        "data": {"data_path": [str(plate)], "yx_patch_size": [32, 32], "batch_size": 4, "patches_per_stack": 4,
                 "val_fraction": 0.25, "augmentation": None},
        "model": {"name": "unet2d", "kwargs": {"in_channels": 1, "out_channels": 2, "num_blocks": 2,
                                              "num_filters": 4}},
        "trainer": {"max_epochs": 1, "num_workers": 2, "storage_path": str(tmp_path / "runs"), "run_name": "job",
                    "train_steps_per_epoch": 2, "val_steps": 1},
    }
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    py = sys.executable
    entry = (f"{py} -m viscy.cli preprocess --data_path {plate} && "
             f"{py} -m viscy.cli train --config {cfg_path}")
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head, "--working-dir", ".",
           "--runtime-env-json", '{"env_vars": {"WANDB_MODE": "offline"}}', "--", "bash", "-c", entry]
    for _ in range(10):  # the job agent can come up a little after the dashboard answers
        out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=480)
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout.lower()
    assert "val Pearson Nuclei" in out.stdout
    assert (tmp_path / "runs" / "job" / "best_model.pt").is_file()
