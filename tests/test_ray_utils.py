"""viscy.ray_utils: Ray's private names it relies on are still there; joining a cluster follows the cluster's auth
mode; a cluster of viscy's own stops cleanly and starts in the background."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from typing import Any

import pytest
import ray
from ray_head import ray_head

from viscy import ray_utils

CHECKED_ON = "2.60.0"  # the Ray version ray_utils' private names were checked on


# ------------------------------------------------------------------------------------ Ray's private names
def _require(ok: bool, what: str, function: str) -> None:
    """Fail naming the private Ray name that changed and the viscy.ray_utils function to update."""
    if not ok:
        pytest.fail(
            f"Ray {ray.__version__} changed {what}, which viscy.ray_utils.{function} relies on (checked on Ray "
            f"{CHECKED_ON}); update {function} for this Ray (its docstring lists what it uses)",
            pytrace=False,
        )


def _import(module: str, function: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        _require(False, f"the module {module} (gone)", function)


def _params(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


def test_worker_output_dispatcher_is_where_route_worker_output_expects_it() -> None:
    fn = "route_worker_output"
    logging_mod = _import("ray._private.ray_logging", fn)
    worker = _import("ray._private.worker", fn)
    dispatcher = getattr(logging_mod, "global_worker_stdstream_dispatcher", None)
    _require(dispatcher is not None, "ray._private.ray_logging.global_worker_stdstream_dispatcher (gone)", fn)
    _require(_params(dispatcher.add_handler) == ["name", "handler"], "the dispatcher's add_handler(name, handler)", fn)
    _require(_params(dispatcher.remove_handler) == ["name"], "the dispatcher's remove_handler(name)", fn)
    _require(_params(getattr(worker, "print_to_stdstream", None) or (lambda: None)) == ["data", "ignore_prefix"],
             "ray._private.worker.print_to_stdstream(data, ignore_prefix)", fn)
    source = inspect.getsource(worker)
    _require(f'"{ray_utils.RAY_CONSOLE_HANDLER}"' in source,
             f"the name of ray.init's console printer in the dispatcher ({ray_utils.RAY_CONSOLE_HANDLER!r})", fn)
    _require("print_to_stdstream(" in inspect.getsource(worker.listen_error_messages),
             "how the raylet's messages reach the driver (ray._private.worker.listen_error_messages)", fn)
    _require(worker.__name__ == ray_utils.RAY_WORKER_LOGGER and "SIGTERM handler is not set" in source,
             f"the logger {ray_utils.RAY_WORKER_LOGGER!r} and its 'SIGTERM handler is not set' warning",
             "start_ray_in_background")


def test_route_worker_output_hands_worker_and_raylet_lines_to_the_handler(monkeypatch) -> None:
    import ray._private.worker as worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # put back afterwards
    monkeypatch.setattr(dispatcher, "handlers", [(ray_utils.RAY_CONSOLE_HANDLER, lambda data: printed.append(data))])
    printed: list[dict] = []
    seen: list[dict] = []
    assert ray_utils.route_worker_output(seen.append, console=False)
    dispatcher.emit({"lines": ["from a worker"], "pid": 1})
    worker.print_to_stdstream({"lines": ["from the raylet"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert [b["lines"] for b in seen] == [["from a worker"], ["from the raylet"]] and printed == []

    seen.clear()
    monkeypatch.setattr(dispatcher, "handlers", [(ray_utils.RAY_CONSOLE_HANDLER, lambda data: printed.append(data))])
    assert ray_utils.route_worker_output(seen.append, console=True)  # --verbose: the console keeps them too
    dispatcher.emit({"lines": ["again"], "pid": 1})
    assert [b["lines"] for b in seen] == [["again"]] and [b["lines"] for b in printed] == [["again"]]


def test_train_controller_env_vars_are_what_ray_train_gives_its_controller() -> None:
    fn = "train_controller_env_vars"
    _import("ray._common.constants", fn)
    constants = _import("ray.train.v2._internal.constants", fn)
    for name in ("get_env_vars_to_propagate", "DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE"):
        _require(hasattr(constants, name), f"ray.train.v2._internal.constants.{name} (gone)", fn)
    _require(_params(constants.get_env_vars_to_propagate) == [], "get_env_vars_to_propagate() (now takes arguments)",
             fn)
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    source = inspect.getsource(DataParallelTrainer._initialize_and_run_controller)
    _require("get_env_vars_to_propagate()" in source and '"env_vars": env_vars' in source,
             "the runtime env of Ray Train's controller (DataParallelTrainer._initialize_and_run_controller)", fn)
    env_vars = ray_utils.train_controller_env_vars()
    assert env_vars is not None and env_vars.get("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC") == "0"


def test_autoscaler_monitor_is_where_stop_autoscaler_monitor_expects_it() -> None:
    fn = "stop_autoscaler_monitor"
    worker = _import("ray._private.worker", fn)
    constants = _import("ray._private.ray_constants", fn)
    node = _import("ray._private.node", fn)
    _require(hasattr(worker, "_global_node"), "ray._private.worker._global_node (gone)", fn)
    _require(getattr(constants, "PROCESS_TYPE_MONITOR", None) == "monitor",
             "ray._private.ray_constants.PROCESS_TYPE_MONITOR", fn)
    _require("self.all_processes" in inspect.getsource(node.Node.__init__), "Node.all_processes (gone)", fn)
    ray_utils.stop_autoscaler_monitor()  # without a cluster of this process: nothing to stop


# ------------------------------------------------------------------------------------ ports
def test_free_port_is_kept_from_the_os_choices_yet_binds_with_reuse_address() -> None:
    """The dashboard port viscy picks is not handed to processes asking the OS for any port (a race seen in CI:
    a port found free was taken before Ray's dashboard bound it), and a SO_REUSEADDR server can listen on it."""
    import socket

    port = ray_utils.free_port()
    others = [socket.socket() for _ in range(800)]
    try:
        for sock in others:
            sock.bind(("127.0.0.1", 0))
        assert port not in {sock.getsockname()[1] for sock in others}
    finally:
        for sock in others:
            sock.close()
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(1)


# ------------------------------------------------------------------------------------ clusters
JOIN = "from viscy.ray_utils import ensure_ray; ensure_ray(); import ray; print(int(ray.cluster_resources()['CPU']))"


@pytest.mark.slow
def test_joining_a_cluster_without_token_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    home = tmp_path / "home"  # a client machine that never ran Ray: no ~/.ray/auth_token
    home.mkdir()
    with ray_head(tmp_path, env | {"RAY_AUTH_MODE": "disabled"}, num_cpus=1) as head:
        client = env | {"RAY_ADDRESS": head.gcs_address, "HOME": str(home)}
        joined = subprocess.run([sys.executable, "-c", JOIN], env=client, capture_output=True, text=True, timeout=180)
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert joined.stdout.strip().splitlines()[-1] == "1"
        assert "RAY_AUTH_MODE" not in client
        # what viscy used to do, imposing token auth on every client, fails here
        forced = subprocess.run([sys.executable, "-c", JOIN], env=client | {"RAY_AUTH_MODE": "token"},
                                capture_output=True, text=True, timeout=180)
        assert forced.returncode != 0


STOP = """
import atexit, time
import psutil
from viscy.ray_utils import ensure_ray, stop_autoscaler_monitor
ensure_ray(num_cpus=1)
import ray
processes = ray._private.worker._global_node.all_processes
monitor, gcs = processes["monitor"][0].process, processes["gcs_server"][0].process
time.sleep(2)
idle = [p for p in psutil.Process().children(recursive=True) if "IDLE" in p.name()]
stop_autoscaler_monitor()
print("monitor", monitor.poll() is not None, "gcs", gcs.poll() is None, "idle", len(idle))
atexit._run_exitfuncs()
left = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
print("left", len(left))
"""


@pytest.mark.slow
def test_own_cluster_stops_its_autoscaler_monitor_first_and_prestarts_no_idle_workers():
    """The monitor goes before the GCS (Ray's order would leave it hanging on the gone GCS until killed), and
    the cluster starts no idle workers that this job's runtime env could never use."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", STOP], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "monitor True gcs True idle 0" in lines, done.stdout
    assert lines[-1] == "left 0", done.stdout
    assert "autoscaler failed" not in done.stdout + done.stderr


EARLY = """
import atexit, signal, sys, threading
import psutil
from viscy.cli import main
args = ["train", "--data.data_path", "x.zarr", "--model.name", "unet2d", "--data.yx_patch_size", "96", "96"]
print("bad key", main(args + ["--trainer.bogus", "1"]), "ray imported", "ray" in sys.modules)
print("misfit model", main(args + ["--model.kwargs.num_blocks", "6"]))
import ray
started = [t for t in threading.enumerate() if t.name == "viscy-ray-start"]
print("ray started", ray.is_initialized(), "thread", len(started), "sigterm", signal.getsignal(signal.SIGTERM) not in (
    signal.SIG_DFL, None))
atexit._run_exitfuncs()
left = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
print("left", len(left))
"""


@pytest.mark.slow
def test_train_starts_ray_during_the_model_check_only_for_a_config_with_valid_keys():
    """A key error is named without starting Ray; once the keys are valid, Ray starts in the background while
    the model check imports torch, and a command that fails that check still shuts the cluster down."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", EARLY], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "bad key 2 ray imported False" in lines, done.stdout
    assert "misfit model 2" in lines, done.stdout  # a configuration error (exit 2), found by the stage's model check
    assert "ray started True thread 1 sigterm True" in lines, done.stdout
    assert lines[-1] == "left 0", done.stdout
    assert "unknown key 'trainer.bogus'" in done.stderr and "not a multiple of the model's YX multiple" in done.stderr
    assert "SIGTERM handler is not set" not in done.stderr
