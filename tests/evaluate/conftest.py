"""Fixtures of the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.evaluate.eval_helpers import add_predictions, synth_plate


@pytest.fixture
def predicted_plate(tmp_path: Path) -> Path:
    """Synthetic 2-FOV 96x96 plate with Nuclei_prediction and Membrane_prediction channels appended."""
    return add_predictions(synth_plate(tmp_path / "plate.zarr"))
