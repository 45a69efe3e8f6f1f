"""``viscy train``: Ray Train ``TorchTrainer`` running Lightning in every worker, fed by Ray Data.

Layout of a run (``<storage_path>/<run_name>/``): Ray's ``checkpoint_*/checkpoint.ckpt`` and snapshot,
``viscy_config.yaml`` + ``run_info.json`` (git commit, split, steps), ``figures/epoch_*.png``,
``tensorboard/`` or ``wandb/``, and after fit ``best_model.pt`` (plain state dict, keys without ``model.``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from viscy.config import ConfigError, TrainConfig, save_config
from viscy.errors import ViscyError
from viscy.models.card import ModelCard

BEST_MODEL = "best_model.pt"
HEALTH_CHECK_INTERVAL_S = "0.5"
MAX_WARM_READ_WORKERS = 8
RUN_INFO = "run_info.json"


class TrainingError(ViscyError):
    """Training failed inside the Ray workers; the message names the root cause."""


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the code being run, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def is_uri(path: str) -> bool:
    """Whether a storage path is a URI (``s3://``, ``gs://``, ``file://``) rather than a local path."""
    return "://" in path


def run_paths(config: TrainConfig) -> tuple[str, str, Path]:
    """(run name, absolute storage path or URI, local directory for figures/logs/exports)."""
    tc = config.trainer
    name = tc.run_name
    if name is None:  # a resumed run has one (TrainConfig checks)
        name = f"{config.model.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    return (name, *storage_location(tc.storage_path, name))


def storage_location(storage_path: str, name: str) -> tuple[str, Path]:
    """(absolute storage path or the URI, local directory of ``<storage>/<name>``'s own files).

    With a URI, figures, logs and exports are written under ``./viscy_runs/<name>`` and uploaded.
    """
    storage = storage_path if is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())
    local = Path(storage) / name if not is_uri(storage) else Path("viscy_runs").resolve() / name
    return storage, local


def _uri_fs(storage: str) -> tuple[Any, str]:
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

    fs, root = _uri_fs(storage)
    return fs.get_file_info(f"{root}/{name}/{marker}").type != pyarrow.fs.FileType.NotFound


def upload_run_files(local: Path, storage: str, name: str, dirs: bool) -> None:
    """Copy the run directory's subdirectories (``dirs``) or top-level files to ``<storage>/<name>``.

    Rank 0 copies the directories it writes (figures, logs); the driver copies the files it writes (config,
    run info, best weights). Only for URI storage (a local ``storage_path`` is written in place).
    """
    if not is_uri(storage) or not local.is_dir():
        return
    import pyarrow.fs

    fs, root = _uri_fs(storage)
    for entry in local.iterdir():
        if entry.is_dir() == dirs:
            dest = f"{root}/{name}/{entry.name}"
            if dirs:
                fs.create_dir(dest, recursive=True)
            pyarrow.fs.copy_files(
                str(entry), dest, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs
            )


def _epoch_metrics(trainer: Any) -> dict[str, float]:
    """The epoch's scalar metrics as Lightning holds them (what Ray Train's report callback sends)."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _epoch_callbacks():
    import lightning.pytorch as pl

    from viscy.console import emit_event
    from viscy.testing import hook

    class EpochEvents(pl.Callback):
        """Tell the driver's console about each epoch (rank 0), and run the test hook at each epoch start."""

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            hook(
                "train.epoch_start",
                epoch=trainer.current_epoch,
                rank=trainer.global_rank,
                run_dir=str(pl_module.figure_dir.parent) if pl_module.figure_dir else "",
            )

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.global_rank == 0:
                metrics = _epoch_metrics(trainer)
                emit_event("train_epoch", epoch=trainer.current_epoch, max_epochs=trainer.max_epochs, metrics=metrics)

    return EpochEvents()


def _next_pass_callback(train_data: Any):
    """Start the next epoch's training stream when this epoch's batches are done (before validation).

    Each epoch re-executes the Ray Data pipeline; starting it during validation takes its start (coordinator
    round trips, the first read) off the next epoch's critical path. Not after the last epoch.
    """
    import lightning.pytorch as pl

    class NextPass(pl.Callback):
        def _start(self, trainer) -> None:
            if trainer.current_epoch + 1 < trainer.max_epochs and not trainer.should_stop:
                train_data.start_next_pass()

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self._start(trainer)

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # runs without validation too
            self._start(trainer)

    return NextPass()


