"""Every shell example in README.md runs, on tiny data, so that none can rot.

How it works
------------
1. ``readme_commands()`` reads every fenced ```` ```bash ```` block of README.md, joins ``\\`` continuations,
   drops trailing ``# comments`` (with ``shlex``, so quoted ``#`` survive) and yields one command per line.
2. A command that starts with ``viscy`` is run, and so is the README's ``ray job submit -- viscy train``; anything
   else must match ``NOT_RUN`` (a regex and the reason it cannot run here, e.g. ``make test``, which CI runs
   itself). ``test_every_readme_command_is_run_or_allowlisted`` fails when the README gains a command that is
   neither, so a new example cannot silently go untested.
3. Each command is rewritten by ``SUBSTITUTIONS``, in table order: ``Sub(pattern, replacement, why, only)`` is
   ``re.sub(pattern, replacement, command)`` applied to commands matching ``only`` (all if empty), on the command
   as ``shlex.join`` writes it (``--positions 'A/*'``). ``{repo}`` in a replacement is this checkout's root,
   ``{work}`` the scratch directory (filled in when the command runs). Entries only shrink sizes (``--yx 512 512``
   -> ``--yx 96 96``), point placeholder paths at what the test made (``VSCyto3D.ckpt`` -> a tiny VisCy-format
   checkpoint from ``PROVIDED_FILES``), or append shrinking overrides (``pattern="$"``: 1 epoch, 2 steps, a tiny
   UNeXt2 backbone); later overrides win, so the command as written, shrunk, is what runs.
   To cover a new README example, add the entries it needs here (``test_substituted_commands`` prints every
   command before and after); a file the README assumes to exist goes into ``PROVIDED_FILES``.
4. Commands run as real processes (``python -m viscy.cli``, this checkout first on ``PYTHONPATH``, joining one
   Ray head the module starts, through ``RAY_ADDRESS``; the ``ray job submit`` example submits to that head's
   dashboard, in place of the README's ``127.0.0.1:8265``), in one scratch directory shared by the module,
   ordered by pipeline stage (``STAGES``: synth, preprocess, info, train, export, predict, evaluate; README order
   within a stage; the job last), because later examples read what earlier ones wrote. A command that fails today
   for a reason outside this test is listed in ``KNOWN_FAILURES`` and marked ``xfail(strict=False)``; remove its
   entry once it is fixed.
5. The serving examples (``SERVING``: ``viscy serve``, then ``viscy infer`` and ``curl`` from a second shell) run in
   ``test_readme_serving_commands``: ``viscy serve`` as a background process on a free port (the only rewrite:
   ``127.0.0.1:8000`` -> that port), the others against it, then Ctrl-C. ``demo_output/model`` holds the
   README's ``first.onnx`` under the demo's file name, as ``make demo`` leaves it.
6. The README's ```` ```python ```` blocks run last, in the same directory, rewritten by ``PY_SUBSTITUTIONS``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.ray_head import free_ports

REPO = Path(__file__).resolve().parents[1]
_SERVE_PORT = free_ports(1)[0]  # the serving examples' port (8000 may be taken on a CI machine)
README = REPO / "README.md"


@dataclass(frozen=True)
class Sub:
    """One rewrite of a README command: ``re.sub(pattern, replacement)`` on commands matching ``only``."""

    pattern: str
    replacement: str
    why: str
    only: str = ""


TINY_UNEXT2 = "--model.kwargs '{backbone: convnextv2_atto}'"  # 3.4 M instead of 32 M parameters, same code

SUBSTITUTIONS: list[Sub] = [
    # ---- sizes
    Sub(r"--yx 512 512", "--yx 96 96", "96² FOVs: a multiple of UNeXt2's 32 that holds the demo's 96² patches"),
    Sub(r"--z 16\b", "--z 5", "5 slices, the depth VSCyto3D takes"),
    Sub(r"--fovs_per_well 4\b", "--fovs_per_well 2", "2 FOVs per well (6 in all)"),
    Sub(r"--example_yx 256 256", "--example_yx 64 64", "parity check at 64²"),
    Sub(r"--tile_yx 1024 1024", "--tile_yx 64 64", "tiles smaller than the 96² FOV, so tiling still happens"),
    Sub(r"--trainer\.num_workers 8\b", "--trainer.num_workers 1", "1 Ray Train worker on 2 cores"),
    Sub(r"--num_actors 2\b", "--num_actors 2 --num_cpus_per_actor 0.5",
        "2 actors of 1 CPU would hold both cores and starve the read tasks feeding them"),
    # ---- paths
    Sub(r"(?<![\w/])configs/", "{repo}/configs/", "recipes come from the checkout (commands run in a scratch dir)"),
    Sub(r"demo_output/synthetic\.zarr", "plate.zarr", "the plate of the synth example stands in for the demo's"),
    # ---- appended shrinking overrides (later keys win)
    Sub(r"$", " --trainer.max_epochs 1 --trainer.train_steps_per_epoch 2 --trainer.val_steps 1 --data.batch_size 2"
        " --data.patches_per_stack 2 --trainer.reads_per_fov 1 --trainer.val_reads_per_fov 1",
        "1 epoch of 2 steps, 1 validation step", only=r"(^|-- )viscy train "),
    Sub(r"$", " --trainer.num_workers 1", "recipes ask for 2-4 workers of 0.5 CPU: on 2 cores 4 of them starve Ray "
        "Data's read tasks (a resumed VSCyto3D run hung), and each worker costs minutes here",
        only=r"(^|-- )viscy train (?!.*--trainer\.num_workers)"),
    Sub(r"$", " --data.data_path plate.zarr --trainer.storage_path runs --data.yx_patch_size 64 64"
        f" --trainer.use_gpu false --trainer.cpus_per_worker 0.5 {TINY_UNEXT2}",
        "/PLACEHOLDER/ paths of the recipe -> the synth plate and ./runs; 64² patches; CPU workers; tiny backbone",
        only=r"configs/vscyto3d\.yaml"),
    Sub(r"$", " --data.data_path plate.zarr --trainer.storage_path tune --search.num_samples 1 --trainer.max_epochs 1"
        " --trainer.train_steps_per_epoch 2 --trainer.val_steps 1 --data.batch_size 2 --data.patches_per_stack 2"
        " --data.yx_patch_size 64 64", "1 trial (the recipe's starting point) of 1 short epoch on the synth plate: "
        "the command and what it writes; tests/tune runs whole sweeps (ASHA, several trials, resume)",
        only=r"^viscy tune "),
    Sub(r"--model\.name VSCyto3D", f"--model.name VSCyto3D {TINY_UNEXT2}",
        "VSCyto3D with a tiny backbone (VSCyto3D.ckpt is made with the same)"),
    # ---- the job submitted to a running cluster
    Sub(r"--working-dir \.", "--working-dir {repo}", "the checkout is the job's working directory (commands run in "
        "the scratch dir)", only=r"^ray job submit "),
    Sub(r"/abs/path/plate\.zarr", "{work}/plate.zarr", "the synth plate, by its absolute path",
        only=r"^ray job submit "),
    Sub(r"$", " --trainer.storage_path {work}/job_runs --trainer.run_name job",
        "runs outside Ray's copy of the working directory, where the test can look at them", only=r"^ray job submit "),
]

# Files the README assumes the reader has: name in the workspace -> function(path) writing a tiny stand-in.


def _tiny_vscyto3d_checkpoint(path: Path) -> None:
    """A VisCy/Lightning-format checkpoint (``state_dict`` with ``model.`` keys) of the tiny VSCyto3D."""
    import torch

    from viscy.models import create_model

    torch.manual_seed(0)
    model = create_model("VSCyto3D", backbone="convnextv2_atto")
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 48}, path)


def _phase_tif(path: Path) -> None:
    """A (Y, X) float32 phase-like image for the serving examples."""
    import tifffile
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    tifffile.imwrite(path, (ndi.gaussian_filter(rng.normal(size=(200, 160)), 3) * 10).astype(np.float32))


PROVIDED_FILES = {"VSCyto3D.ckpt": _tiny_vscyto3d_checkpoint, "phase.tif": _phase_tif}

# Shell lines of the README that are not run here, each with why (regex on the command).
NOT_RUN: dict[str, str] = {
    r"^make (demo|test)$": "CI (.ci/run) runs `make test` itself, and `make demo` is its minutes-long default job; "
    "the demo's steps are the viscy commands run here",
    r"^ray (start|stop)\b": "starts/stops a Ray head: the examples run on a head that this module starts the same "
    "way (`ray start --head` on loopback, free ports: tests/ray_head.py) and stops when they are done",
    r"^pip install \S*napari": "installs a desktop viewer (Qt) on the user's machine, outside viscy's venv",
    r"^napari --plugin napari-ome-zarr ": "opens a window (needs a display); napari-ome-zarr reads the store with "
    "ome-zarr-py's Reader, which tests/predict/test_predict_plate.py runs on predict's stores (image and label layer)",
    r"^export RAY_AUTH_MODE=token$": "environment for `ray job submit` (the examples run with RAY_AUTH_MODE=token)",
    r"^viscy evaluate .*--segmentation\.method cellpose --segmentation\.model cpsam": "needs the Cellpose-SAM "
    "weights (a download; CI has no network) and minutes of CPU per FOV; the Cellpose path is tested with a "
    "random-weight Cellpose-SAM checkpoint in tests/evaluate/test_eval_cellpose.py",
}

# Commands that fail today for reasons outside this test (regex on the README command -> reason).
KNOWN_FAILURES: dict[str, str] = {}

# Rewrites of the README's ```python blocks (same rules as SUBSTITUTIONS).
PY_SUBSTITUTIONS: list[Sub] = [
    Sub(r'"configs/', '"{repo}/configs/', "recipes come from the checkout"),
    Sub(r"demo_output/synthetic\.zarr", "plate.zarr", "the plate of the synth example stands in for the demo's"),
    Sub(r'data=\{"data_path": \[plate\]\}', 'data={"data_path": [plate], "batch_size": 2, "patches_per_stack": 2}',
        "small batches"),
    Sub(r'api\.serve\(models="demo_output/model"\)', f'api.serve(models="demo_output/model", port={_SERVE_PORT})',
        "a free port (8000 may be taken on a CI machine)"),
    Sub(r'trainer=\{"run_name": "notebook"\}', 'trainer={"run_name": "notebook", "max_epochs": 1, '
        '"train_steps_per_epoch": 2, "val_steps": 1, "num_workers": 1, "reads_per_fov": 1, "val_reads_per_fov": 1}',
        "1 epoch of 2 steps on 1 worker"),
]

STAGES = ["synth", "preprocess", "info", "train", "tune", "export", "predict", "evaluate", "demo"]
SERVING = r"^(viscy (serve|infer)|curl) "  # run by test_readme_serving_commands, against a running server
CONSUMER = r"^bioimageio test "  # bioimageio.core's own CLI, run like the viscy commands (after them)
JOB = r"^ray job submit .* -- viscy "  # run by test_readme_command_runs, after the viscy commands
README_DASHBOARD = "http://127.0.0.1:8265"  # the README's `ray job submit --address`


def readme_commands(text: str | None = None) -> list[str]:
    """Commands of README's ```bash blocks: continuations joined, comments dropped, as ``shlex.join`` writes them."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(shlex.join(tokens))
    return commands


