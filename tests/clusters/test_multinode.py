"""Two Ray nodes on one machine (``ray start`` on loopback, told apart by custom resources): training placed
across them through ``ray job submit``, storage by URI (the run's files there, a rerun or a resume of nothing
refused), prediction and segmentation (two Ray Data stages) on both nodes equal to one node, and the loss of a
node mid-training survived.

The head has 2 logical CPUs and the resource ``viscy_head``; the second node 2 CPUs and ``viscy_node_b``. Both
run on the same 2 cores, so this shows placement and fault tolerance, not speed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from ray_head import Head, kill_session, ray_head, start_node, stop_node, wait_for_nodes

from tests.faults import EPOCH_STARTS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UNET = {"in_channels": 1, "out_channels": 2, "num_blocks": 2, "num_filters": 4}
HEAD, NODE_B = "viscy_head", "viscy_node_b"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}
    env |= {"WANDB_MODE": "offline", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")) if p)
    return env


class Cluster:
    """The head and the second node's process (replaceable after a node loss)."""

    def __init__(self, head: Head, logs: Path) -> None:
        self.head, self.logs, self.node_b = head, logs, None
        self.temp_dirs: list[Path] = []

    def add_node_b(self) -> None:
        temp = Path(tempfile.mkdtemp(prefix="ray_b_"))  # short: it holds Unix sockets
        self.temp_dirs.append(temp)
        self.node_b = start_node(self.head, self.logs / f"node_b_{temp.name}.log", _env(), 2, {NODE_B: 1}, temp)
        wait_for_nodes(self.head, _env(), NODE_B)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("nodes")
    head_temp = Path(tempfile.mkdtemp(prefix="ray_head_"))
    try:
        with ray_head(logs, _env(), num_cpus=2, resources={HEAD: 1}, temp_dir=head_temp) as head:
            started = Cluster(head, logs)
            try:
                started.add_node_b()
                yield started
            finally:
                if started.node_b is not None:
                    stop_node(started.node_b)
                for temp in started.temp_dirs:
                    shutil.rmtree(temp, ignore_errors=True)
    finally:
        shutil.rmtree(head_temp, ignore_errors=True)


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    from viscy.data.config import SynthConfig
    from viscy.data.synth import write_synthetic_plate

    path = tmp_path_factory.mktemp("plate") / "synth.zarr"
    return write_synthetic_plate(SynthConfig(output=path, yx=(64, 64), cell_diameter=12))


def _train_tree(plate: Path, storage: str, run_name: str, **trainer) -> dict:
    return {
        "data": {"data_path": [str(plate)], "yx_patch_size": [32, 32], "batch_size": 4, "patches_per_stack": 4,
                 "val_fraction": 0.25, "augmentation": None},
        "model": {"name": "unet2d", "kwargs": dict(UNET)},
        "trainer": {"max_epochs": 2, "num_workers": 2, "cpus_per_worker": 0.5, "placement": "spread",
                    "storage_path": storage, "run_name": run_name, "train_steps_per_epoch": 2, "val_steps": 1,
                    "warmup_epochs": 0} | trainer,
    }


def _nodes_of(head: Head, class_name: str, job_id: str | None = None) -> list[str]:
    """The custom resource (``viscy_head`` / ``viscy_node_b``) of the node of each actor of ``class_name``."""
    from ray.util.state import list_actors, list_nodes

    names = {}
    for node in list_nodes(address=head.dashboard, detail=True):
        marks = [r for r in (HEAD, NODE_B) if r in (node.resources_total or {})]
        names[node.node_id] = marks[0] if marks else "?"
    actors = list_actors(address=head.dashboard, filters=[("class_name", "=", class_name)], detail=True, limit=10000)
    return [names.get(a.node_id, f"? {a.state} {a.node_id}") for a in actors if job_id is None or a.job_id == job_id]


def _submit(head: Head, entry: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".",
           "--runtime-env-json", '{"env_vars": {"WANDB_MODE": "offline"}}', "--", "bash", "-c", entry]
    for _ in range(10):  # the job agent can come up a little after the dashboard answers
        out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in out.stdout + out.stderr:
            return out
        time.sleep(3)
    return out


