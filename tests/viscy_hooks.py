"""Fault-injection functions for ``VISCY_TEST_HOOK`` (see :mod:`viscy.testing`)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path



def slow_predict_units(point: str, **context) -> None:
    """Sleep 4 s after every prediction unit, so a test can kill the job between FOVs."""
    if point == "predict.unit_done":
        time.sleep(4)


def crash_rank1_at_epoch2(point: str, **context) -> None:
    """SIGKILL Ray Train rank 1 once, at the start of epoch 2 (marker file ``killed`` beside the run directory)."""
    if point != "train.epoch_start":
        return
    marker = Path(context["run_dir"]).parent / "killed"
    if context["epoch"] == 2 and context["rank"] == 1 and not marker.exists():
        marker.write_text("crashed")
        os.kill(os.getpid(), signal.SIGKILL)