TIMINGS = "timings/rank0.json"  # a folder: rank 0 uploads folders to URI storage


def _phase_timers(path: Path, loop_started: float) -> tuple[Any, Any]:
    """Two callbacks that time rank 0's phases into ``path`` (``timings/rank0.json``): one before Ray's report
    callback and one after it, so the checkpoint save and report are measured on their own.

    ``fit_started`` / ``train_started``: Lightning's fit and train starts (between them the first batch
    arrives: Lightning fetches it before the first epoch starts). Per epoch: ``data_start_s`` (epoch start to
    the first batch: the dataset execution starting), ``train_s`` (the epoch's steps after the first),
    ``steps``, ``val_s`` (the validation loop, figures included), ``report_s`` (checkpoint save, report and
    barrier) and ``epoch_s``. Wall-clock stamps (``time.time``) compare with the driver's.
    """
    import lightning.pytorch as pl

    state: dict[str, Any] = {"loop_started": loop_started, "epochs": []}

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)

    class Before(pl.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            state["fit_started"] = time.time()

        def on_train_start(self, trainer, pl_module) -> None:
            state["train_started"] = time.time()

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.epoch = {"epoch": trainer.current_epoch, "started": time.time(), "steps": 0}
            state["epochs"].append(self.epoch)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            now = time.time()
            if batch_idx == 0:
                self.epoch["data_start_s"] = now - self.epoch["started"]
            elif batch_idx == 1:
                self.steady_from = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.epoch["steps"] = batch_idx + 1
            if batch_idx >= 1:
                self.epoch["train_s"] = time.time() - self.steady_from

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            self.val_started = time.time()

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            self.epoch["val_s"] = time.time() - self.val_started

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.epoch["report_started"] = time.time()

    before = Before()

    class After(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            now = time.time()
            before.epoch["report_s"] = now - before.epoch.pop("report_started")
            before.epoch["epoch_s"] = now - before.epoch["started"]
            save()

        def on_fit_end(self, trainer, pl_module) -> None:
            state["fit_ended"] = time.time()
            save()

    return before, After()


def _metric_history(replay: bool):
    import lightning.pytorch as pl

    class MetricHistory(pl.Callback):
        """Every epoch's report, kept in the Lightning checkpoint so a resumed run knows its past.

        With ``replay`` (a ``viscy tune`` trial), a resumed run first reports the epochs it restored, so the
        trial's results are complete even when Tune never saw them (it starts a continued trial's results afresh,
        and a run can finish its last checkpoint just as the sweep is interrupted).
        """

        def __init__(self) -> None:
            self.history: list[dict[str, float]] = []

        def on_fit_start(self, trainer, pl_module) -> None:
            import ray.train

            for metrics in self.history if replay else []:
                ray.train.report(metrics=dict(metrics))

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            # before RayTrainReportCallback, so the checkpoint it saves holds this epoch too; the same metrics
            self.history.append(_epoch_metrics(trainer) | {"epoch": trainer.current_epoch, "step": trainer.global_step})

        def state_dict(self) -> dict[str, Any]:
            return {"history": self.history}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.history = list(state_dict.get("history", []))

    return MetricHistory()


def train_loop(loop_config: dict[str, Any]) -> None:
    """Worker function: build the module, loggers and Lightning trainer, then fit (resuming if Ray has a checkpoint)."""
    loop_started = time.time()  # before the heavy imports, which are part of the worker group's start
    import lightning.pytorch as pl
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    from viscy.testing import adopt
    from viscy.train.module import ThroughputCallback, VSModule, resolve_precision
    from viscy.train.shard import RayShardIterable

    adopt(loop_config.get("test_hook"))
    config = TrainConfig.model_validate(loop_config["config"])
    tc, run_dir, name = config.trainer, Path(loop_config["run_dir"]), loop_config["run_name"]
    pl.seed_everything(tc.seed, workers=True, verbose=False)
    module = VSModule(
        loop_config["model_name"],
        loop_config["model_kwargs"],
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
            project=config.logging.project,
            name=config.logging.run_name or name,
            group=config.logging.group,
            save_dir=str(run_dir),
            offline=config.logging.offline,
            id=name.replace("/", "-"),
            resume="allow",
            config=loop_config["config"],
        )
    else:
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="")
    # EpochEvents after ThroughputCallback, so the epoch's samples/s is in the event.
    report = RayTrainReportCallback()
    timers = _phase_timers(run_dir / TIMINGS, loop_started) if ray.train.get_context().get_world_rank() == 0 else ()
    callbacks: list[pl.Callback] = [
        ThroughputCallback(),
        _epoch_callbacks(),
        _metric_history(bool(loop_config.get("replay_history"))),
        *timers[:1],
        report,
        *timers[1:],
    ]
    steps = loop_config["steps"]
    bs = config.data.batch_size
    train_dl = RayShardIterable(ray.train.get_dataset_shard("train"), bs, shuffle_buffer=4 * bs)
    val_dl = None
    if steps["val_steps"]:
        val_dl = RayShardIterable(ray.train.get_dataset_shard("val"), bs, cache=bool(steps.get("val_cache")))
    callbacks.append(_next_pass_callback(train_dl))
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
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            ckpt = str(Path(ckpt_dir) / RayTrainReportCallback.CHECKPOINT_NAME)
            trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl, ckpt_path=ckpt)
    else:
        trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl)
    with contextlib.suppress(OSError):  # Ray's callback leaves its (by now empty) staging folder in /tmp
        os.rmdir(report.tmpdir_prefix)
    if ray.train.get_context().get_world_rank() == 0:  # figures and logs live on rank 0's node
        upload_run_files(run_dir, loop_config["storage"], name, dirs=True)


