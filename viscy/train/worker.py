"""The Ray Train worker of ``viscy train``: Lightning in every worker, fed by the run's Ray Data shards.

:func:`train_loop` is the function ``TorchTrainer`` runs in each worker; it builds the network from the model
card the driver checked (never resolving the model again), the loggers and the Lightning trainer with its
callbacks, then fits, resuming from Ray's checkpoint when there is one. Rank 0 writes the figures, logs and
phase timings (``timings/rank0.json``) and uploads them to URI storage.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from viscy.models.card import ModelCard
from viscy.train.config import TrainConfig
from viscy.train.storage import upload_run_files


def _epoch_metrics(trainer: Any) -> dict[str, float]:
    """The epoch's scalar metrics as Lightning holds them (what Ray Train's report callback sends)."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


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

    from viscy.train.module import ThroughputCallback, VSModule, resolve_precision
    from viscy.train.shard import RayShardIterable

    config = TrainConfig.model_validate(loop_config["config"])
    card = ModelCard.from_dict(loop_config["card"])  # checked on the driver: built here, never re-resolved
    tc, run_dir, name = config.trainer, Path(loop_config["run_dir"]), loop_config["run_name"]
    pl.seed_everything(tc.seed, workers=True, verbose=False)
    module = VSModule(
        card.name,
        card.kwargs,
        config.data.source_channels,
        config.data.target_channels,
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
    # Ray's report callback after ThroughputCallback, so the epoch's samples/s is in the report (and the console).
    report = RayTrainReportCallback()
    timers = _phase_timers(run_dir / TIMINGS, loop_started) if ray.train.get_context().get_world_rank() == 0 else ()
    callbacks: list[pl.Callback] = [
        ThroughputCallback(),
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
