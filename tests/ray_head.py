"""A Ray head node of a test's own (``ray start --head --block`` on loopback), stopped by signalling only it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open while choosing, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class Head:
    gcs_address: str  # for RAY_ADDRESS / ray.init
    dashboard: str  # for ray job submit


NODE_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
              "runtime-env-agent-port", "node-manager-port", "object-manager-port")


def _side_ports(names: tuple[str, ...]) -> list[str]:
    # Other Ray clusters on this host hold the default side ports (e.g. the job agent's 52365): pick free ones.
    return [f"--{name}={p}" for name, p in zip(names, free_ports(len(names)), strict=True)]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` process and everything it started (its own session, nothing else)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    kill_session(proc)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the session ``proc`` leads: a node and its workers, as when a machine dies."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def ray_head(
    log_dir: Path,
    env: dict[str, str],
    num_cpus: int = 2,
    resources: dict[str, float] | None = None,
    temp_dir: Path | None = None,
) -> Iterator[Head]:
    """Start a head with ``env`` (e.g. its ``RAY_AUTH_MODE``); yield its addresses once it answers.

    ``resources`` (custom resources) and ``temp_dir`` (a short path: it holds Unix sockets) tell it apart from
    other nodes on this machine. Without ``temp_dir`` the head gets a private one, removed when it stops: in the
    shared ``/tmp/ray``, ``ray_current_cluster`` names whichever cluster on this machine started last, and the job
    agent gives a submitted job's driver that address (``ray job submit`` then joined another test's cluster).
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    port, dash = free_ports(2)
    # Workers find the state API here (as docs/clusters sets it): without it, with another cluster on this
    # machine, Ray Train's placement-group cleaner asks that one, finds no controller and ends a live run.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
    side = _side_ports((*NODE_PORTS, "ray-client-server-port"))
    extra = [f"--resources={json.dumps(resources)}"] if resources else []
    private_temp = None if temp_dir else Path(tempfile.mkdtemp(prefix="ray_h_"))  # short: it holds Unix sockets
    extra += [f"--temp-dir={temp_dir or private_temp}"]
    log = open(log_dir / "head.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--disable-usage-stats", *extra, *side],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    head = Head(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            ok = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head.dashboard], env=env,
                                capture_output=True, timeout=60).returncode == 0
            if ok:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited early; see {log_dir / 'head.log'}")
            time.sleep(3)
        else:
            raise RuntimeError("the Ray head did not come up within 180 s")
        yield head
    finally:
        _stop(proc)
        log.close()
        if private_temp is not None:
            shutil.rmtree(private_temp, ignore_errors=True)


def start_node(
    head: Head, log: Path, env: dict[str, str], num_cpus: int, resources: dict[str, float], temp_dir: Path
) -> subprocess.Popen:
    """Join a second node to ``head`` (``ray start --address --block`` in its own session); return its process.

    Its ``resources`` and its own ``temp_dir`` (sessions, sockets, unpacked job files) tell it apart. Wait with
    :func:`wait_for_nodes`; stop it with :func:`kill_session` (a lost node) or :func:`stop_node`.
    """
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", f"--address={head.gcs_address}", "--node-ip-address=127.0.0.1",
         f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats",
         *_side_ports(NODE_PORTS)],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,  # noqa: SIM115
    )


def stop_node(proc: subprocess.Popen) -> None:
    """Stop a node started by :func:`start_node` and all its processes."""
    _stop(proc)


def wait_for_nodes(head: Head, env: dict[str, str], resource: str, timeout: float = 180) -> None:
    """Wait until a live node of the cluster offers the custom ``resource``."""
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "sys.exit(0 if ray.cluster_resources().get(sys.argv[2]) else 1)"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run([sys.executable, "-c", probe, head.gcs_address, resource], env=env,
                              capture_output=True, timeout=120)
        if done.returncode == 0:
            return
        time.sleep(2)
    raise RuntimeError(f"no node with resource {resource} joined within {timeout:.0f} s")
