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


def test_worker_lines_go_to_the_log_file(private_tmp: Path) -> None:
    path = console.start_log("unit")
    batch = {"lines": ["Lightning tip", "GPU available: False"], "pid": 42, "actor_name": "RayTrainWorker"}
    console.log_worker_lines(batch)
    console._state["handler"].flush()
    text = path.read_text()
    assert "(RayTrainWorker pid=42) Lightning tip" in text and "(RayTrainWorker pid=42) GPU available: False" in text


def test_the_epoch_console_prints_each_epoch_once(capsys: pytest.CaptureFixture[str]) -> None:
    """One line per reported epoch; an epoch reported again (a restarted worker group, a replayed history) is not."""
    from viscy.train.progress import EpochPrinter

    printer = EpochPrinter(3, ["Nuclei"])
    report = {"train_loss": 0.5, "val_loss": 0.4, "val_pearson_Nuclei": 0.8, "train_samples_per_s": 12.0, "step": 2}
    for epoch in (0, 1, 1, 0, 2):
        printer(report | {"epoch": epoch})
    printer.close()
    out = capsys.readouterr().out
    assert [out.count(f"epoch {e}/3 ") for e in (1, 2, 3)] == [1, 1, 1], out
    assert "epoch 1/3  train_loss 0.5000  val_loss 0.4000  val Pearson Nuclei 0.800  12.0 samples/s" in out
    assert "ETA" in out.split("epoch 2/3")[1]


def test_a_resumed_run_counts_its_epochs_from_where_it_resumed(capsys: pytest.CaptureFixture[str]) -> None:
    from viscy.train.progress import EpochPrinter

    printer = EpochPrinter(4, [])
    printer({"epoch": 2, "train_loss": 1.0})
    assert printer.bar.n == 3
    printer.close()
    assert "epoch 3/4  train_loss 1.0000" in capsys.readouterr().out
