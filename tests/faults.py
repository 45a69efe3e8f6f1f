"""Fault injection for tests: named patches of viscy's own functions, in the driver and in every Ray worker.

viscy carries no hooks for tests; a fault replaces, in the process that runs it, the viscy function at the point
where the test wants the job cut short or slowed down.

``slow_predict_units``
    Sleep 4 s after every prediction work unit (in the predict actors), so a test can kill the job between FOVs.
``crash_at_swap``
    Raise :class:`InjectedFault` between moving the old store aside and moving its replacement into place
    (``viscy predict`` and ``viscy synth``, in the driver).
``crash_synth_at_position2`` / ``kill_synth_at_position2``
    Raise / SIGKILL the process when ``viscy synth`` starts its third position (two are written).
``fail_rank0_at_epoch1``
    Raise in rank 0 at the start of epoch 1 (a bug in a worker, not a lost node).
``slow_epochs``
    Sleep 3 s at the start of every training epoch; rank 0 notes each epoch it starts in
    ``<run_dir>/test_epoch_starts.txt``.

In a test's own process, :func:`inject` applies faults with pytest's ``monkeypatch`` (undone after the test).
Training faults replace the worker function that ``run_train`` hands to Ray Train, so they reach its workers
from the driver. A viscy command run as ``python -m tests.faults FAULT[,FAULT...] -- <viscy arguments>``
applies the faults in its own process and, through Ray's public ``worker_process_setup_hook`` (added to the
runtime env of the ``ray.init`` that viscy calls), in every Ray worker of its job (tune trials, predict actors).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

EPOCH_STARTS = "test_epoch_starts.txt"
SetAttr = Callable[[Any, str, Any], None]


class InjectedFault(RuntimeError):
    """Raised by a fault to cut a job short at a chosen point."""


# ------------------------------------------------------------------------------------------ prediction
def _slow_predict_units(setattr_: SetAttr) -> None:
    import viscy.predict.run as predict_run

    real = _unwrapped(predict_run.predict_unit)

    @functools.wraps(real)
    def slow_unit(*args: Any, **kwargs: Any) -> Any:
        prediction = real(*args, **kwargs)
        time.sleep(4)
        return prediction  # the segmentation stage receives it

    setattr_(predict_run, "predict_unit", slow_unit)


# ------------------------------------------------------------------------------------------ stores
def _crash_at_swap(setattr_: SetAttr) -> None:
    from viscy.data.replace import PARTIAL

    real = _unwrapped(os.replace)

    @functools.wraps(real)
    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        src, dst = os.fspath(src), os.fspath(dst)
        # the second rename of a swap: the complete replacement <path>.viscy-partial moved to <path>
        if src.endswith(PARTIAL) and dst == src[: -len(PARTIAL)]:
            raise InjectedFault(f"crash before moving {src} into place")
        real(src, dst, *args, **kwargs)

    setattr_(os, "replace", replace)


def _at_synth_position(index: int, action: Callable[[], None]) -> Callable[[SetAttr], None]:
    def fault(setattr_: SetAttr) -> None:
        import viscy.data.synth as synth

        real = _unwrapped(synth.synthesize_position)

        @functools.wraps(real)
        def position(config: Any, i: int) -> Any:
            if i == index:
                action()
            return real(config, i)

        setattr_(synth, "synthesize_position", position)

    return fault


def _raise_simulated_crash() -> None:
    raise InjectedFault("simulated crash")


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------ training
def _fail_rank0_at_epoch1(epoch: int, rank: int, run_dir: Path | None) -> None:
    if epoch == 1 and rank == 0:
        raise InjectedFault("simulated bug in the training step")


def _slow_epochs(epoch: int, rank: int, run_dir: Path | None) -> None:
    if rank == 0 and run_dir is not None:
        with open(run_dir / EPOCH_STARTS, "a") as f:
            f.write(f"{epoch}\n")
    time.sleep(3)


EpochFault = Callable[[int, int, "Path | None"], None]


def _at_epoch_start(fault: EpochFault) -> Callable[[SetAttr], None]:
    """A fault run at the start of every training epoch, in every Ray Train worker.

    In the process that builds the ``TorchTrainer``, ``viscy.train.trainer.train_loop`` is replaced by a loop
    that, in each worker, first wraps the LightningModule's ``on_train_epoch_start`` hook.
    """

    def install(setattr_: SetAttr) -> None:
        import viscy.train.trainer as trainer

        real = _unwrapped(trainer.train_loop)

        def train_loop_with_fault(loop_config: dict[str, Any]) -> None:
            _wrap_epoch_start(fault)
            return _unwrapped(real)(loop_config)

        train_loop_with_fault.__wrapped__ = real
        setattr_(trainer, "train_loop", train_loop_with_fault)

    return install


def _wrap_epoch_start(fault: EpochFault) -> None:
    """In a Ray Train worker: run ``fault(epoch, rank, run_dir)`` at the start of every epoch."""
    from viscy.train.module import VSModule

    real = VSModule.on_train_epoch_start
    if getattr(real, "__wrapped__", None) is not None:  # a restarted worker group in the same process
        real = real.__wrapped__

    @functools.wraps(real)
    def on_train_epoch_start(self: Any) -> None:
        run_dir = Path(self.figure_dir).parent if self.figure_dir else None
        fault(self.trainer.current_epoch, self.trainer.global_rank, run_dir)
        real(self)

    VSModule.on_train_epoch_start = on_train_epoch_start


# ------------------------------------------------------------------------------------------ the faults
FAULTS: dict[str, Callable[[SetAttr], None]] = {
    "slow_predict_units": _slow_predict_units,
    "crash_at_swap": _crash_at_swap,
    "crash_synth_at_position2": _at_synth_position(2, _raise_simulated_crash),
    "kill_synth_at_position2": _at_synth_position(2, _sigkill_self),
    "fail_rank0_at_epoch1": _at_epoch_start(_fail_rank0_at_epoch1),
    "slow_epochs": _at_epoch_start(_slow_epochs),
}


def _unwrapped(func: Any) -> Any:
    """The function under any fault wrappers (a fault applied twice in one process wraps the real one once)."""
    while getattr(func, "__wrapped__", None) is not None:
        func = func.__wrapped__
    return func


def _check(names: Iterable[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(unknown)}; choose from: {', '.join(FAULTS)}")
    return names


def inject(monkeypatch: Any, *names: str) -> None:
    """Apply faults in this process with pytest's ``monkeypatch`` (undone when the test ends)."""
    for name in _check(names):
        FAULTS[name](monkeypatch.setattr)


