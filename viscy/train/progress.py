"""The console of a training run: a progress bar over epochs and one line per epoch, fed by Ray Train's reports.

Every worker reports each epoch's metrics with its checkpoint (``RayTrainReportCallback``). Once all have, Ray
Train calls its ``UserCallback`` s' ``after_report`` in the run's controller, another process. The callback of
:class:`EpochConsole` puts rank 0's metrics on a ``ray.util.queue.Queue``; a thread of the driver takes them
off and prints them. A restarted or resumed worker group can report an epoch again (a tune trial replays the
epochs it restored): each epoch is printed once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)
_END = "end"  # put by the driver after the run: everything before it has been printed


class EpochPrinter:
    """A progress bar over epochs and one line per epoch (losses, validation Pearson, samples/s, ETA)."""

    def __init__(self, max_epochs: int, channels: list[str]) -> None:
        from tqdm.auto import tqdm

        self.max_epochs, self.channels = max_epochs, channels
        self.bar = tqdm(total=max_epochs, desc="train", unit="epoch", dynamic_ncols=True)
        self.started: float | None = None
        self.first_epoch: int | None = None
        self.last_epoch: int | None = None

    def __call__(self, metrics: dict[str, Any]) -> None:
        """Print the epoch of a report (``metrics`` as Ray Train's report callback sends it, with ``epoch``)."""
        m, epoch = metrics, int(metrics["epoch"])
        if self.last_epoch is not None and epoch <= self.last_epoch:
            return  # reported again by a restarted or resumed worker group
        self.last_epoch = epoch
        now = time.monotonic()
        if self.first_epoch is None:
            self.first_epoch, self.started = epoch, now
            self.bar.n = epoch
        done = epoch + 1 - self.first_epoch
        eta = ""
        if done > 1:
            per = (now - self.started) / (done - 1)
            eta = f"  ETA {_duration(per * (self.max_epochs - epoch - 1))}"
        parts = [f"epoch {epoch + 1}/{self.max_epochs}", f"train_loss {m.get('train_loss', float('nan')):.4f}"]
        if "val_loss" in m:
            parts.append(f"val_loss {m['val_loss']:.4f}")
        pearson = [f"{c} {m[f'val_pearson_{c}']:.3f}" for c in self.channels if f"val_pearson_{c}" in m]
        if pearson:
            parts.append("val Pearson " + " ".join(pearson))
        ap50 = [f"{c} {m[f'val_ap50_{c}']:.3f}" for c in self.channels if f"val_ap50_{c}" in m]
        if ap50:
            parts.append("val AP50 " + " ".join(ap50))
        if "train_samples_per_s" in m:
            parts.append(f"{m['train_samples_per_s']:.1f} samples/s")
        self.bar.write("  ".join(parts) + eta)
        self.bar.update(epoch + 1 - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class EpochConsole:
    """Print a Ray Train run's epochs on this (the driver's) console as they are reported.

    Pass :meth:`callback` in the run's ``RunConfig(callbacks=...)`` and call :meth:`close` once ``fit`` returned
    (or failed). Needs Ray to be up: the queue is a small actor (no CPU reserved).
    """

    def __init__(self, printer: EpochPrinter) -> None:
        from ray.util.queue import Queue

        self.printer = printer
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.thread = threading.Thread(target=self._print_reports, name="viscy-epoch-console", daemon=True)
        self.thread.start()

    def callback(self) -> Any:
        """The Ray Train ``UserCallback`` that sends rank 0's report of each epoch here."""
        return _report_relay(self.queue)

    def _print_reports(self) -> None:
        while True:
            try:
                metrics = self.queue.get()
            except Exception:  # noqa: BLE001  (the queue's actor is gone: Ray shut down)
                log.warning("the epoch console stopped", exc_info=True)
                return
            if metrics == _END:
                return
            try:
                self.printer(metrics)
            except Exception:  # noqa: BLE001  (a malformed report must not stop the console)
                log.warning("cannot print the report %r", metrics, exc_info=True)

    def close(self) -> None:
        """Print what is still queued, then stop the thread, the queue and the progress bar."""
        try:
            self.queue.put(_END)
            self.thread.join(timeout=30)
            self.queue.shutdown(force=True)
        except Exception:  # noqa: BLE001  (Ray shut down first: nothing is left to print)
            log.warning("the epoch console did not close cleanly", exc_info=True)
        self.printer.close()


def _report_relay(queue: Any) -> Any:
    """A Ray Train ``UserCallback`` (run in the controller) putting rank 0's metrics of each report on ``queue``.

    The class is built here, not at import, so that importing this module does not import Ray Train.
    """
    from ray.train import UserCallback

    class ReportRelay(UserCallback):
        def __init__(self, queue: Any) -> None:
            self.queue = queue

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if not metrics or "epoch" not in metrics[0]:
                return
            try:
                self.queue.put_nowait(dict(metrics[0]))
            except Exception:  # noqa: BLE001  (the driver's console is best effort; training goes on)
                logging.getLogger(__name__).warning("cannot send the epoch to the driver", exc_info=True)

    return ReportRelay(queue)
