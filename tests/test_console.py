"""The log file: private to the user while in the temporary directory, never written through a link."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from viscy import console


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary directory for this test's log; the process's logging is put back afterwards."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    root = logging.getLogger()
    level, showwarning, state = root.level, warnings.showwarning, dict(console._state)
    quieted = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
               for name in console._QUIET_LOGGERS}
    yield tmp
    handler = console._state["handler"]
    if handler is not None and handler is not state["handler"]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    warnings.showwarning = showwarning
    console._state.update(state)
    for name, (handlers, propagate) in quieted.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


def test_the_log_starts_private_to_the_user(private_tmp: Path) -> None:
    path = console.start_log("unit")
    logging.getLogger("viscy").info("a line for the log")
    console._state["handler"].flush()
    info = os.lstat(path)
    assert path.parent == private_tmp and path.name.startswith("viscy-unit-") and path.suffix == ".log"
    assert f"-{os.getpid()}-" in path.name  # the pid still says which process wrote it
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    assert "a line for the log" in path.read_text()


def test_a_link_planted_at_the_predictable_name_is_not_followed(private_tmp: Path) -> None:
    victim = private_tmp.parent / "victim.txt"
    victim.write_text("precious")
    now = _dt.datetime.now()
    planted = [private_tmp / f"viscy-unit-{(now + _dt.timedelta(seconds=s)):%Y%m%d-%H%M%S}-{os.getpid()}.log"
               for s in range(-1, 5)]
    for link in planted:
        link.symlink_to(victim)
    path = console.start_log("unit")
    logging.getLogger("viscy").info("a line for the log")
    console._state["handler"].flush()
    assert path not in planted and not path.is_symlink()
    assert victim.read_text() == "precious"
    assert "a line for the log" in path.read_text()


def test_placing_the_log_moves_it_and_never_writes_through_a_link(private_tmp: Path, tmp_path: Path) -> None:
    path = console.start_log("unit")
    logging.getLogger("viscy").info("before placing")
    results = tmp_path / "results"
    results.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (results / "viscy_unit.log").symlink_to(victim)
    with pytest.warns(UserWarning, match="the log stays at .*cannot write .*viscy_unit.log"):
        assert console.place_log(results) == path
    assert victim.read_text() == "precious" and path.is_file()

    (results / "viscy_unit.log").unlink()
    placed = console.place_log(results)
    logging.getLogger("viscy").info("after placing")
    console._state["handler"].flush()
    assert placed == results / "viscy_unit.log" and not placed.is_symlink() and not path.exists()
    text = placed.read_text()
    assert "before placing" in text and "after placing" in text
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(placed.stat().st_mode) == 0o666 & ~umask  # beside the results, the user's usual mode
