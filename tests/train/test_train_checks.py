"""``viscy train`` refuses what cannot work before Ray starts (model vs data, run directory) and, once Ray is
up, a worker group the cluster can never schedule; the model is checked once, on the driver; failures of Ray
tasks read as one line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from viscy.api import resolve_config
from viscy.config import ConfigError
from viscy.console import failure_message
from viscy.train.check import check_model
from viscy.train.config import TrainConfig
from viscy.train.trainer import RUN_INFO, check_run_dir, run_train

UNET = {"in_channels": 1, "out_channels": 2, "num_blocks": 2, "num_filters": 4}


def _tree(plate: Path, storage: Path, **trainer) -> dict:
    return {
        "data": {"data_path": [str(plate)], "yx_patch_size": [32, 32], "batch_size": 2, "val_fraction": 0.34},
        "model": {"name": "unet2d", "kwargs": dict(UNET)},
        "trainer": {"max_epochs": 1, "num_workers": 1, "cpus_per_worker": 0.5, "storage_path": str(storage),
                    "run_name": "run"} | trainer,
    }


def test_model_data_mismatch_fails_in_seconds_without_ray(small_plate, tmp_path, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("the model check started Ray")

    monkeypatch.setattr(ray, "init", no_ray)  # (a shared test cluster may be running: it is left alone)
    tree = _tree(small_plate, tmp_path)
    tree["model"]["kwargs"] |= {"in_channels": 2, "out_channels": 3}
    tree["data"]["yx_patch_size"] = [30, 32]
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_model(resolve_config(TrainConfig, tree))
    assert time.monotonic() - started < 5
    text = str(err.value)
    assert "model unet2d does not fit the data" in text
    assert "--model.kwargs.in_channels 1" in text and "--model.kwargs.out_channels 2" in text
    assert "--data.yx_patch_size 32 32" in text
    assert not (tmp_path / "run").exists()


def test_unknown_default_model_name_is_named(small_plate, tmp_path):
    tree = _tree(small_plate, tmp_path)
    tree["model"] = {"name": "unet9d"}
    config = resolve_config(TrainConfig, tree)  # values are valid; the model check names the model
    with pytest.raises(ConfigError, match="unet9d") as err:
        run_train(config)
    assert "unet2d" in str(err.value) and "VSCyto3D" in str(err.value)  # the allowed names
    assert not (tmp_path / "run").exists()


def test_model_is_checked_once_on_the_driver_and_its_card_goes_to_the_workers(small_plate, tmp_path, monkeypatch):
    """run_train resolves the model and builds its spec once, before Ray; the card it sends the workers rebuilds
    without another resolution."""
    import viscy.models
    import viscy.ray_utils
    from viscy.models.card import ModelCard

    built, resolved = [], []
    spec, resolve = viscy.models.model_spec, viscy.models.resolve_model_source
    monkeypatch.setattr(viscy.models, "model_spec", lambda *a, **k: built.append(a) or spec(*a, **k))
    monkeypatch.setattr(viscy.models, "resolve_model_source", lambda *a, **k: resolved.append(a) or resolve(*a, **k))

    class RayWouldStart(Exception):
        pass

    def stop(*args, **kwargs):
        raise RayWouldStart

    monkeypatch.setattr(viscy.ray_utils, "ensure_ray", stop)
    config = resolve_config(TrainConfig, _tree(small_plate, tmp_path))
    assert (built, resolved) == ([], [])  # validation builds nothing
    with pytest.raises(RayWouldStart):
        run_train(config)
    assert len(built) == 1 and len(resolved) == 1
    # what a worker does with its loop config: validate the config, read the card (nothing is resolved again)
    card = check_model(config, "run")
    built.clear(), resolved.clear()
    TrainConfig.model_validate(config.model_dump(mode="json"))
    again = ModelCard.from_dict(card.to_dict())
    assert (built, resolved) == ([], []) and again == card


def test_run_dir_with_user_files_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files viscy did not write"):
        check_run_dir(run_dir, str(tmp_path), "run", resume=False)
    assert (run_dir / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_run_dir(tmp_path / "file", str(tmp_path), "file", resume=False)
    # an interrupted viscy run (run_info.json, no Ray checkpoint yet) may be restarted in place
    (run_dir / "notes.txt").unlink()
    (run_dir / RUN_INFO).write_text("{}")
    check_run_dir(run_dir, str(tmp_path), "run", resume=False)


def test_impossible_worker_group_fails_within_a_minute(small_plate, tmp_path, ray_local):
    cluster_cpus = ray_local.cluster_resources()["CPU"]
    cases = {
        "GPU": {"use_gpu": True, "num_workers": 1},
        "CPU(s) leaves": {"num_workers": int(cluster_cpus) * 2, "cpus_per_worker": 0.5},
        "more than any node has": {"cpus_per_worker": cluster_cpus + 1},
    }
    for expected, trainer in cases.items():
        config = resolve_config(TrainConfig, _tree(small_plate, tmp_path, **trainer, run_name=f"r{len(expected)}"))
        started = time.monotonic()
        with pytest.raises(ConfigError, match="can never be scheduled") as err:
            run_train(config)
        assert time.monotonic() - started < 60
        assert expected in str(err.value)
        assert not (tmp_path / config.trainer.run_name).exists()
    # an autoscaling cluster will add nodes: the check can be turned off (not run here: it would wait)
    unchecked = resolve_config(TrainConfig, _tree(small_plate, tmp_path, check_resources=False))
    assert unchecked.trainer.check_resources is False


def test_failure_message_is_one_line_naming_the_root_cause(ray_local):
    import ray

    @ray.remote
    def read_fov() -> None:
        raise ValueError("chunk A/1/0/0/0 is truncated")

    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(read_fov.remote())
    message = failure_message(err.value)
    assert message == "ValueError: chunk A/1/0/0/0 is truncated"
    try:
        raise RuntimeError("wrapper") from KeyError("Nuclei")
    except RuntimeError as exc:
        assert failure_message(exc) == "KeyError: 'Nuclei'"


def test_validation_segmentation_is_checked_against_the_plate_before_ray(small_plate, tmp_path, monkeypatch):
    import ray

    from viscy.errors import DataError

    def no_ray(*args, **kwargs):
        raise AssertionError("the check started Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    seg = {"channels": ["Nuclei"], "labels": {"Nuclei": "nucleus"}}
    with pytest.raises(DataError, match=r"no label image 'nucleus' \(it has none\)"):
        run_train(resolve_config(TrainConfig, _tree(small_plate, tmp_path, val_segmentation=seg)))
    tree = _tree(small_plate, tmp_path, val_segmentation={"channels": ["Nuclei"]})
    tree["data"]["val_fraction"] = 0
    with pytest.raises(ConfigError, match="no validation FOVs; set data.val_fraction"):
        run_train(resolve_config(TrainConfig, tree))
    assert not (tmp_path / "run").exists()
