"""``viscy train``: Ray Train ``TorchTrainer`` running Lightning in every worker, fed by Ray Data.

This module is the driver: checks, the worker group and its datasets, the run's files and the best model.
The workers' loop is :mod:`viscy.train.worker`; where a run lives, :mod:`viscy.train.storage`.

Layout of a run (``<storage_path>/<run_name>/``): Ray's ``checkpoint_*/checkpoint.ckpt`` and snapshot,
``viscy_config.yaml`` + ``run_info.json`` (git commit, split, steps), ``figures/epoch_*.png``,
``tensorboard/`` or ``wandb/``, and after fit ``best_model.pt`` (plain state dict, keys without ``model.``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from viscy.config import ConfigError, save_config
from viscy.errors import ViscyError
from viscy.models.card import ModelCard
from viscy.train.config import TrainConfig
from viscy.train.storage import is_uri, run_exists, run_paths, upload_run_files
from viscy.train.worker import train_loop

BEST_MODEL = "best_model.pt"
HEALTH_CHECK_INTERVAL_S = "0.5"
MAX_WARM_READ_WORKERS = 8
RUN_INFO = "run_info.json"


class TrainingError(ViscyError):
    """Training failed inside the Ray workers; the message names the root cause."""


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
    from viscy.console import place_log
    from viscy.train.check import check_model, check_val_segmentation
    from viscy.train.datasource import build_datasets, list_fovs
    from viscy.train.progress import EpochConsole, EpochPrinter

    started = time.time()
    tc = config.trainer
    name, storage, run_dir = run_paths(config)
    check_run_dir(run_dir, storage, name, tc.resume)
    card = check_model(config, name)  # the model is resolved and checked here only; workers get the card
    fovs = list_fovs(config.data)  # plates, channels, windows and patch sizes, before Ray starts
    check_val_segmentation(config, fovs)
    if tc.precision == "16-mixed" and not tc.use_gpu:
        warnings.warn("precision 16-mixed needs a GPU; workers will train in 32", stacklevel=2)

    shared, ray_start_s = _start_ray(tc, storage)
    train_ds, val_ds, split, steps = build_datasets(
        config.data,
        tc.num_workers,
        tc.reads_per_fov,
        tc.val_reads_per_fov,
        tc.train_steps_per_epoch,
        tc.val_steps,
        tc.seed,
        fovs=fovs,
        val_labels=tc.val_segmentation.label_names(),
    )
    info = _write_run_start(config, card, run_dir, name, storage, split, steps)
    logfile = place_log(run_dir)
    score = score or ("val_loss" if val_ds is not None else "train_loss")
    say = logging.getLogger("viscy").info if quiet else print
    _announce(say, config, card, name, run_dir, shared, split, steps, logfile)
    # Each epoch's report reaches this console through a Ray Train callback (run in the controller).
    console = None if quiet else EpochConsole(EpochPrinter(tc.max_epochs, card.target_channels))
    loop_config = {
        "config": json.loads(config.model_dump_json()), "card": card.to_dict(), "steps": steps,
        "run_dir": str(run_dir), "run_name": name, "storage": storage, "replay_history": replay_history,
    }
    trainer = _torch_trainer(
        config,
        {"train": train_ds} | ({"val": val_ds} if val_ds is not None else {}),
        loop_config,
        score,
        score_order,
        [*(callbacks or []), *([console.callback()] if console is not None else [])],
    )
    _warm_first_reads(config)
    fit_called = time.time()
    result = _fit(trainer, storage, name, console)
    fit_returned = time.time()
    exported = export_best(result, score, run_dir, card, score_order)
    best, card = exported if exported is not None else (None, card)
    # Wall-clock stamps of the driver's phases, beside rank 0's (timings/rank0.json).
    info["timings"] = {
        "started": started,
        "ray_start_s": ray_start_s,
        "fit_called": fit_called,
        "fit_returned": fit_returned,
        "finished": time.time(),
    }
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2))
    upload_run_files(run_dir, storage, name, dirs=False)
    epochs = int((result.metrics or {}).get("epoch", -1)) + 1
    summary = TrainResult(run_dir, best, card.training.get("metrics", {}), epochs, card, storage, result)
    _report_finished(say, summary, score, name, config.logging.wandb)
    return summary


def _start_ray(tc: Any, storage: str) -> tuple[str | None, float]:
    """Start (or join) Ray and check the worker group and storage against the cluster.

    Returns the note on the storage's sharing across nodes (None when there is nothing to say) and the
    seconds Ray took to be ready.
    """
    from ray.data import DataContext

    from viscy.ray_utils import check_shared_path, ensure_ray

    # Ray Train's controller polls its workers at this interval (default 2 s), so a run ended up to that much
    # before fit() returned; the controller reads it from the driver's environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    ray_called = time.time()
    ensure_ray()
    ray_start_s = time.time() - ray_called
    check_cluster_resources(tc)
    shared = check_shared_path(storage, "trainer.storage_path")
    # On small nodes the per-operator reservation keeps Ray Data to about one read task at a time.
    DataContext.get_current().op_resource_reservation_enabled = False
    DataContext.get_current().enable_progress_bars = False
    return shared, ray_start_s


def _write_run_start(
    config: TrainConfig, card: ModelCard, run_dir: Path, name: str, storage: str, split: Any, steps: dict[str, Any]
) -> dict[str, Any]:
    """Create the run directory and write ``run_info.json`` and the config; return the run info."""
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
    return info


def _announce(
    say: Callable[[str], Any],
    config: TrainConfig,
    card: ModelCard,
    name: str,
    run_dir: Path,
    shared: str | None,
    split: Any,
    steps: dict[str, Any],
    logfile: Path | None,
) -> None:
    """The run's first console lines: where it writes, the model, the split and the worker group."""
    from viscy.console import log_path

    tc = config.trainer
    say(f"viscy train: {'resuming' if tc.resume else 'run'} '{name}' -> {run_dir}")
    if shared:
        say(f"  {shared}")
    say(f"  model {card.describe()}")
    say(
        f"  {len(split.train)} train / {len(split.val)} val FOVs; per worker and epoch {steps['train_steps']} "
        f"train / {steps['val_steps']} val batches of {config.data.batch_size}; {tc.num_workers} worker(s) on "
        f"{'GPU' if tc.use_gpu else 'CPU'}; log {logfile or log_path()}"
    )


