"""The ``viscy`` command line: help for every verb, config errors, a real run."""

from __future__ import annotations

import os
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


REPO = Path(__file__).resolve().parents[1]


def _viscy(*args: str, cwd: Path | None = None, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``viscy ARGS`` as a real process running this checkout's code (without the variables in ``unset``)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for name in unset:
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "viscy.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_info_takes_one_position_pattern(small_plate):
    out = _viscy("info", "--data_path", str(small_plate), "--positions", "A/*")
    assert out.returncode == 0, out.stderr
    assert "3 positions, 2 selected" in out.stdout and "positions A/1/0, A/1/1" in out.stdout
    out = _viscy("info", "--data_path", str(small_plate), "--positions", "B/2/0")
    assert out.returncode == 0, out.stderr
    assert "1 selected" in out.stdout and "positions B/2/0" in out.stdout


def test_synth_takes_numeric_well_columns(tmp_path):
    out = _viscy("synth", "--output", "plate.zarr", "--cols", "1", "2", "3", "--fovs_per_well", "1", "--yx", "32", "32",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    from viscy.data.plate import Plate

    with Plate(tmp_path / "plate.zarr") as plate:
        assert plate.positions == ["A/1/0", "A/2/0", "A/3/0"]
    out = _viscy("synth", "--output", "one.zarr", "--cols", "1", "--fovs_per_well", "1", "--yx", "32", "32",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert Plate(tmp_path / "one.zarr").positions == ["A/1/0"]
    out = _viscy("synth", "--output", "bad.zarr", "--yx", "512", cwd=tmp_path)
    assert out.returncode == 2 and "give 2 values, e.g. --yx 512 512" in out.stderr
    assert not (tmp_path / "bad.zarr").exists()


def test_preprocess_console_is_quiet_and_names_its_log(small_plate):
    # as from a user's shell: no RAY_AUTH_MODE (make test sets it), no RAY_ADDRESS
    out = _viscy("preprocess", "--data_path", str(small_plate), "--grid_spacing", "1",
                 unset=("RAY_AUTH_MODE", "RAY_ADDRESS"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    # a summary line and one per channel; Ray's start-up and worker chatter live in the log file
    assert lines[0].startswith("viscy preprocess: 3 FOV(s)") and len(lines) == 4, out.stdout
    noise = [ln for ln in out.stderr.splitlines() if "preprocess FOVs" not in ln and ln.strip()]
    assert not noise, out.stderr
    log = small_plate / "viscy_preprocess" / "viscy_preprocess.log"
    assert "viscy preprocess started" in log.read_text()
    assert (small_plate / "viscy_preprocess" / "viscy_config.yaml").exists()


def test_stage_error_is_one_line_with_the_log_path(small_plate):
    out = _viscy("preprocess", "--data_path", str(small_plate), "--channels", "DAPI")
    assert out.returncode == 1
    first, second = out.stderr.strip().splitlines()[-2:]
    assert first.startswith("viscy preprocess: error:") and "DAPI" in first
    log = Path(second.strip().removeprefix("(details: ").removesuffix(")"))
    assert "Traceback" in log.read_text()


def test_pipeline_verbs_run_the_python_api():
    entries = {v.name: v.entry for v in VERBS}
    for verb in ("synth", "preprocess", "train", "export", "predict", "evaluate"):
        assert entries[verb] == f"viscy.api:{verb}"


def test_old_key_on_the_command_line_warns_and_help_shows_the_new_name(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--data.source_channels" in out and "--data.source_channel " not in out
    # the old name is read (the warning names the new key); the unknown key then stops the command
    assert main(["train", "--data.data_path", "x.zarr", "--data.source_channel", "BF", "--trainer.bogus", "1"]) == 2
    err = capsys.readouterr().err
    assert "'data.source_channel' is deprecated; use 'data.source_channels'" in err
    assert "unknown key 'trainer.bogus'" in err and "source_channel'" not in err.split("unknown key")[1]
