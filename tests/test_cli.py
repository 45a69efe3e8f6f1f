"""The ``viscy`` command line: help for every verb, config errors, a real run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from viscy.cli import VERBS, main


def test_top_level_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb.name in out


@pytest.mark.parametrize("verb", [v.name for v in VERBS])
def test_every_verb_has_help(verb, capsys):
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: viscy {verb}" in out and "--config" in out


def test_console_script_runs():
    exe = Path(sys.executable).parent / "viscy"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "preprocess" in out


def test_unknown_key_is_rejected(capsys):
    assert main(["info", "--data_path", "x.zarr", "--nope", "1"]) == 2
    assert "unknown key 'nope'" in capsys.readouterr().err


def test_unknown_verb_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_info_on_plate_and_missing_path(small_plate, capsys):
    assert main(["info", "--data_path", str(small_plate)]) == 0
    out = capsys.readouterr().out
    assert "Phase3D" in out and "A/1/0" in out
    assert main(["info", "--data_path", str(small_plate.parent / "missing.zarr")]) == 1
    assert "does not exist" in capsys.readouterr().err
