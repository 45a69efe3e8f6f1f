"""Shared fixtures: small real OME-Zarr plates and one local Ray cluster shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray workers and subprocesses inherit the environment of the test process: this makes tests.faults (fault
# injection, run in Ray workers) and the modules in tests/ importable there.
_TESTS_DIR = Path(__file__).resolve().parent
_PATHS = [str(_TESTS_DIR.parent), str(_TESTS_DIR)]
_PYTHONPATH = os.environ.get("PYTHONPATH", "").split(os.pathsep)
if any(p not in _PYTHONPATH for p in _PATHS):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (*_PATHS, *_PYTHONPATH) if p)

# Data, not tests: pytest need not walk their ~2,000 directories.
collect_ignore = ["data/stores", "clusters/kuberay-crds-v1.7.0"]


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


# Modules that start Ray clusters of their own (a head, `viscy` processes with a local Ray) and stop the shared
# in-process one: run after every module that uses the shared cluster, so it starts once, not after each of them.
OWN_CLUSTER_MODULES = (
    "tune/test_tune_resume.py",
    "test_ray_utils.py",
    "plugins/test_plugin_e2e.py",
    "serve/",
    "test_readme.py",
    "clusters/test_multinode.py",
)
# `make test` runs two pytest-xdist workers, each running one of these groups in the order above: the
# shared-cluster modules, then tune's resume and ray_utils (each stops the shared cluster and starts its own), and
# the other modules with heads of their own. Much of a Ray test is waiting (process start-up, polling, fault
# sleeps), so on 2 cores the two streams overlap; each has about half of the suite's time (test durations summed
# per group: 991 and 1,026 s on 2026-12-07).
XDIST_GROUPS = (
    "shared_cluster", "shared_cluster", "shared_cluster", "own_heads", "own_heads", "own_heads", "own_heads"
)


def _cluster_order(test_path: str) -> int:
    """0 for a module on the shared cluster, else 1 + the index of its entry in ``OWN_CLUSTER_MODULES``."""
    path = test_path.removeprefix("tests/")
    return next((i + 1 for i, prefix in enumerate(OWN_CLUSTER_MODULES) if path.startswith(prefix)), 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: _cluster_order(item.path.relative_to(_TESTS_DIR.parent).as_posix()))  # stable


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """With ``--dist loadgroup``: one work unit per group of ``XDIST_GROUPS`` (pytest 9.2's node ids no longer
    take pytest-xdist's ``@group`` suffix, so its own ``xdist_group`` marks are not seen)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ClusterGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return XDIST_GROUPS[_cluster_order(nodeid.split("::")[0])]

    return ClusterGroupScheduling(config, log)


@pytest.fixture
def small_plate(tmp_path: Path) -> Path:
    """A 3-position, 3-channel, 3-slice 64x64 plate written by iohub."""
    return write_iohub_plate(tmp_path / "small.zarr")


@pytest.fixture(scope="session")
def _stop_ray_at_exit():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_stop_ray_at_exit):
    """The in-process local Ray cluster (2 CPUs), shared by every module that asks for one.

    It is started on first use and left running for the next module: a start and stop cost ~10 CPU-seconds
    on 2 cores, and its idle workers (torch already imported) serve the next module's tasks. It starts again
    only after a test stopped it (:func:`tests.ray_head.ray_head` does, so that no other cluster runs beside
    a head) and is stopped at the end of the session. Ray Train, Tune and Ray Data release what they reserved
    when their run ends, so one module's work leaves nothing behind for the next.
    """
    import ray

    from viscy.ray_utils import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray


@pytest.fixture
def no_ray() -> None:
    """No in-process Ray cluster when the test starts (one a previous module left running is stopped)."""
    import ray

    if ray.is_initialized():
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