def _torch_trainer(
    config: TrainConfig,
    datasets: dict[str, Any],
    loop_config: dict[str, Any],
    score: str,
    score_order: str,
    callbacks: list[Any],
) -> Any:
    """Ray Train's ``TorchTrainer`` running :func:`~viscy.train.worker.train_loop` on the worker group."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = config.trainer
    resources = {"CPU": tc.cpus_per_worker} | ({"GPU": tc.gpus_per_worker} if tc.use_gpu else {})
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
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
            name=loop_config["run_name"],
            storage_path=loop_config["storage"],
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.num_to_keep, checkpoint_score_attribute=score, checkpoint_score_order=score_order
            ),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            callbacks=callbacks or None,
        ),
    )


def _warm_first_reads(config: TrainConfig) -> None:
    """Start the first epoch's reads in warm workers; the CPUs the worker group leaves bound how many run at once."""
    import ray

    from viscy.train.datasource import warm_read_workers

    tc = config.trainer
    free_cpus = ray.cluster_resources().get("CPU", 1) - tc.num_workers * tc.cpus_per_worker
    warm_read_workers(config.data, int(min(max(free_cpus, 1), MAX_WARM_READ_WORKERS)))


def _fit(trainer: Any, storage: str, name: str, console: Any) -> Any:
    """Run the trainer; a failure becomes a :class:`TrainingError` naming its root cause and how to resume."""
    from viscy.console import failure_message

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
        if console is not None:
            console.close()
    return result


def _report_finished(say: Callable[[str], Any], summary: TrainResult, score: str, name: str, wandb: bool) -> None:
    """The run's last console lines: best score and Pearson per channel, and where everything is."""
    metrics = summary.metrics
    say(
        f"viscy train: finished {summary.epochs} epochs; best {score} {metrics.get(score, float('nan')):.4f} "
        f"(epoch {int(metrics.get('epoch', -1)) + 1})"
        + "".join(
            f", val Pearson {c} {metrics[f'val_pearson_{c}']:.3f}"
            for c in summary.card.target_channels
            if f"val_pearson_{c}" in metrics
        )
        + "".join(
            f", val AP50 {c} {metrics[f'val_ap50_{c}']:.3f}"
            for c in summary.card.target_channels
            if f"val_ap50_{c}" in metrics
        )
    )
    say(f"  best model {summary.best_model} (self-describing: viscy export / predict need nothing else)")
    tracker = "wandb" if wandb else "tensorboard"
    run_dir = summary.run_dir
    say(
        f"  checkpoints {summary.storage}/{name}/checkpoint_*  figures {run_dir / 'figures'}  "
        f"{tracker} {run_dir / tracker}"
    )