def substitute(command: str) -> str:
    """``command`` with every matching ``SUBSTITUTIONS`` entry applied, in table order."""
    for sub in SUBSTITUTIONS:
        if not sub.only or re.search(sub.only, command):
            command = re.sub(sub.pattern, sub.replacement.replace("{repo}", str(REPO)), command, count=1)
    return command


def _not_run_reason(command: str) -> str | None:
    return next((why for pattern, why in NOT_RUN.items() if re.search(pattern, command)), None)


def _run_plan() -> list[str]:
    """The README's ``viscy`` commands to run, in pipeline-stage order (README order within a stage), then its
    ``ray job submit`` example (it trains on the plate the others wrote)."""
    run = [c for c in readme_commands() if (c.startswith("viscy ") or re.search(CONSUMER, c))
           and _not_run_reason(c) is None and not re.search(SERVING, c)]
    jobs = [c for c in readme_commands() if re.search(JOB, c) and _not_run_reason(c) is None]
    return sorted(run, key=lambda c: STAGES.index(c.split()[1]) if c.split()[1] in STAGES else len(STAGES)) + jobs


# The examples join one Ray head started for this module (as on a cluster) instead of each starting its own:
# the same code path once Ray is up, about 10 s less per command.
_CLUSTER: dict[str, str] = {}


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="token", WANDB_MODE="offline", RAY_DEDUP_LOGS="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("RAY_ADDRESS", None)
    if "address" in _CLUSTER:
        env["RAY_ADDRESS"] = _CLUSTER["address"]
    return env


