"""An interrupted sweep (SIGINT to ``viscy tune``) continues when rerun: finished trials are not re-run, the
interrupted trial continues from its last checkpoint and its results are complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.faults import EPOCH_STARTS
from tests.tune.tune_helpers import make_plate, tune_tree

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    import ray

    from viscy.ray_utils import ensure_ray

    ensure_ray(num_cpus=2)
    try:
        return make_plate(tmp_path_factory.mktemp("resume") / "synth.zarr")
    finally:
        ray.shutdown()  # the sweeps below run in their own processes, each with its own local Ray


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


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(plate, tmp_path):
    tree = tune_tree(plate, tmp_path, "resume", num_samples=2, max_concurrent_trials=1,
                     scheduler={"name": "fifo"})
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(tree))
    exp = tmp_path / "resume"

    proc = _tune(config, tmp_path)
    deadline = time.monotonic() + 420
    finished: dict[str, list[dict]] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        trials = {d.name: _reports(d) for d in exp.glob("trial_*")}
        finished = {k: v for k, v in trials.items() if v and v[-1].get("epochs_done") == 3}
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
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "--search.experiment resume" in out, out
    interrupted = started[0]
    before = {k: len(v) for k, v in finished.items()}
    run = exp / "runs" / interrupted.removeprefix("trial_")
    starts_before = _epoch_starts(run)

    proc = _tune(config, tmp_path)  # the same command again continues the experiment
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "continuing 'resume'" in out and "2 trial(s): 2 finished" in out, out
    for name, count in before.items():
        assert len(_reports(exp / name)) == count, f"finished trial {name} ran again"
    # The continued trial reports every epoch (those restored from its checkpoint are replayed, since Tune starts
    # a continued trial's results afresh), and its training run went on from its last checkpoint: epoch 0 never
    # ran again, and the epochs run after the restart follow on from those begun before the interruption.
    assert [r["epochs_done"] for r in _reports(exp / interrupted)] == [1, 2, 3]
    starts = _epoch_starts(run)
    assert starts[: len(starts_before)] == starts_before and starts.count(0) == 1, (starts_before, starts)
    again = starts[len(starts_before):]
    assert again == list(range(again[0], 3)) if again else starts_before[-1] == 2, (starts_before, starts)
    assert not again or again[0] in (starts_before[-1], starts_before[-1] + 1), (starts_before, starts)
    run_info = json.loads((exp / "runs" / interrupted.removeprefix("trial_") / "run_info.json").read_text())
    assert run_info["run_name"] == interrupted.removeprefix("trial_")
    assert len(list(exp.glob("trial_*"))) == 2
