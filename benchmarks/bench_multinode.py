"""Two Ray nodes on one machine against one node: the same ``viscy train`` and ``viscy predict`` commands.

The commands join a cluster started with ``ray start`` on loopback through ``RAY_ADDRESS``: first the head
alone (one node, 2 logical CPUs), then with a second node added (2 logical CPUs, its own temporary
directory). Training uses 2 workers with ``trainer.placement: spread``, prediction 2 actors. Both nodes share
this machine's cores, so the ratio shows the cost of spreading over nodes (more processes, cross-node object
transfers), not a speed-up.

``python benchmarks/bench_multinode.py [--epochs 2] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from ray_head import ray_head, start_node, stop_node, wait_for_nodes  # noqa: E402


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env | {"WANDB_MODE": "offline", **extra}


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    from viscy.data.config import SynthConfig
    from viscy.data.synth import write_synthetic_plate

    work = Path(tempfile.mkdtemp(prefix="bench_multinode_"))
    plate = write_synthetic_plate(SynthConfig(output=work / "plate.zarr", yx=(128, 128), cell_diameter=16))
    py = [sys.executable, "-m", "viscy.cli"]
    subprocess.run([*py, "preprocess", "--data_path", str(plate), "--grid_spacing", "4"], cwd=REPO, env=_env(),
                   check=True, capture_output=True)

    def train(name: str, env: dict[str, str]) -> float:
        tree = {
            "data": {"data_path": [str(plate)], "yx_patch_size": [64, 64], "batch_size": 8, "patches_per_stack": 8,
                     "val_fraction": 0.25, "augmentation": {"affine_prob": 0.0}},
            "model": {"name": "unet2d", "kwargs": {"in_channels": 1, "out_channels": 2, "num_blocks": 3,
                                                   "num_filters": 8}},
            "trainer": {"max_epochs": args.epochs, "num_workers": 2, "cpus_per_worker": 0.5, "placement": "spread",
                        "storage_path": str(work / "runs"), "run_name": name, "train_steps_per_epoch": 6,
                        "val_steps": 2, "warmup_epochs": 0},
        }
        config = work / f"{name}.yaml"
        config.write_text(yaml.safe_dump(tree))
        return _timed([*py, "train", "--config", str(config)], env)

    def predict(name: str, env: dict[str, str]) -> float:
        return _timed([*py, "predict", "--data_path", str(plate), "--model.checkpoint",
                       str(work / "runs" / "one" / "best_model.pt"), "--output", str(work / f"{name}.zarr"),
                       "--num_actors", "2", "--num_cpus_per_actor", "1", "--progress", "false"], env)

    figures: dict[str, float] = {}
    head_temp, node_temp = Path(tempfile.mkdtemp(prefix="ray_h_")), Path(tempfile.mkdtemp(prefix="ray_b_"))
    with ray_head(work, _env(), num_cpus=2, resources={"viscy_head": 1}, temp_dir=head_temp) as head:
        joined = _env(RAY_ADDRESS=head.gcs_address, RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="300")
        figures["train_one_node_s"] = train("one", joined)
        figures["predict_one_node_s"] = predict("one", joined)
        node = start_node(head, work / "node_b.log", _env(), 2, {"viscy_node_b": 1}, node_temp)
        try:
            wait_for_nodes(head, _env(), "viscy_node_b")
            figures["train_two_nodes_s"] = train("two", joined)
            figures["predict_two_nodes_s"] = predict("two", joined)
        finally:
            stop_node(node)
    figures = {k: round(v, 1) for k, v in figures.items()}
    print(f"\n2 workers x 0.5 CPU, {args.epochs} epochs of 6 steps of 8 x 64²; predict 2 actors, 4 FOVs of 128²")
    print(f"  train:   one node {figures['train_one_node_s']:6.1f} s   two nodes "
          f"{figures['train_two_nodes_s']:6.1f} s  ratio "
          f"{figures['train_two_nodes_s'] / figures['train_one_node_s']:.2f}")
    print(f"  predict: one node {figures['predict_one_node_s']:6.1f} s   two nodes "
          f"{figures['predict_two_nodes_s']:6.1f} s  ratio "
          f"{figures['predict_two_nodes_s'] / figures['predict_one_node_s']:.2f}")
    print("  both join a running cluster: the head alone, then the head and a second node")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
