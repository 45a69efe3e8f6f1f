"""Atomic replacement of a store viscy wrote: build beside it, swap in when complete, never lose the old one.

A replacement of ``<path>`` is built at ``<path>.viscy-partial``. :func:`swap_in` then moves the old store to
``<path>.viscy-old``, the new one to ``<path>`` and only then deletes the old one, so at every instant one
whole store exists; a run killed between the two moves finds ``<path>`` missing and ``<path>.viscy-old``
present, and puts it back.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from viscy.errors import DataError
from viscy.testing import hook

PARTIAL = ".viscy-partial"
OLD = ".viscy-old"


def siblings(path: Path) -> tuple[Path, Path]:
    """``(partial, old)``: where a replacement of ``path`` is built, and where the old store waits."""
    return path.with_name(path.name + PARTIAL), path.with_name(path.name + OLD)


def swap_in(new: Path, final: Path, is_ours: Callable[[Path], bool], hook_point: str) -> None:
    """Move the complete store ``new`` to ``final``, replacing (atomically, per rename) what is there.

    Raises
    ------
    DataError
        If ``<final>.viscy-old`` is in the way and ``is_ours`` says viscy did not write it (nothing is moved).
    """
    _, old = siblings(final)
    if old.exists():
        if not final.exists():
            os.replace(old, final)  # a swap cut short: the old store is still the current one
        elif is_ours(old):  # checked before writing; checked again before deleting
            shutil.rmtree(old)  # left by a swap killed after it completed
        else:
            raise DataError(
                f"{old} is in the way of replacing {final} and was not written by viscy; it is left untouched. "
                "Move it away and rerun"
            )
    if final.exists():
        os.replace(final, old)
    hook(hook_point, path=str(final))
    os.replace(new, final)
    if old.exists():
        shutil.rmtree(old)