def _viscy(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "viscy.cli", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- fast checks
def test_parser_handles_continuations_comments_and_quotes():
    text = "x\n```bash\nviscy a --p 'A/*' \\\n     --q 1   # note\n# only a comment\nmake demo   # d\n```\n"
    assert readme_commands(text) == ["viscy a --p 'A/*' --q 1", "make demo"]
    assert readme_commands("```\nviscy not-bash\n```\n") == []


def test_every_readme_command_is_run_or_allowlisted():
    commands = readme_commands()
    assert sum(c.startswith("viscy ") for c in commands) >= 10, "the README parser found too few commands"
    unknown = [c for c in commands if not c.startswith("viscy ") and _not_run_reason(c) is None
               and not re.search(SERVING, c) and not re.search(JOB, c) and not re.search(CONSUMER, c)]
    assert not unknown, (
        f"README commands neither run nor allowlisted: {unknown}; make them `viscy ...` commands or add them to "
        "NOT_RUN in tests/test_readme.py with the reason they cannot run here"
    )
    assert any(re.search(JOB, c) for c in _run_plan()), "the README's `ray job submit -- viscy ...` example is gone"
    unknown_verbs = [c for c in commands if c.startswith("viscy ") and c.split()[1] not in STAGES
                     and not re.search(SERVING, c)]
    assert not unknown_verbs, f"add the verb of {unknown_verbs} to STAGES in tests/test_readme.py"
    for pattern in NOT_RUN:
        assert any(re.search(pattern, c) for c in commands), f"NOT_RUN entry {pattern!r} matches no README command"


def test_substituted_commands():
    """The rewrites keep each command's verb and own keys, and only shrink or point at the test's files."""
    for command in _run_plan():
        new = substitute(command)
        print(f"{command}\n  -> {new}")
        assert shlex.split(new)[:2] == shlex.split(command)[:2]
        assert "/PLACEHOLDER/" not in new
        keys = {t for t in shlex.split(command) if t.startswith("--")}
        assert keys <= {t for t in shlex.split(new) if t.startswith("--")}, new


def test_help_of_viscy_and_every_verb(tmp_path):
    from viscy.cli import VERBS, _load
    from viscy.config import describe_schema

    out = _viscy(["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    for verb in VERBS:
        assert verb.name in out.stdout
    for verb in VERBS:
        out = _viscy([verb.name, "--help"], tmp_path)
        assert out.returncode == 0, out.stderr
        assert f"usage: viscy {verb.name}" in out.stdout
        for key, _, _ in describe_schema(_load(verb.schema)):
            listed = re.search(rf"^ +--{re.escape(key)}( |$)", out.stdout, flags=re.M)
            assert listed, f"viscy {verb.name} --help does not list --{key}"


# ---------------------------------------------------------------------------------------------- the examples
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Iterator[Path]:
    """One scratch directory for every example (later ones read what earlier ones wrote), and a Ray head."""
    from ray_head import ray_head

    work = tmp_path_factory.mktemp("readme")
    for name, make in PROVIDED_FILES.items():
        make(work / name)
    # The README's job runs `viscy ...`: on the head's PATH, as in an environment where viscy is installed.
    path = os.pathsep.join(p for p in (str(Path(sys.executable).parent), os.environ.get("PATH", "")) if p)
    with ray_head(tmp_path_factory.mktemp("head"), dict(os.environ, RAY_AUTH_MODE="token", PATH=path)) as head:
        _CLUSTER["address"], _CLUSTER["dashboard"] = head.gcs_address, head.dashboard
        try:
            yield work
        finally:
            _CLUSTER.clear()


def _plan_params() -> list:
    params = []
    for i, command in enumerate(_run_plan()):
        reason = next((why for pattern, why in KNOWN_FAILURES.items() if re.search(pattern, command)), None)
        marks = [pytest.mark.xfail(strict=False, reason=reason)] if reason else []
        params.append(pytest.param(command, marks=marks, id=f"{i:02d}-{' '.join(command.split()[:2])}"))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("command", _plan_params())
def test_readme_command_runs(command: str, workspace: Path):
    new = substitute(command).replace("{work}", str(workspace))
    if re.search(JOB, command):
        _run_job(new, workspace)
        return
    if re.search(CONSUMER, command):
        out = subprocess.run([str(Path(sys.executable).parent / "bioimageio"), *shlex.split(new)[1:]], cwd=workspace,
                             env=_env(), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0 and "passed" in out.stdout, f"{new}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return
    out = _viscy(shlex.split(new)[1:], workspace)
    assert out.returncode == 0, f"{new}\nexit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    _check_outputs(shlex.split(new), out.stdout, workspace)


def _run_job(command: str, workspace: Path) -> None:
    """The README's ``ray job submit`` to the module's head (token auth); the job's ``viscy`` command succeeds
    and leaves what that verb promises."""
    import time

    tokens = shlex.split(command.replace(README_DASHBOARD, _CLUSTER["dashboard"]))
    cmd = [str(Path(sys.executable).parent / "ray"), *tokens[1:]]
    for _ in range(10):  # the job agent can come up a little after the dashboard answers
        out = subprocess.run(cmd, cwd=workspace, env=_env(), capture_output=True, text=True, timeout=600)
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(3)
    assert out.returncode == 0, f"{command}\nexit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert "succeeded" in out.stdout.lower(), out.stdout[-3000:]
    _check_outputs(tokens[tokens.index("--") + 1:], out.stdout, workspace)


def _last(tokens: list[str], key: str) -> str | None:
    """The value of the last ``key`` in ``tokens`` (later overrides win, as in ``viscy``)."""
    values = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == key]
    return values[-1] if values else None


def _check_outputs(tokens: list[str], stdout: str, work: Path) -> None:
    """What each verb promises to leave behind is there."""
    import json

    verb = tokens[1]
    output = _last(tokens, "--output")
    if output not in (None, "null"):
        assert (work / output).exists(), f"viscy {verb} wrote no {output}"
    if verb == "preprocess":
        attrs = json.loads((work / _last(tokens, "--data_path") / ".zattrs").read_text())
        assert {"Phase3D", "Nuclei"} <= set(attrs["normalization"])
    if verb == "train":
        import yaml

        recipe = yaml.safe_load(Path(_last(tokens, "--config")).read_text()) if _last(tokens, "--config") else {}
        storage = _last(tokens, "--trainer.storage_path") or recipe.get("trainer", {}).get("storage_path", "runs")
        run = work / storage / _last(tokens, "--trainer.run_name")
        assert (run / "best_model.pt").is_file() and (run / "viscy_config.yaml").is_file()
        assert "val Pearson" in stdout
    if verb == "export" and "--model.name" not in tokens:
        from viscy.models import read_card
        from viscy.models.bioimageio import read_package_card

        # exported from best_model.pt alone: the channels and normalisation training used are in the file
        card = (read_package_card if _last(tokens, "--format") == "bioimageio" else read_card)(work / output)
        assert card.target_channels == ["Nuclei", "Membrane"] and card.source_channels == ["Phase3D"]
        assert card.training["run_name"] and card.normalization
        if _last(tokens, "--format") == "bioimageio":
            assert "bioimageio.core model test passed" in stdout, stdout
    if verb == "predict" and output not in (None, "null"):
        from viscy.data.plate import Plate

        with Plate(work / output) as store:
            assert store.channel_names == ["Nuclei_prediction", "Membrane_prediction"], store.channel_names
        if str(_last(tokens, "--onnx")).endswith(".zip"):
            _same_as_bioimageio_core(work / _last(tokens, "--onnx"), work / _last(tokens, "--data_path"), work / output)
    if verb == "predict" and output in (None, "null"):
        from viscy.data.plate import Plate

        with Plate(work / _last(tokens, "--data_path")) as plate:
            assert "Nuclei_prediction" in plate.channel_names  # appended to the input plate
    if verb == "tune":
        exp = work / _last(tokens, "--trainer.storage_path") / "tune-demo"
        assert (exp / "leaderboard.csv").is_file() and (exp / "best_config.yaml").is_file(), list(exp.iterdir())
        assert "best config" in stdout
    if verb == "evaluate":
        summary = work / (_last(tokens, "--output_dir") or "evaluation") / "summary.json"
        assert summary.is_file(), f"viscy evaluate wrote no {summary}"


def _same_as_bioimageio_core(package: Path, plate_path: Path, output: Path) -> None:
    """Every predicted plane of the README's package equals bioimageio.core's prediction of it (within 1e-4 of
    the largest value: the outputs are in the plate's intensities)."""
    from tests.bmz_helpers import core_prediction
    from viscy.data.plate import Plate

    with Plate(plate_path) as plate, Plate(output) as written:
        for fov in written.positions:
            raw = plate.read(fov, 0, plate.channel_indices(["Phase3D"]))[0]
            ours = written.read(fov, 0, [0, 1])
            for z in range(raw.shape[0]):
                reference = core_prediction(package, raw[z])
                assert np.abs(ours[:, z] - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max()), (fov, z)


def readme_python(text: str | None = None) -> list[str]:
    """The README's ```python blocks."""
    text = README.read_text() if text is None else text
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _demo_model(workspace: Path) -> None:
    """``demo_output/model/demo_unet2d.onnx``, as ``make demo`` leaves it: the README's exported first.onnx."""
    import shutil

    target = workspace / "demo_output" / "model" / "demo_unet2d.onnx"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(workspace / "first.onnx", target)


def _python_code(block: str) -> str:
    for sub in PY_SUBSTITUTIONS:
        block = re.sub(sub.pattern, sub.replacement.replace("{repo}", str(REPO)), block)
    return block


def test_python_substitutions_apply():
    blocks = readme_python()
    assert len(blocks) == 2, "the README's Python examples are the API walk-through and the serving client"
    for sub in PY_SUBSTITUTIONS:
        assert any(re.search(sub.pattern, b) for b in blocks), f"PY_SUBSTITUTIONS entry {sub.pattern!r} matches nothing"


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1], ids=["api", "serve-client"])
def test_readme_python_runs(workspace: Path, index: int):
    """The notebook-style examples, after the shell examples (they use their plate and exported model)."""
    code = _python_code(readme_python()[index])
    _demo_model(workspace)
    out = subprocess.run([sys.executable, "-c", code], cwd=workspace, env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"{code}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    if "api.train" in code:
        assert "raw intensity" in out.stdout  # the example prints the units evaluation compared in
        assert (workspace / "notebook_eval" / "summary.json").is_file()
    else:
        assert "['Nuclei', 'Membrane'] (2, 96, 96)" in out.stdout, out.stdout


@pytest.mark.slow
def test_readme_serving_commands(workspace: Path):
    """`viscy serve` as written (on a free port), then the second shell's commands against it, then Ctrl-C."""
    import signal

    import tifffile

    commands = [c for c in readme_commands() if re.search(SERVING, c)]
    serve_cmd = [c for c in commands if c.startswith("viscy serve")]
    assert len(serve_cmd) == 1 and len(commands) >= 4, commands
    _demo_model(workspace)
    port = f"127.0.0.1:{_SERVE_PORT}"
    args = shlex.split(serve_cmd[0])[1:] + ["--port", str(_SERVE_PORT)]
    proc = subprocess.Popen([sys.executable, "-m", "viscy.cli", *args], cwd=workspace, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = []
    try:
        for line in proc.stdout:
            banner.append(line)
            if "Ctrl-C stops it" in line:
                break
        assert proc.poll() is None, "".join(banner)
        assert f"at http://{port}" in "".join(banner), "".join(banner)
        for command in commands[1:]:
            command = command.replace("127.0.0.1:8000", port)
            tokens = shlex.split(command)
            if tokens[0] == "viscy":
                out = _viscy(tokens[1:] + ["--url", f"http://{port}"], workspace, timeout=300)
            else:
                out = subprocess.run(tokens + ["--fail-with-body"], cwd=workspace, capture_output=True, text=True,
                                     timeout=300)
            assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        stained = tifffile.imread(workspace / "stained.tif")
        assert stained.shape == (2, 200, 160)
        np.testing.assert_allclose(tifffile.imread(workspace / "stained_by_curl.tif"), stained, atol=1e-6)
        with np.load(workspace / "stained_and_masks.npz", allow_pickle=False) as both:
            assert both["masks"].shape == (200, 160)
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped" in rest, rest
