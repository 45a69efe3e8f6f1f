"""A Ray head node of a test's own (``ray start --head --block`` on loopback), stopped by signalling only it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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


@contextmanager
def ray_head(log_dir: Path, env: dict[str, str], num_cpus: int = 2) -> Iterator[Head]:
    """Start a head with ``env`` (e.g. its ``RAY_AUTH_MODE``); yield its addresses once it answers."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "ray-client-server-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")
    port, dash, *others = free_ports(2 + len(names))
    # Other Ray clusters on this host hold the default side ports (e.g. the job agent's 52365): pick free ones.
    side = [f"--{name}={p}" for name, p in zip(names, others, strict=True)]
    log = open(log_dir / "head.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats", *side],
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
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: leftovers of this head only
        except ProcessLookupError:
            pass
        log.close()
