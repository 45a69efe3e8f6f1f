"""The one testing hook: fault injection for tests lives in the tests, not in the production path.

Production code calls :func:`hook` at a few named points. It does nothing unless the environment variable
``VISCY_TEST_HOOK`` names a ``module:function``; then that function is imported (once per process) and
called as ``function(point, **context)``. The variable is inherited by Ray workers started from the same
environment, so a test can slow down or kill a worker deterministically.

Points
------
``predict.unit_done``
    After a prediction actor wrote one work unit (``fov``, ``t``, ``z0``).
``predict.swap``
    In the driver, between moving the old prediction store aside and moving its complete replacement into
    place (``output``).
``synth.position_done``
    After ``viscy synth`` wrote one position of the plate under construction (``index``, ``path``).
``synth.swap``
    Between moving the old synthetic plate aside and moving the new one into place (``path``).
``train.epoch_start``
    At the start of every training epoch in every Ray Train worker (``epoch``, ``rank``, ``run_dir``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

HOOK_ENV = "VISCY_TEST_HOOK"
_loaded: dict[str, Callable[..., Any]] = {}


def hook(point: str, **context: Any) -> None:
    """Call the test hook named by ``VISCY_TEST_HOOK`` (no-op when unset)."""
    target = os.environ.get(HOOK_ENV)
    if not target:
        return
    if target not in _loaded:
        module, _, name = target.partition(":")
        _loaded[target] = getattr(importlib.import_module(module), name or "hook")
    _loaded[target](point, **context)


def forwarded() -> str | None:
    """The hook setting of this process, to hand to Ray workers that did not inherit it (``adopt`` there)."""
    return os.environ.get(HOOK_ENV)


def adopt(target: str | None) -> None:
    """Use the hook forwarded from the driver (no-op for None)."""
    if target:
        os.environ[HOOK_ENV] = target
