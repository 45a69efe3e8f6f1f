"""A network of one's own (tests/plugins/tiny_net.py, outside viscy) through the commands a user runs.

``model.name: tiny_net:TinyNet`` with this folder on PYTHONPATH: ``viscy train`` (2 Ray Train workers, which
import the module themselves), ``viscy export`` and ``viscy predict`` from the run's ``best_model.pt`` alone
(the card names the import path), then ``viscy serve`` of the ONNX file and one request. The Ray node is
started with the same PYTHONPATH, as every node of a cluster must be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import read_until
from tests.ray_head import BIN, free_ports, ray_head

pytestmark = pytest.mark.slow
PLUGINS = Path(__file__).resolve().parent
NAME = "tiny_net:TinyNet"


SECONDS: dict[str, float] = {}  # per command, printed at the end (pytest -s shows them)


def _viscy(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> str:
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "viscy"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"viscy {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    SECONDS[args[0]] = time.monotonic() - started
    return done.stdout


def test_own_network_trains_exports_predicts_and_serves(tmp_path: Path) -> None:
    from viscy.data.config import SynthConfig
    from viscy.data.plate import Plate
    from viscy.data.synth import write_synthetic_plate
    from viscy.models import read_card
    from viscy.serve import ServeClient

    # the user's environment: the module's folder on PYTHONPATH (and nothing of the test suite's)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env |= {"PYTHONPATH": str(PLUGINS), "RAY_AUTH_MODE": "token", "WANDB_MODE": "offline"}
    write_synthetic_plate(SynthConfig(output=tmp_path / "plate.zarr", yx=(64, 64), cell_diameter=12))
    recipe = {
        "data": {
            "data_path": ["plate.zarr"],
            "yx_patch_size": [32, 32],
            "batch_size": 4,
            "patches_per_stack": 4,
            "val_fraction": 0.25,
            "augmentation": {"affine_prob": 0.0},
        },
        "model": {"name": NAME, "kwargs": {"width": 4}},
        "trainer": {
            "max_epochs": 1,
            "num_workers": 2,
            "cpus_per_worker": 0.5,
            "storage_path": "runs",
            "run_name": "own",
            "train_steps_per_epoch": 2,
            "val_steps": 1,
        },
    }
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(recipe))
    started = time.monotonic()
    with ray_head(tmp_path, env, num_cpus=2) as head:
        SECONDS["ray head"] = time.monotonic() - started
        env["RAY_ADDRESS"] = head.gcs_address
        _viscy(["preprocess", "--data_path", "plate.zarr"], env, tmp_path)
        out = _viscy(["train", "--config", "own.yaml"], env, tmp_path)
        assert "epoch 1/1" in out and NAME in out, out
        best = tmp_path / "runs" / "own" / "best_model.pt"
        card = read_card(best)
        assert card.name == NAME and card.kwargs == {"width": 4, "in_channels": 1, "out_channels": 2}
        assert (card.spec.in_channels, card.spec.out_channels, card.spec.yx_multiple) == (1, 2, 1)

        # export and predict rebuild the network from the card alone: nothing is retyped
        _viscy(["export", "--model.checkpoint", str(best), "--output", "own.onnx"], env, tmp_path)
        assert read_card(tmp_path / "own.onnx").name == NAME
        _viscy(
            [
                "predict",
                "--data_path",
                "plate.zarr",
                "--model.checkpoint",
                str(best),
                "--output",
                "pred.zarr",
                "--num_cpus_per_actor",
                "0.5",
                "--progress",
                "false",
            ],
            env,
            tmp_path,
        )
        with Plate(tmp_path / "pred.zarr") as plate:
            assert plate.channel_names == ["Nuclei_prediction", "Membrane_prediction"]

        (port,) = free_ports(1)
        serve = [
            str(BIN / "viscy"),
            "serve",
            "--models",
            "own.onnx",
            "--port",
            str(port),
            "--stainer.num_cpus",
            "0.1",
            "--segmenter.num_cpus",
            "0.05",
            "--ingress.num_cpus",
            "0.05",
        ]
        proc = subprocess.Popen(
            serve, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            started = time.monotonic()
            read_until(proc, "Ctrl-C stops it", 300)
            SECONDS["serve"] = time.monotonic() - started
            image = np.random.default_rng(0).normal(100, 10, (48, 40)).astype(np.float32)
            stained = ServeClient(f"http://127.0.0.1:{port}").stain(image)
            assert stained.array.shape == (2, 48, 40) and np.isfinite(stained.array).all()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("seconds per step: " + ", ".join(f"{k} {v:.1f}" for k, v in SECONDS.items()))
