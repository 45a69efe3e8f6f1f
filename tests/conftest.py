"""Shared fixtures: small real OME-Zarr plates and a local Ray cluster per test module."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray workers inherit the environment of the raylet a test starts: this makes tests/viscy_hooks.py (the
# functions behind viscy.testing's VISCY_TEST_HOOK) importable in every worker.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS_DIR, os.environ.get("PYTHONPATH")) if p)


def write_iohub_plate(
    path: Path,
    shape: tuple[int, int, int, int, int] = (1, 3, 3, 64, 64),
    positions: tuple[tuple[str, str, str], ...] = (("A", "1", "0"), ("A", "1", "1"), ("B", "2", "0")),
    channel_names: tuple[str, ...] = ("Phase3D", "Nuclei", "Membrane"),
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write a small HCS plate with iohub; each channel has its own intensity scale."""
    from iohub.ngff import open_ome_zarr

    rng = np.random.default_rng(seed)
    with open_ome_zarr(path, layout="hcs", mode="w-", channel_names=list(channel_names)) as plate:
        for row, col, fov in positions:
            pos = plate.create_position(row, col, fov)
            data = rng.normal(size=shape).astype(np.float32)
            for c in range(shape[1]):
                data[:, c] = data[:, c] * (c + 1) * 10 + 100 * c
            pos.create_image("0", data.astype(dtype), chunks=(1, 1, 1, shape[3], shape[4]))
    return path


@pytest.fixture
def small_plate(tmp_path: Path) -> Path:
    """A 3-position, 3-channel, 3-slice 64x64 plate written by iohub."""
    return write_iohub_plate(tmp_path / "small.zarr")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster for one test module (Ray is shut down between modules)."""
    import ray

    from viscy.ray_utils import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def random_cpsam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Cellpose 4 checkpoint of the Cellpose-SAM network with random weights.

    ``CPSAM`` builds its ViT-L encoder with ``sam_model_registry["vit_l"](None)``: no SAM checkpoint, no download.
    """
    torch = pytest.importorskip("torch")
    vit = pytest.importorskip("cellpose.vit")
    torch.manual_seed(0)
    net = vit.CPSAM(dtype=torch.float32)
    path = tmp_path_factory.mktemp("cellpose") / "cpsam_random.pt"
    torch.save(net.state_dict(), path)
    return path
