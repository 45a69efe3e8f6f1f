"""A quiet console: progress and summaries on screen, Ray/Ray Data/Lightning internals in a log file.

:func:`start_log` (called by the CLI for every verb) sends Python logging and third-party warnings to a log
file; the console keeps viscy's own output and warnings. What Ray workers print (Lightning tips, Ray Train
controller messages, tracebacks) goes to the same file instead of the console (:func:`log_worker_lines`, which
:func:`viscy.ray_utils.ensure_ray` hands to Ray once it is up). Progress reaches the console through Ray's own
channels (a training run's epochs: :mod:`viscy.train.progress`). With ``--verbose`` (or ``VISCY_VERBOSE=1``)
everything also goes to the console, as Ray prints it.

A stage writes its log next to its output by calling :func:`place_log` once the output directory exists. Until
then the log is a private file in the temporary directory: created exclusively under a name no one can predict,
mode 0600, so another user can neither read it nor plant a link where it will be written.
"""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, TextIO

VERBOSE_ENV = "VISCY_VERBOSE"
LOG_NAME = "viscy.log"

_state: dict[str, Any] = {"path": None, "handler": None, "placed": False, "verb": "viscy"}
_lock = threading.Lock()
_VISCY_DIR = str(Path(__file__).resolve().parent)


def verbose() -> bool:
    """Whether internals are shown on the console (``--verbose`` / ``VISCY_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def log_path() -> Path | None:
    """The current log file, if :func:`start_log` ran in this process."""
    return _state["path"]


def start_log(verb: str, is_verbose: bool = False) -> Path:
    """Send logging and non-viscy warnings of this process to a fresh log file; return its path.

    The file starts in the temporary directory as ``viscy-<verb>-<time>-<pid>-<random>.log``, readable by the
    user only (mode 0600) and created exclusively (never through a link); :func:`place_log` moves it next to the
    stage's output.
    """
    if is_verbose:
        os.environ[VERBOSE_ENV] = "1"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    fd, name = tempfile.mkstemp(prefix=f"viscy-{verb}-{stamp}-{os.getpid()}-", suffix=".log")
    path = Path(name)
    _state.update(verb=verb, placed=False)
    _open(path, os.fdopen(fd, "a", encoding="utf-8"))
    logging.getLogger().setLevel(logging.INFO)
    quiet_loggers()
    warnings.showwarning = _show_warning
    logging.getLogger("viscy").info("viscy %s started: %s", verb, " ".join(sys.argv))
    return path


_QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "lightning", "lightning.pytorch")


def quiet_loggers() -> None:
    """Route third-party loggers to the log file instead of the console (unless verbose).

    Called again after Ray (and Ray Data) are imported, because they install their own console handlers.
    """
    if _state["path"] is None or verbose():
        return
    for name in _QUIET_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.propagate = True


def _open(path: Path, stream: TextIO) -> None:
    """Log to ``stream``, open on the file at ``path`` (the caller opens it: exclusively, or not via a link)."""
    root = logging.getLogger()
    old = _state["handler"]
    if old is not None:
        root.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
    handler.setStream(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    _state.update(path=path, handler=handler)


def place_log(directory: str | Path, name: str | None = None) -> Path | None:
    """Move the log file into ``directory`` (once per process: the first stage to call it owns the log).

    A resumed run appends to its log there; a new log gets the user's usual permissions (umask), like the
    results beside it. A log path that is a symbolic link or not a regular file is not written: the log then
    stays where it is, with a warning.
    """
    with _lock:
        current = _state["path"]
        if current is None or _state["placed"]:
            return current
        target = Path(directory) / (name or f"viscy_{_state['verb']}.log")
        target.parent.mkdir(parents=True, exist_ok=True)
        _state["handler"].flush()
        try:
            out = _open_regular_for_append(target)
        except OSError as exc:
            warnings.warn(f"the log stays at {current}: cannot write {target} ({exc.strerror})", stacklevel=2)
            return current
        with open(current, encoding="utf-8") as src:
            shutil.copyfileobj(src, out)
        out.flush()
        _open(target, out)
        current.unlink(missing_ok=True)
        _state["placed"] = True
        return target


def _open_regular_for_append(path: Path) -> TextIO:
    """``path`` opened for appending (created if absent), never through a symbolic link and only if a regular file.

    Raises
    ------
    OSError
        If ``path`` is a link (``ELOOP``), a FIFO without a reader, or not a regular file.
    """
    # O_NONBLOCK: opening a FIFO planted at the path must fail, not hang (it is a no-op for regular files)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """viscy's own warnings go to the console (they name a fix); everyone else's to the log file."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    if str(filename).startswith(_VISCY_DIR) or verbose():
        print(f"warning: {message}", file=sys.stderr)
    logging.getLogger("py.warnings").warning(text.rstrip())


# --------------------------------------------------------------------------------------- Ray workers
def log_worker_lines(batch: dict[str, Any]) -> None:
    """Write a batch of lines that Ray workers printed (as Ray relays them to the driver) to the log file."""
    # Not under "ray.": Ray sets that logger to WARNING, which would drop these INFO records.
    log = logging.getLogger("viscy.workers")
    who = batch.get("actor_name") or batch.get("task_name") or "worker"
    for line in batch.get("lines", []):
        log.info("(%s pid=%s) %s", who, batch.get("pid"), line)


def failure_message(exc: BaseException) -> str:
    """One line naming the root cause of an error raised in (or relayed from) Ray workers."""
    causes: list[BaseException] = []
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, first = sorted(failures.items())[0]
        where = f"worker rank {rank}: "
        causes.append(first)
    else:
        where = ""
        causes.append(exc)
    root = causes[0]
    seen = set()
    while id(root) not in seen:
        seen.add(id(root))
        nxt = getattr(root, "cause", None) or root.__cause__
        if nxt is None or not isinstance(nxt, BaseException):
            break
        root = nxt
    text = str(root).strip()
    # RayTaskError strings carry the remote traceback; its last line is the exception itself.
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and "Traceback" in text:
        text = lines[-1].strip()
    elif lines:
        text = lines[0].strip()
    name = type(root).__name__
    if name.startswith("RayTaskError(") and name.endswith(")"):
        name = name[len("RayTaskError(") : -1]
    return f"{where}{text if text.startswith(name) else f'{name}: {text}'}"
