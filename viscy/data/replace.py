"""Atomic replacement of a store viscy wrote: build beside it, swap in when complete, never lose the old one.

A replacement of ``<path>`` is built at ``<path>.viscy-partial``. :func:`swap_in` then moves the old store to
``<path>.viscy-old``, the new one to ``<path>`` and only then deletes the old one, so at every instant one
whole store exists; a run killed between the two moves finds ``<path>`` missing and ``<path>.viscy-old``
present, and puts it back. None of the three paths may be a symbolic link (:func:`refuse_links`): a rename
moves a link, not the store it points to, and a store is never deleted through a link.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from viscy.errors import DataError

PARTIAL = ".viscy-partial"
OLD = ".viscy-old"


def siblings(path: Path) -> tuple[Path, Path]:
    """``(partial, old)``: where a replacement of ``path`` is built, and where the old store waits."""
    return path.with_name(path.name + PARTIAL), path.with_name(path.name + OLD)


def refuse_links(path: Path) -> None:
    """Refuse ``path``, ``<path>.viscy-partial`` or ``<path>.viscy-old`` being a symbolic link.

    Raises
    ------
    DataError
        Naming the link, its target and the fix (nothing is touched).
    """
    for candidate in (path, *siblings(path)):
        if candidate.is_symlink():
            raise DataError(
                f"{candidate} is a symbolic link (to {os.readlink(candidate)}); viscy builds, swaps and deletes stores "
                f"only where they lie, never through a link. Pass the store's real path as the output, or remove the "
                f"link (rm {candidate} leaves its target untouched) and rerun"
            )


def swap_in(new: Path, final: Path, is_ours: Callable[[Path], bool]) -> None:
    """Move the complete store ``new`` to ``final``, replacing (atomically, per rename) what is there.

    Raises
    ------
    DataError
        If ``<final>.viscy-old`` is in the way and ``is_ours`` says viscy did not write it, or a path of the swap
        is a symbolic link (nothing is moved).
    """
    refuse_links(final)
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
    os.replace(new, final)
    if old.exists():
        shutil.rmtree(old)
