"""One real Serve application for the serve tests: ``serve deploy`` of configs/serve.yaml to a loopback head.

Only the application args are changed from the shipped file: the test's models, a free port, CPU shares
that fit a 2-core machine, a short autoscaling window, and Cellpose with a randomly initialised checkpoint.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from tests.ray_head import BIN, Head, free_ports, ray_head

ROOT = Path(__file__).resolve().parents[2]
TOKEN_ENV = "VISCY_TEST_SERVE_TOKEN"
TOKEN = "s3cret-token-for-tests"
# What must never reach a client: tracebacks, server paths, Ray's process names and wrapped errors.
LEAKS = re.compile(r'Traceback|File "|site-packages|/(?:work|tmp|home|usr|opt|root|proc)/|pid=|ray::|RayTaskError'
                   r"|ip=\d|node_id|numpy\.core|_private|0x[0-9a-fA-F]{6,}|object at ")


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    head: Head
    env: dict[str, str]
    models_dir: Path
    config_path: Path
    deploy_seconds: float


def export_tiny(path: Path, arch: str, sources: list[str], targets: list[str], seed: int = 0) -> Path:
    """A randomly initialised tiny model exported to ONNX with its channels and normalisation."""
    import torch

    from tests.helpers import tiny_kwargs
    from viscy.models import create_model
    from viscy.models.export import export_onnx, onnx_metadata

    torch.manual_seed(seed)
    kwargs = tiny_kwargs(arch) | {"in_channels": len(sources), "out_channels": len(targets)}
    model = create_model(arch, **kwargs).eval()
    norm = [{"channels": sources, "level": "fov_statistics", "subtrahend": "median", "divisor": "iqr"}]
    meta = onnx_metadata(model, name=f"tiny-{arch}", source_channels=sources, target_channels=targets,
                         normalization=norm, kwargs=kwargs)
    return export_onnx(model, path, metadata=meta)


@pytest.fixture(scope="package")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three served models: a 2D U-Net (Phase3D -> Nuclei, Membrane), a 2.5D U-Net reading 3 slices, and a
    bioimage.io package made with bioimageio.spec alone (``two_layer``: Phase3D -> nuc, mem)."""
    from tests.bmz_helpers import foreign_package

    root = tmp_path_factory.mktemp("served_models")
    export_tiny(root / "stain2d.onnx", "unet2d", ["Phase3D"], ["Nuclei", "Membrane"])
    export_tiny(root / "stain25d.onnx", "unet25d", ["Phase3D"], ["Nuclei"], seed=1)
    foreign_package(tmp_path_factory.mktemp("package")).rename(root / "two_layer.zip")
    return root


def serve_args(models: Path, cellpose: Path | None) -> dict:
    """Application args fitting a 2-core machine, with a short autoscaling window."""
    fast = {"upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 2, "metrics_interval_s": 0.5}
    return {
        "models": [str(models)],
        "max_request_mb": 20,
        "max_image_pixels": 2 * 2048 * 2048,
        "stainer": {"num_cpus": 0.5, "max_batch_size": 8, "tile_yx": [512, 512],
                    "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, **fast}},
        "segmenter": {"num_cpus": 0.2, "model": str(cellpose) if cellpose else None},
        "ingress": {"num_cpus": 0.1, "max_queued_requests": 8},
    }


def wait_healthy(url: str, timeout: float = 300.0, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url}/healthz", timeout=10, headers=headers)
            if r.status_code == 200:
                return r.json()
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"{url}/healthz did not answer 200 within {timeout} s")


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, random_cpsam_checkpoint: Path):
    """``serve deploy`` of configs/serve.yaml (args adapted) to a head on loopback; yields where it answers."""
    import ray

    log_dir = tmp_path_factory.mktemp("serve_head")
    env = {**os.environ, "RAY_AUTH_MODE": "token", TOKEN_ENV: TOKEN}
    with ray_head(log_dir, env, num_cpus=2) as head:
        (port,) = free_ports(1)
        config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
        config["http_options"]["port"] = port
        config["applications"][0]["args"] = serve_args(models_dir, random_cpsam_checkpoint)
        path = log_dir / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        t0 = time.monotonic()
        done = subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", head.dashboard], env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        previous = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = head.gcs_address  # in-process Ray (serve.status, predict) joins this head
        try:
            yield Server(url, port, head, env, models_dir, path, time.monotonic() - t0)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if previous is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = previous


def phase_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth random float32 image (blobs), so segmentation finds objects."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter(rng.normal(size=shape), sigma=[0] * (len(shape) - 2) + [3, 3])
    return (img * 10 + 5).astype(np.float32)


def raw(arr: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An array as a raw request body and its headers."""
    return arr.tobytes(), {"Content-Type": "application/octet-stream", "X-Dtype": arr.dtype.name,
                           "X-Shape": ",".join(map(str, arr.shape))}
