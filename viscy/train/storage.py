"""Where a training run lives: its name, its storage (a directory or a URI) and the upload of its own files.

Ray Train writes checkpoints to ``<storage_path>/<run_name>``; viscy's own files (figures, logs, the config,
``run_info.json``, ``best_model.pt``) are written to a local directory, which is that same folder for local
storage and ``./viscy_runs/<run_name>`` (then uploaded) for a URI.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from viscy.train.config import TrainConfig


def is_uri(path: str) -> bool:
    """Whether a storage path is a URI (``s3://``, ``gs://``, ``file://``) rather than a local path."""
    return "://" in path


def run_paths(config: TrainConfig) -> tuple[str, str, Path]:
    """(run name, absolute storage path or URI, local directory for figures/logs/exports)."""
    tc = config.trainer
    name = tc.run_name
    if name is None:  # a resumed run has one (TrainConfig checks)
        from viscy.models.registry import model_label  # an import path's class name, not 'package.module:Class'

        name = f"{model_label(str(config.model.name))}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    return (name, *storage_location(tc.storage_path, name))


def storage_location(storage_path: str, name: str) -> tuple[str, Path]:
    """(absolute storage path or the URI, local directory of ``<storage>/<name>``'s own files).

    With a URI, figures, logs and exports are written under ``./viscy_runs/<name>`` and uploaded.
    """
    storage = storage_path if is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())
    local = Path(storage) / name if not is_uri(storage) else Path("viscy_runs").resolve() / name
    return storage, local


def uri_fs(storage: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of a storage URI, as Ray Train resolves it."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    return fs, root.rstrip("/")


def run_exists(storage: str, name: str) -> bool:
    """Whether ``<storage>/<name>`` holds a Ray Train run (its checkpoint-manager snapshot), local or URI."""
    marker = "checkpoint_manager_snapshot.json"
    if not is_uri(storage):
        return (Path(storage) / name / marker).exists()
    import pyarrow.fs

    fs, root = uri_fs(storage)
    return fs.get_file_info(f"{root}/{name}/{marker}").type != pyarrow.fs.FileType.NotFound


def upload_run_files(local: Path, storage: str, name: str, dirs: bool) -> None:
    """Copy the run directory's subdirectories (``dirs``) or top-level files to ``<storage>/<name>``.

    Rank 0 copies the directories it writes (figures, logs); the driver copies the files it writes (config,
    run info, best weights). Only for URI storage (a local ``storage_path`` is written in place).
    """
    if not is_uri(storage) or not local.is_dir():
        return
    import pyarrow.fs

    fs, root = uri_fs(storage)
    for entry in local.iterdir():
        if entry.is_dir() == dirs:
            dest = f"{root}/{name}/{entry.name}"
            if dirs:
                fs.create_dir(dest, recursive=True)
            pyarrow.fs.copy_files(
                str(entry), dest, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs
            )
