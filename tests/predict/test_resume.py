"""A ``viscy predict`` process killed mid-way resumes: complete FOVs are skipped, the result (predictions, masks
and object table) is identical."""

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

from viscy.data.config import SynthConfig
from viscy.models.config import ModelConfig
from viscy.predict.config import PredictConfig

UNET_KW = {"in_channels": 1, "out_channels": 2, "num_blocks": 2, "num_filters": 4}
FOVS = ["A/1/0", "A/1/1", "A/2/0", "A/2/1"]
SEGMENT = {"method": "classical", "measure_channels": ["Phase3D"]}  # the first target, Nuclei
MASKS = "labels/Nuclei_prediction_masks"


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


def _cli(cfg: Path, env: dict[str, str], fault: str | None = None) -> subprocess.Popen:
    """``viscy predict --config cfg``, run through tests.faults with ``fault`` when given."""
    entry = ["-m", "tests.faults", fault, "--"] if fault else ["-m", "viscy.cli"]
    return subprocess.Popen(
        [sys.executable, *entry, "predict", "--config", str(cfg)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory, ray_local) -> dict:
    """A preprocessed 4-FOV plate and a tiny checkpoint."""
    import torch

    from tests.helpers import save_lightning_checkpoint
    from viscy.data.config import PreprocessConfig
    from viscy.data.preprocess import run_preprocess
    from viscy.data.synth import write_synthetic_plate
    from viscy.models import create_model

    root = tmp_path_factory.mktemp("resume")
    plate = write_synthetic_plate(SynthConfig(output=root / "plate.zarr", cols=["1", "2"], yx=(64, 64)))
    run_preprocess(PreprocessConfig(data_path=plate), progress=False)
    torch.manual_seed(0)
    ckpt = save_lightning_checkpoint(create_model("unet2d", **UNET_KW), root / "m.ckpt")
    return {"plate": plate, "ckpt": ckpt}


def _tree(job: dict, out: Path, **kw) -> dict:
    return {
        "data_path": [str(job["plate"])], "output": str(out), "progress": False, "tile_yx": [32, 32],
        "model": {"name": "unet2d", "kwargs": UNET_KW, "checkpoint": str(job["ckpt"])}, **kw,
    }


def _kill_after_first_fov(cfg: Path, watched: Path, env: dict[str, str]) -> list[str]:
    """Run ``viscy predict`` slowed down in its actors; SIGKILL it once ``watched`` has a complete FOV."""
    proc = _cli(cfg, env, fault="slow_predict_units")
    deadline = time.time() + 400
    try:
        while not _complete(watched):
            assert proc.poll() is None, f"predict exited early:\n{proc.stdout.read()}"
            assert time.time() < deadline, "no FOV completed in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started (driver + its local Ray)
        proc.wait()
    done = _complete(watched)
    assert 1 <= len(done) < len(FOVS)
    return done


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "token"}


@pytest.mark.slow
def test_killed_replacement_keeps_old_store_and_resumes_identically(tmp_path, job):
    """``overwrite: true`` (a job that also segments) killed mid-way: the old store is untouched; the rerun skips
    the complete FOVs, swaps the replacement in, and predictions, masks and table equal an uninterrupted run's."""
    import pandas as pd
    import zarr

    from viscy.predict.run import run_predict

    out = tmp_path / "pred.zarr"
    old_tree = _tree(job, out, tile_yx=None)
    run_predict(PredictConfig(**{**old_tree, "model": ModelConfig(**old_tree["model"])}))
    old_files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    old_fp = json.loads((out / ".zattrs").read_text())["viscy_prediction"]["fingerprint"]

    tree = _tree(job, out, overwrite=True, segment=SEGMENT)
    cfg = tmp_path / "replace.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    partial = tmp_path / "pred.zarr.viscy-partial"
    done_before = _kill_after_first_fov(cfg, partial, _env())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == old_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.zarr", "pred.zarr.viscy-partial", "replace.yaml"]

    rerun = _cli(cfg, _env())
    stdout, _ = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, stdout
    assert f"{len(done_before)} FOV(s) already complete" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.zarr", "replace.yaml"]
    assert _complete(out) == FOVS
    state = json.loads((out / ".zattrs").read_text())["viscy_prediction"]
    assert state["store"] is True and state["fingerprint"] != old_fp
    assert yaml.safe_load((out / "viscy_config.yaml").read_text())["tile_yx"] == [32, 32]

    ref = tmp_path.parent / f"{tmp_path.name}-ref.zarr"
    ref_tree = {**tree, "output": str(ref), "overwrite": False}
    run_predict(PredictConfig(**{**ref_tree, "model": ModelConfig(**tree["model"])}))
    for fov in FOVS:
        resumed, uninterrupted = zarr.open_array(str(out / fov / "0"))[:], zarr.open_array(str(ref / fov / "0"))[:]
        assert np.abs(resumed).max() > 0
        np.testing.assert_array_equal(resumed, uninterrupted)
        masks = zarr.open_array(str(out / fov / MASKS / "0"))[:]
        np.testing.assert_array_equal(masks, zarr.open_array(str(ref / fov / MASKS / "0"))[:])
        assert json.loads((out / fov / MASKS / ".zattrs").read_text())["viscy_segmentation"]["complete"] is True
    table = pd.read_parquet(out / "viscy_objects.parquet")
    assert len(table) > 0 and set(table.fov) == set(FOVS)
    pd.testing.assert_frame_equal(table, pd.read_parquet(ref / "viscy_objects.parquet"))
