"""The tune tests' plate: made once per session (per pytest-xdist worker) on the in-process Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tune.tune_helpers import make_plate


@pytest.fixture(scope="session")
def plate(tmp_path_factory, _stop_ray_at_exit) -> Path:
    """A 64² synthetic plate, written with the in-process Ray cluster (started here if no module has yet)."""
    from viscy.ray_utils import ensure_ray

    ensure_ray(num_cpus=2)
    return make_plate(tmp_path_factory.mktemp("tune") / "synth.zarr")