def save_checkpoint_weights(
    checkpoint: Any, metrics: dict[str, Any], card: ModelCard, out: Path
) -> tuple[Path, ModelCard]:
    """Write a Ray Train checkpoint's weights with their model card (plus its epoch and metrics) to ``out``.

    The weights are a plain state dict (keys without Lightning's ``model.``); return the path and the card.
    """
    import torch

    from viscy.models.checkpoint import save_model

    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "checkpoint.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    training = {**card.training, "epoch": int(metrics.get("epoch", -1)), "metrics": metrics}
    card = dataclasses.replace(card, training=training)
    return save_model(weights, card, out), card


def export_best(
    result: Any, score: str, out_dir: Path, card: ModelCard, order: str = "min"
) -> tuple[Path, ModelCard] | None:
    """Write the best reported checkpoint (by ``score``, ``order`` min or max) as ``out_dir/best_model.pt``."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if m and score in m]
    if not candidates:
        if result.checkpoint is None:
            return None
        candidates = [(result.checkpoint, result.metrics or {})]
    sign = 1.0 if order == "min" else -1.0
    ckpt, metrics = min(candidates, key=lambda cm: sign * float(cm[1].get(score, sign * float("inf"))))
    return save_checkpoint_weights(ckpt, metrics, card, out_dir / BEST_MODEL)


@dataclass(frozen=True)
class TrainResult:
    """What ``viscy train`` produced.

    Attributes
    ----------
    run_dir
        Local directory of the run (figures, logs, ``best_model.pt``, ``viscy_config.yaml``).
    best_model
        Self-describing best weights (None if no checkpoint was reported).
    metrics
        Metrics of the best checkpoint (``val_loss``, ``val_pearson_<channel>``, ...).
    epochs
        Epochs completed.
    card
        The model card written with the weights.
    storage
        Where Ray Train keeps the run's checkpoints (a directory or URI).
    result
        Ray Train's ``Result``.
    """

    run_dir: Path
    best_model: Path | None
    metrics: dict[str, float]
    epochs: int
    card: ModelCard
    storage: str
    result: Any = None


def model_card_for(config: TrainConfig, run_name: str | None = None) -> ModelCard:
    """The model card of what ``config`` trains: resolved name and kwargs, spec, channels, normalisation."""
    from viscy.config import DEFAULT_TRAIN_MODEL
    from viscy.data.patches import explicit_normalization
    from viscy.models import model_spec, resolve_model_source, training_kwargs

    mc, data, fcmae = config.model, config.data, config.trainer.fcmae
    name, kwargs, _ = resolve_model_source(
        mc.name or (None if mc.checkpoint else DEFAULT_TRAIN_MODEL), mc.kwargs, mc.checkpoint
    )
    shape = data.model_shape(fcmae.pretraining)
    kwargs = training_kwargs(name, kwargs, fcmae.pretraining, fcmae.mask_ratio, shape)
    return ModelCard(
        name=name,
        kwargs=kwargs,
        spec=model_spec(name, kwargs),
        source_channels=list(data.source_channel),
        target_channels=list(data.source_channel if fcmae.pretraining else data.target_channel),
        normalization=[
            n.model_dump(mode="json")
            for n in explicit_normalization([*data.source_channel, *data.target_channel], data.normalization)
        ],
        z_window_size=data.z_window_size,
        target_depth=shape["out_depth"],
        training={"run_name": run_name, "git_commit": git_commit()},
    )


def check_run_dir(run_dir: Path, storage: str, name: str, resume: bool) -> None:
    """Refuse to start a run where viscy would write into something it did not create, or replace a run."""
    location = f"{storage.rstrip('/')}/{name}"
    exists = run_exists(storage, name)
    if resume and not exists:
        raise ConfigError(f"trainer.resume: no run to continue at {location}; check run_name/storage_path")
    if not resume and exists:
        raise ConfigError(
            f"run {location} already exists; pass --trainer.resume true to continue it or choose another "
            "--trainer.run_name"
        )
    if not is_uri(storage) and Path(storage).exists() and not Path(storage).is_dir():
        raise ConfigError(f"trainer.storage_path {storage} is a file; point it at a directory (created if absent)")
    if run_dir.is_file():
        raise ConfigError(f"run directory {run_dir} is a file; choose another --trainer.run_name")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / RUN_INFO).exists():
        raise ConfigError(
            f"run directory {run_dir} exists and holds files viscy did not write; they are left untouched. "
            "Choose another --trainer.run_name or --trainer.storage_path"
        )


def check_cluster_resources(tc: Any) -> None:
    """Fail now, naming the request and the cluster, when Ray could never schedule the worker group.

    Otherwise Ray would wait forever for resources that do not exist. Skipped with ``trainer.check_resources:
    false`` (an autoscaling cluster that will add nodes).
    """
    import ray

    if not tc.check_resources:
        return
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    cluster = f"the cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s) on {len(nodes)} node(s)"
    need_cpu = tc.num_workers * tc.cpus_per_worker
    problems = []
    if tc.use_gpu:
        if tc.gpus_per_worker < 1 and tc.num_workers > 1:
            problems.append(
                f"trainer.gpus_per_worker {tc.gpus_per_worker:g}: NCCL ranks cannot share a GPU; set "
                "--trainer.gpus_per_worker 1"
            )
        if tc.num_workers * tc.gpus_per_worker > gpus:
            problems.append(
                f"trainer.num_workers {tc.num_workers} x trainer.gpus_per_worker {tc.gpus_per_worker:g} = "
                f"{tc.num_workers * tc.gpus_per_worker:g} GPU(s) requested but {cluster}; lower num_workers, or "
                "set --trainer.use_gpu false"
            )
        elif not any(n.get("GPU", 0) >= tc.gpus_per_worker and n.get("CPU", 0) >= tc.cpus_per_worker for n in nodes):
            problems.append(
                f"no node has {tc.gpus_per_worker:g} GPU(s) and {tc.cpus_per_worker:g} CPU(s) for one worker; {cluster}"
            )
    if not any(n.get("CPU", 0) >= tc.cpus_per_worker for n in nodes):
        problems.append(f"trainer.cpus_per_worker {tc.cpus_per_worker:g} is more than any node has; {cluster}")
    elif cpus - need_cpu < 1:
        problems.append(
            f"trainer.num_workers {tc.num_workers} x trainer.cpus_per_worker {tc.cpus_per_worker:g} = {need_cpu:g} "
            f"CPU(s) leaves {max(cpus - need_cpu, 0):g} for Ray Data's read tasks (each needs 1) and {cluster}; "
            "lower --trainer.cpus_per_worker or --trainer.num_workers"
        )
    fitting = [n for n in nodes if n.get("CPU", 0) >= tc.cpus_per_worker and (not tc.use_gpu or n.get("GPU", 0) >= 1)]
    if tc.placement == "strict_spread" and len(fitting) < tc.num_workers:
        problems.append(
            f"trainer.placement strict_spread puts each of the {tc.num_workers} workers on its own node, but only "
            f"{len(fitting)} node(s) can host one; {cluster}. Use --trainer.placement spread"
        )
    if problems:
        raise ConfigError("the worker group can never be scheduled:\n  - " + "\n  - ".join(problems))


class _EpochPrinter:
    """Driver-side console of a training run: a progress bar over epochs and one line per epoch."""

    def __init__(self, max_epochs: int, channels: list[str], score: str) -> None:
        from tqdm.auto import tqdm

        self.channels, self.score = channels, score
        self.bar = tqdm(total=max_epochs, desc="train", unit="epoch", dynamic_ncols=True)
        self.started: float | None = None
        self.first_epoch: int | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        m, epoch = event["metrics"], int(event["epoch"])
        now = time.monotonic()
        if self.first_epoch is None:
            self.first_epoch, self.started = epoch, now
            self.bar.n = epoch
        done = epoch + 1 - self.first_epoch
        eta = ""
        if done > 1:
            per = (now - self.started) / (done - 1)
            eta = f"  ETA {_duration(per * (int(event['max_epochs']) - epoch - 1))}"
        parts = [f"epoch {epoch + 1}/{event['max_epochs']}", f"train_loss {m.get('train_loss', float('nan')):.4f}"]
        if "val_loss" in m:
            parts.append(f"val_loss {m['val_loss']:.4f}")
        pearson = [f"{c} {m[f'val_pearson_{c}']:.3f}" for c in self.channels if f"val_pearson_{c}" in m]
        if pearson:
            parts.append("val Pearson " + " ".join(pearson))
        if "train_samples_per_s" in m:
            parts.append(f"{m['train_samples_per_s']:.1f} samples/s")
        self.bar.write("  ".join(parts) + eta)
        self.bar.update(epoch + 1 - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_train(
    config: TrainConfig,
    *,
    callbacks: list[Any] | None = None,
    score: str | None = None,
    score_order: str = "min",
    quiet: bool = False,
    replay_history: bool = False,
) -> TrainResult:
    """Train with Ray Train on the local Ray cluster (or ``RAY_ADDRESS``); write the self-describing best model.

    Everything that can be checked without Ray is checked first (model against data, run directory, plates
    and channels; ``viscy train`` starts Ray in the background meanwhile); the worker-group request is
    checked against the cluster right after Ray is up.

    Parameters
    ----------
    config
        The training config.
    callbacks
        Extra Ray Train ``UserCallback`` s (``viscy tune`` forwards each report to its trial).
    score, score_order
        Metric (default ``val_loss``, or ``train_loss`` without validation) and direction that rank checkpoints.
    quiet
        Log instead of printing (a tune trial runs many of these at once).
    replay_history
        On resume, report the restored epochs' metrics again before training on (a tune trial's results).
    """
    import ray
    import ray.train
    from ray.data import DataContext
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from viscy.console import failure_message, log_path, on_event, place_log
    from viscy.ray_utils import check_shared_path, ensure_ray
    from viscy.testing import forwarded
    from viscy.train.datasource import build_datasets, list_fovs, warm_read_workers

    started = time.time()
    tc = config.trainer
    name, storage, run_dir = run_paths(config)
    check_run_dir(run_dir, storage, name, tc.resume)
    card = model_card_for(config, name)
    list_fovs(config.data)  # plates, channels, windows and patch sizes, before Ray starts
    if tc.precision == "16-mixed" and not tc.use_gpu:
        warnings.warn("precision 16-mixed needs a GPU; workers will train in 32", stacklevel=2)

    # Ray Train's controller polls its workers at this interval (default 2 s), so a run ended up to that much
    # before fit() returned; the controller reads it from the driver's environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    ray_called = time.time()
    ensure_ray()
    ray_ready = time.time()
    check_cluster_resources(tc)
    shared = check_shared_path(storage, "trainer.storage_path")
    # On small nodes the per-operator reservation keeps Ray Data to about one read task at a time.
    DataContext.get_current().op_resource_reservation_enabled = False
    DataContext.get_current().enable_progress_bars = False
    train_ds, val_ds, split, steps = build_datasets(
        config.data,
        tc.num_workers,
        tc.reads_per_fov,
        tc.val_reads_per_fov,
        tc.train_steps_per_epoch,
        tc.val_steps,
        tc.seed,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "git_commit": card.training.get("git_commit"),
        "run_name": name,
        "storage_path": storage,
        "split": json.loads(split.to_json()),
        "steps_per_worker": steps,
        "model": card.describe(),
        "started": _dt.datetime.now().isoformat(),
    }
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2))
    save_config(config, run_dir, "train")
    logfile = place_log(run_dir)
    score = score or ("val_loss" if val_ds is not None else "train_loss")
    say = logging.getLogger("viscy").info if quiet else print
    datasets = {"train": train_ds} | ({"val": val_ds} if val_ds is not None else {})
    resources = {"CPU": tc.cpus_per_worker} | ({"GPU": tc.gpus_per_worker} if tc.use_gpu else {})
    say(f"viscy train: {'resuming' if tc.resume else 'run'} '{name}' -> {run_dir}")
    if shared:
        say(f"  {shared}")
    say(f"  model {card.describe()}")
    say(
        f"  {len(split.train)} train / {len(split.val)} val FOVs; per worker and epoch {steps['train_steps']} "
        f"train / {steps['val_steps']} val batches of {config.data.batch_size}; {tc.num_workers} worker(s) on "
        f"{'GPU' if tc.use_gpu else 'CPU'}; log {logfile or log_path()}"
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": json.loads(config.model_dump_json()),
            "run_dir": str(run_dir),
            "run_name": name,
            "steps": steps,
            "storage": storage,
            "model_name": card.name,
            "model_kwargs": card.kwargs,
            "test_hook": forwarded(),
            "replay_history": replay_history,
        },
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker=resources,
            placement_strategy=tc.placement.upper(),
        ),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.num_to_keep, checkpoint_score_attribute=score, checkpoint_score_order=score_order
            ),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            callbacks=callbacks or None,
        ),
    )
    channels = card.target_channels
    printer = None if quiet else _EpochPrinter(tc.max_epochs, channels, score)
    if printer is not None:
        on_event("train_epoch", printer)
    # Reads of the first epoch start in warm workers; free CPUs bound how many run at once.
    free_cpus = ray.cluster_resources().get("CPU", 1) - tc.num_workers * tc.cpus_per_worker
    warm_read_workers(config.data, int(min(max(free_cpus, 1), MAX_WARM_READ_WORKERS)))
    fit_called = time.time()
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except Exception as exc:
        logging.getLogger("viscy").exception("training failed")
        raise TrainingError(
            f"training failed in {failure_message(exc)}. Checkpoints so far are in {storage}/{name}; continue with "
            f"--trainer.run_name {name} --trainer.resume true once fixed"
        ) from exc
    finally:
        if printer is not None:
            on_event("train_epoch", None)
            printer.close()
    fit_returned = time.time()
    exported = export_best(result, score, run_dir, card, score_order)
    best, card = exported if exported is not None else (None, card)
    metrics = card.training.get("metrics", {})
    epochs = int((result.metrics or {}).get("epoch", -1)) + 1
    # Wall-clock stamps of the driver's phases, beside rank 0's (timings/rank0.json).
    info["timings"] = {
        "started": started,
        "ray_start_s": ray_ready - ray_called,
        "fit_called": fit_called,
        "fit_returned": fit_returned,
        "finished": time.time(),
    }
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2))
    upload_run_files(run_dir, storage, name, dirs=False)
    summary = TrainResult(run_dir, best, metrics, epochs, card, storage, result)
    say(
        f"viscy train: finished {epochs} epochs; best {score} {metrics.get(score, float('nan')):.4f} "
        f"(epoch {int(metrics.get('epoch', -1)) + 1})"
        + "".join(
            f", val Pearson {c} {metrics[f'val_pearson_{c}']:.3f}" for c in channels if f"val_pearson_{c}" in metrics
        )
    )
    say(f"  best model {best} (self-describing: viscy export / predict need nothing else)")
    tracker = "wandb" if config.logging.wandb else "tensorboard"
    say(f"  checkpoints {storage}/{name}/checkpoint_*  figures {run_dir / 'figures'}  {tracker} {run_dir / tracker}")
    return summary
