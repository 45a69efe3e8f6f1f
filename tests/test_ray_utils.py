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