def install(names: Iterable[str]) -> None:
    """Apply faults in this process for good (a command run through :func:`main`, a Ray worker)."""
    for name in _check(names):
        FAULTS[name](setattr)


def _worker_setup(names: list[str]) -> Callable[[], None]:
    def install_test_faults() -> None:
        install(names)

    return install_test_faults


def _install_in_ray_workers(names: list[str]) -> None:
    """Make the ``ray.init`` that viscy calls add a ``worker_process_setup_hook`` installing ``names``."""
    import ray

    init = ray.init

    @functools.wraps(init)
    def init_with_faults(*args: Any, **kwargs: Any) -> Any:
        runtime_env = dict(kwargs.get("runtime_env") or {})
        runtime_env["worker_process_setup_hook"] = _worker_setup(names)
        return init(*args, **{**kwargs, "runtime_env": runtime_env})

    ray.init = init_with_faults


def main(argv: list[str]) -> int:
    """``python -m tests.faults FAULT[,FAULT...] -- <viscy arguments>``: run viscy with these faults."""
    if len(argv) < 2 or argv[1] != "--":
        print(f"usage: python -m tests.faults FAULT[,FAULT...] -- <viscy arguments>; faults: {', '.join(FAULTS)}",
              file=sys.stderr)
        return 2
    names = _check(argv[0].split(","))
    install(names)
    _install_in_ray_workers(names)
    from viscy.cli import main as viscy_main

    return viscy_main(argv[2:])


if __name__ == "__main__":
    from tests.faults import main as faults_main  # the importable module, which Ray workers import too

    raise SystemExit(faults_main(sys.argv[1:]))
