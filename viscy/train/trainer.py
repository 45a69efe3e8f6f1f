"""``viscy train``: Ray Train ``TorchTrainer`` running Lightning in every worker, fed by Ray Data.

Layout of a run (``<storage_path>/<run_name>/``): Ray's ``checkpoint_*/checkpoint.ckpt`` and snapshot,
``viscy_config.yaml`` + ``run_info.json`` (git commit, split, steps), ``figures/epoch_*.png``,
``tensorboard/`` or ``wandb/``, and after fit ``best_model.pt`` (plain state dict, keys without ``model.``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import subprocess
import warnings
from pathlib import Path
from typing import Any

from viscy.config import ConfigError, TrainConfig, save_config

BEST_MODEL = "best_model.pt"


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the code being run, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _is_uri(path: str) -> bool:
    return "://" in path


def run_paths(config: TrainConfig) -> tuple[str, str, Path]:
    """(run name, absolute storage path or URI, local directory for figures/logs/exports)."""
    tc = config.trainer
    name = tc.run_name
    if name is None:
        if tc.resume:
            raise ConfigError("trainer.resume needs trainer.run_name (the run to continue)")
        name = f"{config.model.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    storage = tc.storage_path if _is_uri(tc.storage_path) else str(Path(tc.storage_path).expanduser().resolve())
    local = Path(storage) / name if not _is_uri(storage) else Path("viscy_runs").resolve() / name
    return name, storage, local


def _uri_fs(storage: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of a storage URI, as Ray Train resolves it."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    return fs, root.rstrip("/")


def run_exists(storage: str, name: str) -> bool:
    """Whether ``<storage>/<name>`` holds a Ray Train run (its checkpoint-manager snapshot), local or URI."""
    marker = "checkpoint_manager_snapshot.json"
    if not _is_uri(storage):
        return (Path(storage) / name / marker).exists()
    import pyarrow.fs

    fs, root = _uri_fs(storage)
    return fs.get_file_info(f"{root}/{name}/{marker}").type != pyarrow.fs.FileType.NotFound


def upload_run_files(local: Path, storage: str, name: str, dirs: bool) -> None:
    """Copy the run directory's subdirectories (``dirs``) or top-level files to ``<storage>/<name>``.

    Rank 0 copies the directories it writes (figures, logs); the driver copies the files it writes (config,
    run info, best weights). Only for URI storage (a local ``storage_path`` is written in place).
    """
    if not _is_uri(storage) or not local.is_dir():
        return
    import pyarrow.fs

    fs, root = _uri_fs(storage)
    for entry in local.iterdir():
        if entry.is_dir() == dirs:
            dest = f"{root}/{name}/{entry.name}"
            if dirs:
                fs.create_dir(dest, recursive=True)
            pyarrow.fs.copy_files(str(entry), dest, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)


def _crash_callback(spec: str):
    import lightning.pytorch as pl

    marker, epoch = spec.rsplit(":", 1)

    class CrashOnce(pl.Callback):
        """Kill this worker process (SIGKILL) once, at the start of an epoch, on rank 1 (fault-tolerance tests)."""

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == int(epoch) and trainer.global_rank == 1 and not os.path.exists(marker):
                Path(marker).write_text("crashed")
                os.kill(os.getpid(), signal.SIGKILL)

    return CrashOnce()


def train_loop(loop_config: dict[str, Any]) -> None:
    """Worker function: build the module, loggers and Lightning trainer, then fit (resuming if Ray has a checkpoint)."""
    import lightning.pytorch as pl
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    from viscy.train.datasource import RayShardIterable
    from viscy.train.module import ThroughputCallback, VSModule, resolve_precision

    config = TrainConfig.model_validate(loop_config["config"])
    tc, run_dir, name = config.trainer, Path(loop_config["run_dir"]), loop_config["run_name"]
    pl.seed_everything(tc.seed, workers=True, verbose=False)
    module = VSModule(
        config.model.name,
        config.model.kwargs,
        config.data.source_channel,
        config.data.target_channel,
        tc.model_dump(mode="json"),
        model_checkpoint=str(config.model.checkpoint) if config.model.checkpoint else None,
        figure_dir=str(run_dir / "figures"),
    )
    if config.logging.wandb:
        from lightning.pytorch.loggers import WandbLogger

        os.environ["WANDB_DIR"] = str(run_dir)
        logger = WandbLogger(
            project=config.logging.project, name=config.logging.run_name or name, group=config.logging.group,
            save_dir=str(run_dir), offline=config.logging.offline, id=name.replace("/", "-"), resume="allow",
            config=loop_config["config"],
        )
    else:
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="")
    callbacks: list[pl.Callback] = [ThroughputCallback(), RayTrainReportCallback()]
    if loop_config.get("crash_once"):
        callbacks.append(_crash_callback(loop_config["crash_once"]))
    steps = loop_config["steps"]
    trainer = pl.Trainer(
        max_epochs=tc.max_epochs,
        accelerator="gpu" if tc.use_gpu else "cpu",
        devices="auto",
        strategy=RayDDPStrategy(find_unused_parameters=False),
        plugins=[RayLightningEnvironment()],
        precision=resolve_precision(tc.precision, tc.use_gpu),
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,  # a partial validation pass would desynchronise the streaming split
        log_every_n_steps=max(1, min(50, steps["train_steps"])),
    )
    trainer = prepare_trainer(trainer)
    bs = config.data.batch_size
    train_dl = RayShardIterable(ray.train.get_dataset_shard("train"), bs, shuffle_buffer=4 * bs)
    val_dl = RayShardIterable(ray.train.get_dataset_shard("val"), bs) if steps["val_steps"] else None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            ckpt = str(Path(ckpt_dir) / RayTrainReportCallback.CHECKPOINT_NAME)
            trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl, ckpt_path=ckpt)
    else:
        trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl)
    if ray.train.get_context().get_world_rank() == 0:  # figures and logs live on rank 0's node
        upload_run_files(run_dir, loop_config["storage"], name, dirs=True)


def export_best(result: Any, score: str, out_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """Write the best reported checkpoint's model weights as a plain state dict ``best_model.pt``."""
    import torch

    from viscy.models.checkpoint import strip_prefixes

    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if m and score in m]
    if not candidates:
        if result.checkpoint is None:
            return None
        candidates = [(result.checkpoint, result.metrics or {})]
    ckpt, metrics = min(candidates, key=lambda cm: cm[1].get(score, float("inf")))
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / "checkpoint.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BEST_MODEL
    torch.save(strip_prefixes(weights), path)
    return path, dict(metrics)


