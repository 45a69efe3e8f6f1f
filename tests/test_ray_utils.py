"""Joining a cluster: viscy follows the cluster's auth mode instead of imposing token auth."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from ray_head import ray_head

pytestmark = pytest.mark.slow
JOIN = "from viscy.ray_utils import ensure_ray; ensure_ray(); import ray; print(int(ray.cluster_resources()['CPU']))"


def test_joining_a_cluster_without_token_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    home = tmp_path / "home"  # a client machine that never ran Ray: no ~/.ray/auth_token
    home.mkdir()
    with ray_head(tmp_path, env | {"RAY_AUTH_MODE": "disabled"}, num_cpus=1) as head:
        client = env | {"RAY_ADDRESS": head.gcs_address, "HOME": str(home)}
        joined = subprocess.run([sys.executable, "-c", JOIN], env=client, capture_output=True, text=True, timeout=180)
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert joined.stdout.strip().splitlines()[-1] == "1"
        assert "RAY_AUTH_MODE" not in client
        # what viscy used to do, imposing token auth on every client, fails here
        forced = subprocess.run([sys.executable, "-c", JOIN], env=client | {"RAY_AUTH_MODE": "token"},
                                capture_output=True, text=True, timeout=180)
        assert forced.returncode != 0


STOP = """
import atexit, time
import psutil
from viscy.ray_utils import ensure_ray, stop_autoscaler_monitor
ensure_ray(num_cpus=1)
import ray
processes = ray._private.worker._global_node.all_processes
monitor, gcs = processes["monitor"][0].process, processes["gcs_server"][0].process
time.sleep(2)
idle = [p for p in psutil.Process().children(recursive=True) if "IDLE" in p.name()]
stop_autoscaler_monitor()
print("monitor", monitor.poll() is not None, "gcs", gcs.poll() is None, "idle", len(idle))
atexit._run_exitfuncs()
left = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
print("left", len(left))
"""


def test_own_cluster_stops_its_autoscaler_monitor_first_and_prestarts_no_idle_workers():
    """The monitor goes before the GCS (Ray's order would leave it hanging on the gone GCS until killed), and
    the cluster starts no idle workers that this job's runtime env could never use."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", STOP], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "monitor True gcs True idle 0" in lines, done.stdout
    assert lines[-1] == "left 0", done.stdout
    assert "autoscaler failed" not in done.stdout + done.stderr


EARLY = """
import atexit, signal, sys, threading
import psutil
from viscy.cli import main
args = ["train", "--data.data_path", "x.zarr", "--model.name", "unet2d", "--data.yx_patch_size", "96", "96"]
print("bad key", main(args + ["--trainer.bogus", "1"]), "ray imported", "ray" in sys.modules)
print("misfit model", main(args + ["--model.kwargs.num_blocks", "6"]))
import ray
started = [t for t in threading.enumerate() if t.name == "viscy-ray-start"]
print("ray started", ray.is_initialized(), "thread", len(started), "sigterm", signal.getsignal(signal.SIGTERM) not in (
    signal.SIG_DFL, None))
atexit._run_exitfuncs()
left = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
print("left", len(left))
"""


def test_train_starts_ray_during_the_model_check_only_for_a_config_with_valid_keys():
    """A key error is named without starting Ray; once the keys are valid, Ray starts in the background while
    the model check imports torch, and a command that fails that check still shuts the cluster down."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", EARLY], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "bad key 2 ray imported False" in lines, done.stdout
    assert "misfit model 2" in lines, done.stdout
    assert "ray started True thread 1 sigterm True" in lines, done.stdout
    assert lines[-1] == "left 0", done.stdout
    assert "unknown key 'trainer.bogus'" in done.stderr and "not a multiple of the model's YX multiple" in done.stderr
    assert "SIGTERM handler is not set" not in done.stderr
