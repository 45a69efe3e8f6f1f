"""A real sweep: Ray Tune + OptunaSearch + ASHA over real Ray Train runs on a tiny synthetic plate (CPU)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from tests.tune.tune_helpers import make_plate, tune_tree
from viscy import api
from viscy.config import ConfigError, load_config
from viscy.models import read_card
from viscy.train.check import check_model
from viscy.train.config import TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plate(tmp_path_factory, ray_local) -> Path:
    return make_plate(tmp_path_factory.mktemp("tune") / "synth.zarr")


def test_sweep_stops_poor_trials_and_writes_leaderboard_figures_best_config_and_model(plate, tmp_path, capsys):
    tree = tune_tree(plate, tmp_path, "sweep", points_to_evaluate=[{"trainer.lr": 1e-2, "model.kwargs.num_filters": 8}])
    tree["logging"] = {"wandb": True, "project": "viscy-tests"}  # offline: WANDB_MODE=offline in the tests
    result = api.tune(tree)
    out = capsys.readouterr().out

    exp = tmp_path / "sweep"
    assert result.experiment_dir == exp and not result.interrupted
    rows = result.leaderboard
    assert len(rows) == 4 and {r.status for r in rows} <= {"finished", "stopped early"}, rows
    assert any(r.status == "stopped early" and r.epochs < 3 for r in rows), [(r.status, r.epochs) for r in rows]
    metrics = [r.metric for r in rows]
    assert metrics == sorted(metrics)  # best (lowest val_loss) first
    board = pd.read_csv(exp / "leaderboard.csv")
    assert list(board["trial_id"]) == [r.trial_id for r in rows] and board["stopped_early"].any()
    assert {"trainer.lr", "model.kwargs.num_filters", "val_loss", "epochs", "status"} <= set(board.columns)
    assert "stopped early by ASHA after" in out and "best config" in out and "#  trial" in out

    for name in ("learning_curves", "optimization_history", "param_importances", "parallel_coordinate"):
        png = exp / "figures" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", name

    # every trial is a viscy train run in runs/<trial id>, with its own W&B run grouped by the experiment
    for row in rows:
        run = exp / "runs" / row.trial_id
        assert (run / "viscy_config.yaml").is_file() and list(run.glob("checkpoint_*")), run
        wandb_runs = list((run / "wandb").glob("offline-run-*"))
        assert wandb_runs, f"no offline W&B run in {run}"
    # Tune's own state and per-trial TensorBoard events (tensorboard --logdir <experiment>)
    assert list(exp.glob("experiment_state-*.json")) and list(exp.glob("trial_*/events.out.tfevents.*"))

    best = rows[0]
    card = read_card(result.best_model)
    assert card.training["run_name"] == best.trial_id and card.target_channels == ["Nuclei", "Membrane"]
    assert card.kwargs["num_filters"] == best.params["model.kwargs.num_filters"]
    # the best config is a training config that viscy train takes unchanged: it loads, passes the driver's
    # model/data check and builds the best trial's model (every trial above was a viscy train run of such a config)
    best_config = load_config(TrainConfig, result.best_config)
    assert best_config.trainer.max_epochs == 3 and best_config.trainer.lr == pytest.approx(best.params["trainer.lr"])
    checked = check_model(best_config)
    assert checked.kwargs["num_filters"] == best.params["model.kwargs.num_filters"]
    assert checked.spec == card.spec and checked.target_channels == card.target_channels

    # rerunning the finished experiment continues nothing and reports the same leaderboard
    again = api.tune(tree)
    assert [r.trial_id for r in again.leaderboard] == [r.trial_id for r in rows]
    # ... but the same name with another config is refused, naming the way out
    tree["search"]["num_samples"] = 6
    with pytest.raises(ConfigError, match="exists with a different config"):
        api.tune(tree)


def test_trials_that_never_fit_fail_fast_naming_the_request(plate, tmp_path):
    tree = tune_tree(plate, tmp_path, "too-big")
    tree["search"]["space"]["trainer.cpus_per_worker"] = {"choice": [0.5, 8]}
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        api.tune(tree)
    assert time.monotonic() - start < 60
    message = str(err.value)
    assert "no trial of this sweep can ever run" in message and "trainer.cpus_per_worker 8" in message
    assert "the cluster has 2 CPU(s)" in message


def test_existing_foreign_directory_is_left_untouched(plate, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds files viscy did not write"):
        api.tune(tune_tree(plate, tmp_path, "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
