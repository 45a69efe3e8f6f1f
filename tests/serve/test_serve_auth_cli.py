"""`viscy serve` from the command line on the cluster at RAY_ADDRESS, with a bearer token; `viscy infer`."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile

from tests.helpers import read_until
from tests.ray_head import BIN
from tests.serve.conftest import TOKEN, TOKEN_ENV, Server, phase_image
from viscy.serve import ServeClient, ServeError


def test_cli_serve_with_token_then_infer_then_ctrl_c(server: Server, tmp_path: Path) -> None:
    env = {**server.env, "RAY_ADDRESS": server.head.gcs_address}
    cmd = [str(BIN / "viscy"), "serve", "--models", str(server.models_dir / "stain2d.onnx"),
           "--port", str(server.port), "--app_name", "secure", "--route_prefix", "/secure",
           "--auth_token_env", TOKEN_ENV, "--stainer.num_cpus", "0.1", "--segmenter.num_cpus", "0.05",
           "--ingress.num_cpus", "0.05"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = read_until(proc, "Ctrl-C stops it", 300)
        url = f"{server.url}/secure"
        assert f"at {url}" in banner and "auth: bearer token required" in banner
        assert "Phase3D -> Nuclei, Membrane" in banner

        # auth on: healthz stays open for probes but tells only readiness without the token
        assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
        full = requests.get(f"{url}/healthz", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
        assert full["auth"] is True and full["models"] == ["stain2d"]
        # no token, a wrong token and a wrong scheme get 401 before anything is parsed or looked up: an unknown
        # model, a bad query value, a nested statistics header and a corrupt body all answer the same
        stain = f"{url}/v1/stain"
        probes = [("GET", f"{url}/v1/models", {}), ("POST", f"{stain}?model=nope", {}),
                  ("POST", f"{url}/v1/segment?channel=abc&diameter=1e9", {}),
                  ("POST", stain, {"X-Viscy-Statistics": "[" * 10_000}),
                  ("POST", stain, {"Content-Type": "image/tiff"}), ("GET", f"{url}/v1/nothing-here", {})]
        for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            for method, probe_url, headers in probes:
                r = requests.request(method, probe_url, headers={**headers, **auth}, data=b"II*\0junk", timeout=10)
                assert r.status_code == 401, (method, probe_url, r.status_code, r.text)
                assert "bearer token" in r.json()["detail"] and "stain2d" not in r.text
        image = phase_image((64, 64))
        with pytest.raises(ServeError, match="401"):
            ServeClient(url, token="wrong").stain(image)
        stained = ServeClient(url, token=TOKEN).stain(image)  # one model: no ?model= needed
        assert stained.array.shape == (2, 64, 64)
        # auth off on the other application of the same Serve instance
        assert requests.get(f"{server.url}/v1/models", timeout=10).status_code == 200

        # viscy infer: token from $VISCY_SERVE_TOKEN, output a new TIFF; an existing file is never replaced
        tif = tmp_path / "phase.tif"
        tifffile.imwrite(tif, image)
        infer = [str(BIN / "viscy"), "infer", "--url", url, "--image", str(tif)]
        env_token = {**server.env, "VISCY_SERVE_TOKEN": TOKEN}
        done = subprocess.run(infer, env=env_token, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        out = tmp_path / "phase_viscy.tif"
        np.testing.assert_allclose(tifffile.imread(out), stained.array, atol=1e-6)
        before = out.read_bytes()
        again = subprocess.run(infer, env=env_token, capture_output=True, text=True, timeout=120)
        assert again.returncode == 1 and "never replaced" in again.stderr
        assert out.read_bytes() == before
        both = subprocess.run(infer + ["--segment", "true", "--output", str(tmp_path / "both.npz")], env=env_token,
                              capture_output=True, text=True, timeout=120)
        assert both.returncode == 0, both.stderr
        with np.load(tmp_path / "both.npz", allow_pickle=False) as data:
            assert data["stain"].shape == (2, 64, 64) and data["masks"].dtype == np.int32
        no_token = subprocess.run(infer + ["--output", str(tmp_path / "x.tif")], env=server.env,
                                  capture_output=True, text=True, timeout=120)
        assert no_token.returncode == 1 and "401" in no_token.stderr
        assert not (tmp_path / "x.tif").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, rest
    assert "viscy serve: stopped" in rest
    assert requests.get(f"{server.url}/secure/healthz", timeout=10).status_code == 404
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_bad_serve_configs_fail_before_anything_starts(tmp_path: Path) -> None:
    from viscy.cli import main

    assert main(["serve", "--models", str(tmp_path / "missing.onnx")]) == 1
    (tmp_path / "empty").mkdir()
    assert main(["serve", "--models", str(tmp_path / "empty")]) == 1
    assert main(["serve", "--models", str(tmp_path), "--stainer.autoscaling.max_replicas", "0"]) == 2
    assert main(["serve", "--models", str(tmp_path), "--colour", "blue"]) == 2


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from viscy.config import ConfigError
    from viscy.serve.config import ServeConfig
    from viscy.serve.gate import read_token

    assert read_token(ServeConfig(models=[tmp_path])) is None
    secret = tmp_path / "token"
    secret.write_text("abc\n")
    assert read_token(ServeConfig(models=[tmp_path], auth_token_file=secret)) == "abc"
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_TOKEN"):
        read_token(ServeConfig(models=[tmp_path], auth_token_env="NO_SUCH_TOKEN"))
    secret.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_token(ServeConfig(models=[tmp_path], auth_token_file=secret))
