"""Real Ray Train runs: 2 CPU workers (gloo, 0.5 CPU each) on a tiny synthetic plate; resume; a failing worker.

Storage by URI (``file://``) and a lost worker (every process of a node killed mid-run: the group restarts from
the last checkpoint) are tested on the two-node cluster in tests/clusters/test_multinode.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults import inject
from tests.helpers import report_recorder
from viscy.config import ConfigError, load_config
from viscy.data.config import PreprocessConfig, SynthConfig
from viscy.data.preprocess import run_preprocess
from viscy.data.synth import write_synthetic_plate
from viscy.models import create_model, load_checkpoint, read_card
from viscy.train.config import TrainConfig
from viscy.train.trainer import BEST_MODEL, TrainingError, run_train

pytestmark = pytest.mark.slow
UNET = {"in_channels": 1, "out_channels": 2, "num_blocks": 2, "num_filters": 4}


@pytest.fixture(scope="module")
def plate(tmp_path_factory, ray_local) -> Path:
    path = tmp_path_factory.mktemp("train") / "synth.zarr"
    write_synthetic_plate(SynthConfig(output=path, yx=(64, 64), cell_diameter=12))
    run_preprocess(PreprocessConfig(data_path=path), progress=False)
    return path


def _config(plate: Path, storage: Path, name: str, epochs: int = 2, **trainer) -> TrainConfig:
    return TrainConfig.model_validate({
        "data": {"data_path": [str(plate)], "yx_patch_size": [32, 32], "batch_size": 4, "patches_per_stack": 4,
                 "val_fraction": 0.25, "augmentation": {"affine_prob": 0.0}},
        "model": {"name": "unet2d", "kwargs": UNET},
        "trainer": {"max_epochs": epochs, "num_workers": 2, "cpus_per_worker": 0.5, "storage_path": str(storage),
                    "run_name": name, "train_steps_per_epoch": 2, "val_steps": 1, "log_every_n_epochs": 1,
                    "lr": 1e-3,
                    "val_segmentation": {"channels": ["Nuclei", "Membrane"], "labels": {"Nuclei": "nuclei"},
                                         "diameter": 12}} | trainer,
    })


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_*/checkpoint.ckpt"))


def test_train_resume_and_refuse_overwrite(plate, tmp_path, capsys):
    trained = run_train(_config(plate, tmp_path, "run"))
    console = capsys.readouterr().out
    # one line per epoch, relayed from rank 0 once, with the per-channel validation Pearson
    assert console.count("epoch 1/2 ") == 1 and console.count("epoch 2/2 ") == 1, console
    assert "val Pearson Nuclei" in console and "val AP50 Nuclei" in console and "best model" in console
    run_dir = tmp_path / "run"
    assert trained.run_dir == run_dir and trained.epochs == 2
    assert len(_checkpoints(run_dir)) == 2
    m = trained.metrics
    assert {"val_loss", "train_loss", "val_pearson_Nuclei", "val_ssim_Membrane", "val_psnr_Nuclei",
            "val_mae_Membrane", "train_samples_per_s"} <= set(m)
    # segmentation scores of the validation predictions: Nuclei against the plate's labels, Membrane its target's
    scores = [m[f"val_{s}_{c}"] for s in ("ap50", "f1") for c in ("Nuclei", "Membrane")]
    assert all(0 <= v <= 1 for v in scores), scores
    best = run_dir / BEST_MODEL
    assert trained.best_model == best
    load_checkpoint(create_model("unet2d", **UNET), best)
    card = read_card(best)  # the weights describe themselves: export and predict need nothing else
    assert card == trained.card and card.name == "unet2d" and card.kwargs == UNET | {"in_stack_depth": 1}
    assert card.source_channels == ["Phase3D"] and card.target_channels == ["Nuclei", "Membrane"]
    # the default catch-all normalisation, recorded for the channels it was applied to
    assert card.spec.in_channels == 1 and card.normalization[0]["channels"] == ["Phase3D", "Nuclei", "Membrane"]
    assert card.training["run_name"] == "run" and "val_loss" in card.training["metrics"]
    assert load_config(TrainConfig, run_dir / "viscy_config.yaml").trainer.run_name == "run"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert "git_commit" in info and set(info["split"]) == {"train", "val"}
    assert sorted(p.name for p in (run_dir / "figures").glob("*.png")) == ["epoch_0000.png", "epoch_0001.png"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    with pytest.raises(ConfigError, match="resume"):
        run_train(_config(plate, tmp_path, "run"))
    with pytest.raises(ConfigError, match="no run to continue"):
        run_train(_config(plate, tmp_path, "other", resume=True))

    plain, replayed = tmp_path / "reports_plain.txt", tmp_path / "reports_replayed.txt"
    resumed = run_train(_config(plate, tmp_path, "run", epochs=3, resume=True),
                        callbacks=[report_recorder(str(plain))])
    assert resumed.epochs == 3
    assert resumed.result.metrics["step"] == 3 * 2  # 2 steps per epoch, none repeated
    assert plain.read_text().split() == ["2"]  # only the new epoch is reported
    # A tune trial continues a run that may have finished unseen: it reports the restored epochs again first.
    again = run_train(_config(plate, tmp_path, "run", epochs=3, resume=True), replay_history=True,
                      callbacks=[report_recorder(str(replayed))])
    assert replayed.read_text().split() == ["0", "1", "2"]
    assert again.epochs == 3 and again.result.metrics["step"] == 3 * 2  # nothing trained again
    assert len(_checkpoints(run_dir)) == 2  # num_to_keep


def test_worker_failure_is_one_line_naming_the_cause(plate, tmp_path, monkeypatch):
    inject(monkeypatch, "fail_rank0_at_epoch1")
    with pytest.raises(TrainingError) as err:
        run_train(_config(plate, tmp_path, "buggy", epochs=2))
    message = str(err.value)
    assert "worker rank 0: InjectedFault: simulated bug in the training step" in message, message
    assert "Traceback" not in message and "--trainer.run_name buggy --trainer.resume true" in message