def run_train(config: TrainConfig, crash_once: str | None = None) -> dict[str, Any]:
    """Train with Ray Train on the local Ray cluster (or ``RAY_ADDRESS``); export the best weights.

    Returns
    -------
    dict
        ``run_dir``, ``best_model``, ``metrics`` (of the best checkpoint), ``epochs`` and ``result``.
    """
    import ray
    import ray.train
    from ray.data import DataContext
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from viscy.ray_utils import ensure_ray
    from viscy.train.datasource import build_datasets

    tc = config.trainer
    name, storage, run_dir = run_paths(config)
    run_location = f"{storage.rstrip('/')}/{name}"
    ray_dir_exists = run_exists(storage, name)
    if tc.resume and not ray_dir_exists:
        raise ConfigError(f"trainer.resume: no run to continue at {run_location}; check run_name/storage_path")
    if not tc.resume and ray_dir_exists:
        raise ConfigError(
            f"run {run_location} already exists; pass --trainer.resume true to continue it "
            "or choose another --trainer.run_name"
        )
    if tc.precision == "16-mixed" and not tc.use_gpu:
        warnings.warn("precision 16-mixed needs a GPU; workers will train in 32", stacklevel=2)

    ensure_ray()
    # On small nodes the per-operator reservation keeps Ray Data to about one read task at a time.
    DataContext.get_current().op_resource_reservation_enabled = False
    DataContext.get_current().enable_progress_bars = False
    train_ds, val_ds, split, steps = build_datasets(
        config.data, tc.num_workers, tc.reads_per_fov, tc.val_reads_per_fov, tc.train_steps_per_epoch,
        tc.val_steps, tc.seed,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir, "train")
    info = {"git_commit": git_commit(), "run_name": name, "storage_path": storage, "split": json.loads(split.to_json()),
            "steps_per_worker": steps, "started": _dt.datetime.now().isoformat()}
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
    score = "val_loss" if val_ds is not None else "train_loss"
    datasets = {"train": train_ds} | ({"val": val_ds} if val_ds is not None else {})
    resources = {"CPU": tc.cpus_per_worker} | ({"GPU": tc.gpus_per_worker} if tc.use_gpu else {})
    print(f"viscy train: run '{name}' -> {run_dir}")
    print(f"  train FOVs {len(split.train)}, val FOVs {len(split.val)}; per worker and epoch: "
          f"{steps['train_steps']} train / {steps['val_steps']} val batches of {config.data.batch_size}")
    print(f"  checkpoints: {storage}/{name}/checkpoint_*   figures: {run_dir / 'figures'}   "
          f"logs: {run_dir / ('wandb' if config.logging.wandb else 'tensorboard')}")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": json.loads(config.model_dump_json()), "run_dir": str(run_dir), "run_name": name,
            "steps": steps, "crash_once": crash_once, "storage": storage,
        },
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.num_to_keep, checkpoint_score_attribute=score, checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    exported = export_best(result, score, run_dir)
    summary: dict[str, Any] = {"run_dir": run_dir, "result": result, "best_model": None, "metrics": {}}
    summary["epochs"] = (result.metrics or {}).get("epoch", -1) + 1
    if exported is not None:
        summary["best_model"], summary["metrics"] = exported
        save_config(config, run_dir, "train")
    upload_run_files(run_dir, storage, name, dirs=False)
    m = summary["metrics"]
    print(f"viscy train: finished {summary['epochs']} epochs; best {score} {m.get(score, float('nan')):.4f} "
          f"(epoch {m.get('epoch', '?')})")
    channels = config.data.source_channel if tc.fcmae.pretraining else config.data.target_channel
    for ch in channels:
        if f"val_pearson_{ch}" in m:
            print(f"  validation Pearson {ch}: {m[f'val_pearson_{ch}']:.3f}")
    print(f"  best weights: {summary['best_model']}   figures: {run_dir / 'figures'}")
    if _is_uri(storage):
        print(f"  copied to {run_location}")
    return summary
