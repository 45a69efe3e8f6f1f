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


class HookCrash(RuntimeError):
    """Raised by the hooks below to cut a job short at a chosen point."""


def crash_at_swap(point: str, **context) -> None:
    """Raise between moving the old store aside and moving the new one in (``predict.swap``/``synth.swap``)."""
    if point in ("predict.swap", "synth.swap"):
        raise HookCrash(f"crash at {point}")


def crash_synth_at_position2(point: str, **context) -> None:
    """Raise once ``viscy synth`` wrote its third position."""
    if point == "synth.position_done" and context["index"] == 2:
        raise HookCrash("simulated crash")


def kill_synth_at_position1(point: str, **context) -> None:
    """SIGKILL the ``viscy synth`` process once it wrote its second position."""
    if point == "synth.position_done" and context["index"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def fail_rank0_at_epoch1(point: str, **context) -> None:
    """Raise in Ray Train rank 0 at the start of epoch 1 (a bug in a worker, not a lost node)."""
    if point == "train.epoch_start" and context["epoch"] == 1 and context["rank"] == 0:
        raise HookCrash("simulated bug in the training step")


EPOCH_STARTS = "test_epoch_starts.txt"


def slow_epochs(point: str, **context) -> None:
    """Sleep 3 s at the start of every training epoch, so a test can interrupt a sweep mid-trial; rank 0 notes
    each epoch it starts in ``<run_dir>/test_epoch_starts.txt``."""
    if point == "train.epoch_start":
        if context["rank"] == 0 and context["run_dir"]:
            with open(Path(context["run_dir"]) / EPOCH_STARTS, "a") as f:
                f.write(f"{context['epoch']}\n")
        time.sleep(3)


def report_recorder(path: str):
    """A Ray Train callback appending the ``epoch`` of every report it sees to ``path`` (one per line)."""
    from ray.train import UserCallback

    class RecordReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            with open(path, "a") as f:
                f.write(f"{int(metrics[0]['epoch'])}\n")

    return RecordReports()