@pytest.fixture(scope="module")
def job_run(cluster, plate, tmp_path_factory):
    """``ray job submit`` of ``viscy preprocess`` + ``viscy train`` (2 workers, spread) with ``file://`` storage."""
    work = tmp_path_factory.mktemp("job")
    storage = work / "runs"
    config = work / "train.yaml"
    config.write_text(yaml.safe_dump(_train_tree(plate, f"file://{storage}", "two-nodes")))
    py = sys.executable
    entry = f"{py} -m viscy.cli preprocess --data_path {plate} && {py} -m viscy.cli train --config {config}"
    started = time.monotonic()
    out = _submit(cluster.head, entry)
    return out, storage / "two-nodes", time.monotonic() - started


def test_job_places_the_two_workers_on_different_nodes(cluster, job_run):
    out, run, seconds = job_run
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout.lower() and "finished 2 epochs" in out.stdout, out.stdout[-3000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted", out.stdout).group(1)
    from ray.util.state import list_jobs

    driver = [j for j in list_jobs(address=cluster.head.dashboard) if j.submission_id == job_id][0]
    workers = _nodes_of(cluster.head, "RayTrainWorker", driver.job_id)
    assert sorted(workers) == [HEAD, NODE_B], workers
    print(f"two-node job (preprocess + train, 2 epochs): {seconds:.1f} s")


def test_run_layout_with_a_file_uri(job_run):
    from viscy.models import create_model, load_checkpoint

    out, run, _ = job_run
    assert out.returncode == 0, out.stdout[-3000:]
    assert (run / "best_model.pt").is_file() and (run / "viscy_config.yaml").is_file()
    assert (run / "run_info.json").is_file() and (run / "checkpoint_manager_snapshot.json").is_file()
    assert len(list(run.glob("checkpoint_*/checkpoint.ckpt"))) >= 1
    assert list((run / "figures").glob("epoch_*.png")), sorted(p.name for p in run.iterdir())
    assert list((run / "tensorboard").glob("events.out.tfevents.*")), sorted(p.name for p in run.iterdir())
    load_checkpoint(create_model("unet2d", **UNET), run / "best_model.pt")
    saved = yaml.safe_load((run / "viscy_config.yaml").read_text())
    assert saved["trainer"]["storage_path"].startswith("file://")
    # with a URI, the run's own files are written under ./viscy_runs/<run name> of the driver, then uploaded
    assert re.search(r"figures \S*/viscy_runs/two-nodes/figures", out.stdout), out.stdout[-3000:]


def test_uri_storage_refuses_a_rerun_and_a_resume_of_nothing(job_run, plate, monkeypatch):
    """Both are refused from what the URI holds, before Ray starts."""
    import viscy.ray_utils
    from viscy.config import ConfigError
    from viscy.train.config import TrainConfig
    from viscy.train.trainer import run_train

    class RayWouldStart(Exception):
        pass

    def no_ray(*args, **kwargs):
        raise RayWouldStart("the storage check must come before Ray starts")

    out, run, _ = job_run
    assert out.returncode == 0, out.stdout[-3000:]
    monkeypatch.setattr(viscy.ray_utils, "ensure_ray", no_ray)
    uri = run.parent.as_uri()  # file:///...: resolved by pyarrow like s3:// or gs://
    with pytest.raises(ConfigError, match="already exists"):
        run_train(TrainConfig.model_validate(_train_tree(plate, uri, "two-nodes")))
    with pytest.raises(ConfigError, match="no run to continue"):
        run_train(TrainConfig.model_validate(_train_tree(plate, uri, "not-there", resume=True)))


MASKS = "labels/Nuclei_prediction_masks/0"


def _predict(plate: Path, model: Path, output: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    # 2 staining + 2 segmentation actors of 1 CPU fill the cluster's 4 CPUs: one actor of each stage per node
    cmd = [sys.executable, "-m", "viscy.cli", "predict", "--data_path", str(plate), "--model.checkpoint", str(model),
           "--output", str(output), "--num_actors", "2", "--num_cpus_per_actor", "1", "--progress", "false",
           "--segment.method", "classical", "--segment.measure_channels", "Phase3D", "--segment.num_actors", "2",
           "--segment.num_cpus_per_actor", "1"]
    started = time.monotonic()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return out, time.monotonic() - started


def test_predict_on_both_nodes_equals_one_node(cluster, job_run, plate, tmp_path):
    """Staining and segmentation actors on both nodes: predictions, masks and object table equal one node's."""
    import pandas as pd
    import zarr

    out, run, _ = job_run
    assert out.returncode == 0, out.stdout[-3000:]
    model = run / "best_model.pt"
    # Ray Data starts streaming once one actor is up; on this tiny plate it would finish before the second actor
    # (on the other node) is ready. Wait for the whole pools, so both nodes predict and segment.
    both = _env(RAY_ADDRESS=cluster.head.gcs_address, RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="300")
    two, two_s = _predict(plate, model, tmp_path / "two.zarr", both)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "every node sees it" in two.stdout, two.stdout + two.stderr[-3000:]  # local output on 2 nodes: said
    assert sorted(set(_nodes_of(cluster.head, "MapWorker(MapBatches(PredictActor))"))) == [HEAD, NODE_B]
    assert sorted(set(_nodes_of(cluster.head, "MapWorker(MapBatches(SegmentActor))"))) == [HEAD, NODE_B]
    one, one_s = _predict(plate, model, tmp_path / "one.zarr", _env())  # a local single-node cluster
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    a, b = zarr.open_group(str(tmp_path / "two.zarr"), mode="r"), zarr.open_group(str(tmp_path / "one.zarr"), mode="r")
    compared = []
    for row, row_group in a.groups():
        for col, col_group in row_group.groups():
            for fov, fov_group in col_group.groups():
                np.testing.assert_array_equal(fov_group["0"][:], b[f"{row}/{col}/{fov}/0"][:])
                np.testing.assert_array_equal(fov_group[MASKS][:], b[f"{row}/{col}/{fov}/{MASKS}"][:])
                compared.append(f"{row}/{col}/{fov}")
    assert len(compared) >= 2
    table = pd.read_parquet(tmp_path / "two.zarr" / "viscy_objects.parquet")
    assert len(table) > 0 and set(table.fov) <= set(compared)
    pd.testing.assert_frame_equal(table, pd.read_parquet(tmp_path / "one.zarr" / "viscy_objects.parquet"))
    print(f"predict + segment, 2 + 2 actors: two nodes {two_s:.1f} s, one node {one_s:.1f} s")


def test_training_survives_the_loss_of_a_node(cluster, plate, tmp_path):
    """SIGKILL every process of the second node while a spread 2-worker run trains: the worker group restarts
    from the last checkpoint on the node that remains, and the run ends with all its epochs."""
    storage = tmp_path / "runs"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(_train_tree(plate, str(storage), "node-loss", max_epochs=4, max_failures=3)))
    env = _env(RAY_ADDRESS=cluster.head.gcs_address)
    subprocess.run([sys.executable, "-m", "viscy.cli", "preprocess", "--data_path", str(plate)], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=300)
    # every epoch slowed down in the Ray Train workers (tests.faults), so the node can be lost mid-run
    slow = [sys.executable, "-m", "tests.faults", "slow_epochs", "--", "train", "--config", str(config)]
    proc = subprocess.Popen(slow, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    starts = storage / "node-loss" / EPOCH_STARTS
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if starts.is_file() and "1" in starts.read_text().split():
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    assert starts.is_file(), "training never reached epoch 2"
    kill_session(cluster.node_b)  # the node and every worker on it, as when a machine dies
    cluster.node_b = None
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "finished 4 epochs" in out, out[-3000:]
    assert "every node sees it" in out, out[-3000:]
    epochs = [int(e) for e in starts.read_text().split()]
    assert epochs[0] == 0 and epochs.count(0) == 1 and epochs[-1] == 3, epochs  # resumed, not restarted
    assert len(epochs) > 4, f"no epoch ran twice, so no restart happened: {epochs}"
