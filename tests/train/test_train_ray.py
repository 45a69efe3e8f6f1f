"""Real Ray Train runs: 2 CPU workers (gloo, 0.5 CPU each) on a tiny synthetic plate; resume; worker kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from viscy.config import ConfigError, PreprocessConfig, SynthConfig, TrainConfig, load_config
from viscy.data.preprocess import preprocess_plate
from viscy.data.synth import write_synthetic_plate
from viscy.models import create_model, load_checkpoint
from viscy.train.trainer import BEST_MODEL, run_train

pytestmark = pytest.mark.slow
UNET = {"in_channels": 1, "out_channels": 2, "num_blocks": 2, "num_filters": 4}


@pytest.fixture(scope="module")
def plate(tmp_path_factory, ray_local) -> Path:
    path = tmp_path_factory.mktemp("train") / "synth.zarr"
    write_synthetic_plate(SynthConfig(output=path, yx=(64, 64), cell_diameter=12))
    preprocess_plate(PreprocessConfig(data_path=path), progress=False)
    return path


def _config(plate: Path, storage: Path, name: str, epochs: int = 2, **trainer) -> TrainConfig:
    return TrainConfig.model_validate({
        "data": {"data_path": [str(plate)], "yx_patch_size": [32, 32], "batch_size": 4, "patches_per_stack": 4,
                 "val_fraction": 0.25, "augmentation": {"affine_prob": 0.0}},
        "model": {"name": "unet2d", "kwargs": UNET},
        "trainer": {"max_epochs": epochs, "num_workers": 2, "cpus_per_worker": 0.5, "storage_path": str(storage),
                    "run_name": name, "train_steps_per_epoch": 2, "val_steps": 1, "log_every_n_epochs": 1,
                    "lr": 1e-3} | trainer,
    })


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_*/checkpoint.ckpt"))


def test_train_resume_and_refuse_overwrite(plate, tmp_path):
    summary = run_train(_config(plate, tmp_path, "run"))
    run_dir = tmp_path / "run"
    assert summary["run_dir"] == run_dir and summary["epochs"] == 2
    assert len(_checkpoints(run_dir)) == 2
    m = summary["metrics"]
    assert {"val_loss", "train_loss", "val_pearson_Nuclei", "val_ssim_Membrane", "val_psnr_Nuclei",
            "val_mae_Membrane", "train_samples_per_s"} <= set(m)
    best = run_dir / BEST_MODEL
    assert summary["best_model"] == best
    load_checkpoint(create_model("unet2d", **UNET), best)
    assert load_config(TrainConfig, run_dir / "viscy_config.yaml").trainer.run_name == "run"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert "git_commit" in info and set(info["split"]) == {"train", "val"}
    assert sorted(p.name for p in (run_dir / "figures").glob("*.png")) == ["epoch_0000.png", "epoch_0001.png"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    with pytest.raises(ConfigError, match="resume"):
        run_train(_config(plate, tmp_path, "run"))
    with pytest.raises(ConfigError, match="no run to continue"):
        run_train(_config(plate, tmp_path, "other", resume=True))

    resumed = run_train(_config(plate, tmp_path, "run", epochs=3, resume=True))
    assert resumed["epochs"] == 3
    assert resumed["result"].metrics["step"] == 3 * 2  # 2 steps per epoch, none repeated
    assert len(_checkpoints(run_dir)) == 2  # num_to_keep


def test_worker_kill_is_retried_from_checkpoint(plate, tmp_path):
    marker = tmp_path / "killed"
    cfg = _config(plate, tmp_path, "faulty", epochs=3, max_failures=1)
    cfg.logging.wandb = True
    summary = run_train(cfg, crash_once=f"{marker}:2")
    assert marker.exists()
    assert summary["epochs"] == 3 and summary["result"].metrics["step"] == 3 * 2
    assert list((tmp_path / "faulty" / "wandb").glob("offline-run-*"))


def test_uri_storage_keeps_checkpoints_and_run_files_there(plate, tmp_path, monkeypatch):
    store, cwd = tmp_path / "store", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = store.as_uri()  # file:///...: resolved by pyarrow like s3:// or gs://
    with pytest.raises(ConfigError, match="no run to continue"):
        run_train(_config(plate, uri, "remote", epochs=1, resume=True))
    summary = run_train(_config(plate, uri, "remote", epochs=1))
    remote = store / "remote"
    assert summary["run_dir"] == cwd / "viscy_runs" / "remote"
    assert len(_checkpoints(remote)) == 1
    load_checkpoint(create_model("unet2d", **UNET), remote / BEST_MODEL)
    assert (remote / "viscy_config.yaml").exists() and (remote / "run_info.json").exists()
    assert [p.name for p in (remote / "figures").glob("*.png")] == ["epoch_0000.png"]
    assert list((remote / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ConfigError, match="already exists"):
        run_train(_config(plate, uri, "remote", epochs=1))
