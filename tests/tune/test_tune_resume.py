"""A real sweep: Ray Tune + OptunaSearch + ASHA over real Ray Train runs on a tiny synthetic plate (CPU), interrupted
(SIGINT to ``viscy tune``) and continued by running it again. Finished trials are not re-run, the interrupted trial
continues from its last checkpoint with complete results, ASHA stops a poor trial, and the sweep writes its
leaderboard, figures, best config and best model.

One sweep of three trials, one at a time (ASHA with grace period 1 and reduction factor 2 stops a trial at epoch 1
when its ``METRIC`` there is worse than that of the trials before it):

1. ``POOR`` (lr 1e-6, barely trains): the first trial at every rung, it finishes its epochs;
2. ``GOOD`` (lr 1e-2): better than trial 1 at epoch 1, it runs on and is interrupted past epoch 0;
3. TPE's first sample (seed 1: lr 1.0e-6), run after the resume: a restored sweep starts ASHA afresh, but trial 2
   replays its restored epochs, so at epoch 1 trial 3 meets trial 2, does worse and is stopped early.

Three epochs, not two: Tune takes a few seconds to act on Ctrl-C, in which the interrupted trial often begins its
next epoch; with two it would finish and the sweep would go on to trial 3 instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.faults import EPOCH_STARTS
from tests.tune.tune_helpers import start_ray_noting_epochs, tune_tree
from viscy import api
from viscy.config import ConfigError, load_config
from viscy.models import read_card
from viscy.train.check import check_model
from viscy.train.config import TrainConfig

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

METRIC = "val_loss"  # what the sweep ranks trials by and ASHA stops them on (another: recheck POOR/GOOD below)
EPOCHS = 3
POOR = {"trainer.lr": 1e-6, "model.kwargs.num_filters": 8}
GOOD = {"trainer.lr": 1e-2, "model.kwargs.num_filters": 8}


def _reports(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _epoch_starts(run: Path) -> list[int]:
    path = run / EPOCH_STARTS
    return [int(line) for line in path.read_text().split()] if path.is_file() else []


def _tune(config: Path, cwd: Path) -> subprocess.Popen:
    """``viscy tune``, every training epoch slowed down (in the trials' Ray Train workers) by tests.faults."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "tests.faults", "slow_epochs", "--", "tune", "--config", str(config)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _interrupt_past_first_epoch(proc: subprocess.Popen, exp: Path) -> tuple[dict[str, list[dict]], str]:
    """SIGINT the sweep once a trial has finished and the next one is past its first epoch (so it has a
    checkpoint); return the finished trials' reports and the trial then running."""
    deadline = time.monotonic() + 420
    finished: dict[str, list[dict]] = {}
    started: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        trials = {d.name: _reports(d) for d in exp.glob("trial_*")}
        finished = {k: v for k, v in trials.items() if v and v[-1].get("epochs_done") == EPOCHS}
        # The running trial is seen by the epochs its training run began (the fault writes them straight into the
        # run directory; Tune's results reach the experiment directory only when Tune syncs them, which lagged a
        # whole short trial once): past epoch 0, its first checkpoint is stored.
        started = [
            f"trial_{run.name}"
            for run in sorted((exp / "runs").glob("*"))
            if f"trial_{run.name}" not in finished and max(_epoch_starts(run), default=-1) >= 1
        ]
        if finished and started:
            break
        time.sleep(0.5)
    assert proc.poll() is None, f"the sweep ended before it could be interrupted:\n{proc.stdout.read()}"
    assert finished and started, "no trial finished in time"
    proc.send_signal(signal.SIGINT)
    return finished, started[0]


def test_interrupted_sweep_resumes_then_stops_poor_trials_and_writes_leaderboard_figures_best_config_and_model(
    plate, tmp_path, monkeypatch, capsys
):
    import ray

    tree = tune_tree(plate, tmp_path, "sweep", metric=METRIC, num_samples=3, max_concurrent_trials=1,
                     points_to_evaluate=[POOR, GOOD])
    tree["logging"] = {"wandb": True, "project": "viscy-tests"}  # offline: WANDB_MODE=offline in the tests
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(tree))
    exp = tmp_path / "sweep"

    # ---- `viscy tune` (its own process, with its own local Ray), interrupted with Ctrl-C
    ray.shutdown()  # the cluster that wrote the plate; its successor here notes the epochs training runs begin
    proc = _tune(config, tmp_path)
    try:
        start_ray_noting_epochs(monkeypatch)  # for the continued sweep below; starts while that process does
        finished, interrupted = _interrupt_past_first_epoch(proc, exp)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 130, out
        assert "interrupted" in out and "--search.experiment sweep" in out, out
        before = {k: len(v) for k, v in finished.items()}
        finished_starts = {k: _epoch_starts(exp / "runs" / k.removeprefix("trial_")) for k in finished}
        run = exp / "runs" / interrupted.removeprefix("trial_")
        starts_before = _epoch_starts(run)

        # ---- the same sweep again continues it: here through the Python API (`viscy tune` runs it), in this process
        result = api.tune(tree)
        out = capsys.readouterr().out
        again = api.tune(tree)  # rerunning the finished experiment continues nothing, reports the same leaderboard
        # ... but the same name with another config is refused, naming the way out
        tree["search"]["num_samples"] = 6
        with pytest.raises(ConfigError, match="exists with a different config"):
            api.tune(tree)
    finally:
        if proc.poll() is None:
            proc.kill()
        ray.shutdown()  # its workers note epochs: no later module may join it

    # finished trials are not run again; the interrupted one continued from its last checkpoint
    assert "continuing 'sweep'" in out and "3 trial(s): 2 finished, 1 stopped early, 0 failed" in out, out
    for name, count in before.items():
        assert len(_reports(exp / name)) == count, f"finished trial {name} ran again"
        assert _epoch_starts(exp / "runs" / name.removeprefix("trial_")) == finished_starts[name], name
    # The continued trial reports every epoch (those restored from its checkpoint are replayed, since Tune starts
    # a continued trial's results afresh), and its training run went on from its last checkpoint: epoch 0 never
    # ran again, and the epochs run after the restart follow on from those begun before the interruption.
    assert [r["epochs_done"] for r in _reports(exp / interrupted)] == list(range(1, EPOCHS + 1))
    starts = _epoch_starts(run)
    assert starts[: len(starts_before)] == starts_before and starts.count(0) == 1, (starts_before, starts)
    again_starts = starts[len(starts_before):]
    assert (again_starts == list(range(again_starts[0], EPOCHS)) if again_starts
            else starts_before[-1] == EPOCHS - 1), (starts_before, starts)
    assert not again_starts or again_starts[0] in (starts_before[-1], starts_before[-1] + 1), (starts_before, starts)
    run_info = json.loads((run / "run_info.json").read_text())
    assert run_info["run_name"] == interrupted.removeprefix("trial_")
    assert len(list(exp.glob("trial_*"))) == 3

    # ASHA stopped the poor trial; the leaderboard ranks the trials, best first
    assert result.experiment_dir == exp and not result.interrupted
    rows = result.leaderboard
    assert len(rows) == 3 and {r.status for r in rows} <= {"finished", "stopped early"}, rows
    assert any(r.status == "stopped early" and r.epochs < EPOCHS for r in rows), [(r.status, r.epochs) for r in rows]
    metrics = [r.metric for r in rows]
    assert metrics == sorted(metrics, reverse=result.mode == "max")  # best first
    board = pd.read_csv(exp / "leaderboard.csv")
    assert list(board["trial_id"]) == [r.trial_id for r in rows] and board["stopped_early"].any()
    assert {"trainer.lr", "model.kwargs.num_filters", METRIC, "epochs", "status"} <= set(board.columns)
    assert "stopped early by ASHA after" in out and "best config" in out and "#  trial" in out

    for name in ("learning_curves", "optimization_history", "param_importances", "parallel_coordinate"):
        png = exp / "figures" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", name

    # every trial is a viscy train run in runs/<trial id>, with its own W&B run grouped by the experiment
    for row in rows:
        trial_run = exp / "runs" / row.trial_id
        assert (trial_run / "viscy_config.yaml").is_file() and list(trial_run.glob("checkpoint_*")), trial_run
        wandb_runs = list((trial_run / "wandb").glob("offline-run-*"))
        assert wandb_runs, f"no offline W&B run in {trial_run}"
    # Tune's own state and per-trial TensorBoard events (tensorboard --logdir <experiment>)
    assert list(exp.glob("experiment_state-*.json")) and list(exp.glob("trial_*/events.out.tfevents.*"))

    best = rows[0]
    card = read_card(result.best_model)
    assert card.training["run_name"] == best.trial_id and card.target_channels == ["Nuclei", "Membrane"]
    assert card.kwargs["num_filters"] == best.params["model.kwargs.num_filters"]
    # the best config is a training config that viscy train takes unchanged: it loads, passes the driver's
    # model/data check and builds the best trial's model (every trial above was a viscy train run of such a config)
    best_config = load_config(TrainConfig, result.best_config)
    assert best_config.trainer.max_epochs == EPOCHS
    assert best_config.trainer.lr == pytest.approx(best.params["trainer.lr"])
    checked = check_model(best_config)
    assert checked.kwargs["num_filters"] == best.params["model.kwargs.num_filters"]
    assert checked.spec == card.spec and checked.target_channels == card.target_channels

    assert [r.trial_id for r in again.leaderboard] == [r.trial_id for r in rows]
