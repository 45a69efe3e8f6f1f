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
