"""Helpers shared by the tests and the benchmarks (``from tests.helpers import ...``); not part of viscy."""

from __future__ import annotations

import copy
import subprocess
import time
from pathlib import Path
from typing import Any

# Tiny configurations of every built-in architecture: seconds to build, export and run on a CPU.
TINY_KWARGS: dict[str, dict[str, Any]] = {
    "unet2d": {"in_channels": 2, "out_channels": 3, "num_blocks": 3, "num_filters": 4},
    "unet25d": {"in_channels": 1, "out_channels": 2, "in_stack_depth": 3, "num_blocks": 3, "num_filters": 4},
    "unet3d": {"in_channels": 1, "out_channels": 2, "in_stack_depth": 4, "num_blocks": 3, "num_filters": 4},
    "unext2": {
        "in_channels": 1,
        "out_channels": 2,
        "in_stack_depth": 4,
        "stem_kernel_size": (2, 4, 4),
        "backbone": "convnextv2_atto",
        "backbone_kwargs": {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)},
        "decoder_conv_blocks": 1,
        "head_expansion_ratio": 1,
        "head_pool": True,
    },
    "fcmae": {
        "in_channels": 1,
        "out_channels": 2,
        "encoder_blocks": (1, 1, 1, 1),
        "dims": (16, 32, 64, 128),
        "stem_kernel_size": (2, 2, 2),
        "in_stack_depth": 4,
        "decoder_conv_blocks": 1,
        "pretraining": False,
    },
}


def tiny_kwargs(name: str) -> dict[str, Any]:
    """A deep copy of the tiny kwargs of built-in architecture ``name``."""
    if name not in TINY_KWARGS:
        raise KeyError(f"no tiny configuration for {name!r}; choose from: {', '.join(TINY_KWARGS)}")
    return copy.deepcopy(TINY_KWARGS[name])


def save_lightning_checkpoint(model: Any, path: str | Path, epoch: int = 0, global_step: int = 0) -> Path:
    """Write ``model`` in VisCy's Lightning layout: ``{"state_dict": {"model.<key>": ...}, ...}``."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": epoch, "global_step": global_step}, path)
    return path


def read_patches(read: Any, data: Any, augment: bool) -> dict[str, Any]:
    """Execute one training read (a :class:`viscy.train.datasource.Read`) in this process."""
    from viscy.train.datasource import start_read

    return start_read(read, data, augment)()


def report_recorder(path: str) -> Any:
    """A Ray Train callback appending the ``epoch`` of every report it sees to ``path`` (one per line)."""
    from ray.train import UserCallback

    class RecordReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            with open(path, "a") as f:
                f.write(f"{int(metrics[0]['epoch'])}\n")

    return RecordReports()


def read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """Read ``proc``'s text stdout line by line until a line holds ``marker``; return what was read.

    Raises
    ------
    AssertionError
        If the process ends or ``timeout`` seconds pass first (the process is then killed).
    """
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        out.append(line)
        if marker in line:
            return "".join(out)
    proc.kill()
    raise AssertionError(f"no {marker!r} within {timeout} s; output:\n{''.join(out)}")
