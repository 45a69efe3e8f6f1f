"""``viscy tune``: Ray Tune + Optuna (TPE) + ASHA over real ``viscy train`` runs.

Each trial is a Tune driver function that runs :func:`viscy.train.trainer.run_train` (a Ray Train
``TorchTrainer`` fed by Ray Data) with a callback forwarding every epoch's report to Tune, the pattern Ray
2.60 supports (``Tuner(trainer)`` is deprecated). Layout of ``<storage_path>/<experiment>/``:

- Tune's own state (``tuner.pkl``, ``experiment_state-*.json``, ``searcher-state-*.pkl``) and one
  ``trial_<id>/`` per trial (``params.json``, ``progress.csv``, TensorBoard events);
- ``runs/<trial id>/``: each trial's training run, laid out like ``viscy train``'s (checkpoints, figures,
  ``tensorboard/`` or ``wandb/``, ``viscy_config.yaml``);
- ``viscy_config.yaml`` (this sweep's config), ``viscy_tune.log``, ``leaderboard.csv``, ``figures/*.png``,
  ``best_config.yaml`` (``viscy train --config`` takes it unchanged) and ``best_model.pt`` (self-describing).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from viscy.config import ConfigError, config_to_yaml, save_config
from viscy.errors import ViscyError
from viscy.train.storage import is_uri, storage_location
from viscy.tune.config import SearchParam, TuneConfig
from viscy.tune.leaderboard import (
    LEADERBOARD,
    TIME_ATTR,
    TrialRow,
    collect_rows,
    format_leaderboard,
    short,
    write_leaderboard,
)
from viscy.tune.space import (
    base_tree,
    check_metric,
    check_space,
    decode_params,
    encode_point,
    largest_trainer,
    max_epochs,
    trial_config,
    trial_tree,
    tune_domains,
)

log = logging.getLogger("viscy")

BEST_CONFIG = "best_config.yaml"
TRIAL_DRIVER_MEMORY = 256 * 1024**2


class TuneError(ViscyError):
    """The sweep could not run or produced no usable trial; the message names why."""


# ------------------------------------------------------------------------------------------ trials
def _epoch_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReport(TuneReportCallback):
        """Forward each epoch's report to Tune with ``epochs_done`` (ASHA's clock, right after a resume too)."""

        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0]) if metrics else {}
            first[TIME_ATTR] = int(first.get("epoch", -1)) + 1
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReport()


def trial_dirname(trial: Any) -> str:
    """Tune's directory of a trial: ``trial_<id>`` (the default would spell out every parameter)."""
    return f"trial_{trial.trial_id}"


def run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    space: dict[str, dict[str, Any]],
    runs: str,
    experiment: str,
    metric: str,
    mode: str,
) -> None:
    """Tune trainable: one ``viscy train`` run with this trial's values, resumed if it was interrupted."""
    from ray import tune

    from viscy.train.storage import run_exists
    from viscy.train.trainer import run_train

    trial_id = tune.get_context().get_trial_id()
    values = decode_params(params, {k: SearchParam.model_validate(v) for k, v in space.items()})
    tree = trial_tree(base, values)
    tree["trainer"] |= {"storage_path": runs, "run_name": trial_id, "resume": run_exists(runs, trial_id)}
    if tree.get("logging", {}).get("wandb"):
        tree["logging"] |= {"group": tree["logging"].get("group") or experiment, "run_name": trial_id}
    config = trial_config(tree, {})
    run_train(
        config, callbacks=[_epoch_report_callback()], score=metric, score_order=mode, quiet=True, replay_history=True
    )


# ------------------------------------------------------------------------------------------ console
def _console_callback(num_samples: int, metric: str, mode: str, space_keys: list[str], epochs: int):
    from ray import tune

    class Console(tune.Callback):
        def __init__(self) -> None:
            self.bar = None
            self.best: dict[str, float] = {}

        def __getstate__(self) -> dict[str, Any]:
            return {"best": self.best}

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.bar, self.best = None, state.get("best", {})

        def _bar(self, trials: list) -> Any:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=num_samples, desc="tune", unit="trial", dynamic_ncols=True)
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            self.bar.n = min(done, num_samples)
            self.bar.refresh()
            return self.bar

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            value = result.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                old = self.best.get(trial.trial_id)
                better = old is None or (value < old if mode == "min" else value > old)
                self.best[trial.trial_id] = value if better else old
            running = sum(t.status == "RUNNING" for t in trials)
            if running != getattr(self, "_running", None):
                self._running = running
                self._bar(trials).set_postfix_str(f"{running} running", refresh=True)

        def _line(self, trials, trial, outcome: str) -> None:
            params = ", ".join(f"{k}={short(trial.config.get(k))}" for k in space_keys if k in trial.config)
            best = self.best.get(trial.trial_id)
            score = f"best {metric} {best:.4g}" if best is not None else f"no {metric} reported"
            bar = self._bar(trials)
            bar.write(f"trial {trial.trial_id}: {outcome}; {score}  [{params}]")

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            done = int((trial.last_result or {}).get(TIME_ATTR, 0))
            target = int(trial.config.get("trainer.max_epochs", epochs))
            outcome = (
                f"finished {done} epochs" if done >= target else f"stopped early by ASHA after {done}/{target} epochs"
            )
            self._line(trials, trial, outcome)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._line(trials, trial, "failed (see the leaderboard and the log)")

        def on_experiment_end(self, trials, **info) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Console()


# ------------------------------------------------------------------------------------------ layout
def experiment_location(config: TuneConfig) -> tuple[str, str, Path]:
    """(experiment name, absolute storage path or URI, local directory for the sweep's own files)."""
    search = config.search
    name = search.experiment
    if name is None:
        if config.resume:
            raise ConfigError("resume needs search.experiment (the experiment to continue)")
        from viscy.models.registry import model_label  # an import path's class name, not 'package.module:Class'

        name = f"tune-{model_label(config.model.name or 'model')}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    storage, local = storage_location(search.storage_path or config.trainer.storage_path, name)
    return name, storage, local


def _comparable(config: TuneConfig) -> dict[str, Any]:
    tree = json.loads(config.model_dump_json())
    tree.pop("resume", None)
    return tree


def check_experiment(config: TuneConfig, name: str, storage: str, local: Path) -> bool:
    """Whether to continue an existing experiment; refuse to write where viscy did not, or a changed config."""
    from ray import tune

    path = f"{storage.rstrip('/')}/{name}"
    restorable = tune.Tuner.can_restore(path)
    saved = local / "viscy_config.yaml"
    if config.resume and not restorable:
        raise ConfigError(f"resume: no tune experiment to continue at {path}; check search.experiment/storage_path")
    if not restorable:
        if local.is_file() or (local.is_dir() and any(local.iterdir()) and not saved.exists()):
            raise ConfigError(
                f"{local} exists and holds files viscy did not write; they are left untouched. Choose another "
                "search.experiment or search.storage_path"
            )
        return False
    if saved.exists():
        try:
            previous = TuneConfig.model_validate(yaml.safe_load(saved.read_text()))
        except Exception as exc:  # a config from another viscy version: say so rather than guess
            raise ConfigError(f"{saved} cannot be read ({exc}); choose another search.experiment") from None
        if _comparable(previous) != _comparable(config):
            raise ConfigError(
                f"experiment {path} exists with a different config ({saved}); rerun it with that config to continue "
                "it, or choose another search.experiment"
            )
    return True


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class TuneResult:
    """What ``viscy tune`` produced.

    Attributes
    ----------
    experiment_dir
        Local directory of the sweep's files (leaderboard, figures, best config and model).
    leaderboard
        Trials, best first.
    best_config
        ``best_config.yaml``: the best trial's full training config (None if no trial reported the metric).
    best_model
        The best trial's best weights with their model card (``best_model.pt``).
    figures
        PNG files written.
    interrupted
        The sweep was stopped before every trial ended (rerun to continue).
    """

    experiment_dir: Path
    experiment_path: str
    leaderboard: list[TrialRow]
    metric: str
    mode: str
    best_config: Path | None
    best_model: Path | None
    figures: list[Path]
    interrupted: bool


def export_best_trial(
    best: TrialRow, config: TuneConfig, storage: str, out_dir: Path
) -> tuple[Path, Path | None]:
    """Write the best trial's training config (``viscy train`` takes it unchanged) and its best weights."""
    from ray.train import Checkpoint

    from viscy.train.check import check_model
    from viscy.train.storage import uri_fs
    from viscy.train.trainer import save_checkpoint_weights

    tree = trial_tree(base_tree(config), best.params)
    tree["trainer"] |= {"run_name": None, "resume": False}
    train_config = trial_config(tree, {})
    header = (
        f"# best trial {best.trial_id} of tune experiment {out_dir.name}: {config.search.metric} {best.metric:.6g}\n"
        f"# train it again with: viscy train --config {out_dir / BEST_CONFIG}\n"
    )
    config_path = out_dir / BEST_CONFIG
    config_path.write_text(header + config_to_yaml(train_config))
    mode = config.search.metric_mode()
    sign = 1.0 if mode == "min" else -1.0
    filesystem = uri_fs(storage)[0] if is_uri(storage) else None
    card = check_model(train_config, best.trial_id)
    for value, path in sorted(best.checkpoints, key=lambda vp: sign * vp[0]):
        checkpoint = Checkpoint(path, filesystem=filesystem)
        try:
            model, _ = save_checkpoint_weights(
                checkpoint, {config.search.metric: value}, card, out_dir / "best_model.pt"
            )
        except FileNotFoundError:
            continue  # checkpoints beyond trainer.num_to_keep are deleted as training goes
        return config_path, model
    return config_path, None


# ------------------------------------------------------------------------------------------ entry
def run_tune(config: TuneConfig) -> TuneResult:
    """Run (or continue) a hyper-parameter sweep; write leaderboard, figures, best config and best model."""
    from ray import tune
    from ray.data import DataContext

    from viscy.console import place_log
    from viscy.ray_utils import ensure_ray
    from viscy.train.check import check_val_segmentation
    from viscy.train.datasource import list_fovs
    from viscy.train.trainer import check_cluster_resources

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # with verbose=0 Tune prints nothing; our console reports trials
    search = config.search
    check_space(config)
    check_metric(config)
    check_val_segmentation(config, list_fovs(config.data))  # plates, channels and labels, before Ray starts
    name, storage, local = experiment_location(config)
    mode, epochs = search.metric_mode(), max_epochs(config)
    biggest = largest_trainer(config)

    ensure_ray()
    try:
        check_cluster_resources(biggest)
    except ConfigError as exc:
        raise ConfigError(f"no trial of this sweep can ever run ({exc})") from None
    resuming = check_experiment(config, name, storage, local)
    DataContext.get_current().enable_progress_bars = False
    local.mkdir(parents=True, exist_ok=True)
    if not resuming:
        save_config(config, local, "tune")
    logfile = place_log(local, "viscy_tune.log")
    runs = f"{storage.rstrip('/')}/{name}/runs"
    keys = [k for k, p in search.space.items() if p.kind != "fixed"]
    trainable = _trainable(config, runs, name, mode)
    path = f"{storage.rstrip('/')}/{name}"
    _announce(config, name, path, resuming, mode, epochs, keys, biggest, logfile)
    if resuming:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(config, trainable, name, storage, mode, epochs, keys)
    grid = tuner.fit()
    return _publish(grid, config, name, storage, local, runs, keys)


def _trainable(config: TuneConfig, runs: str, name: str, mode: str) -> Any:
    """:func:`run_trial` with this sweep's fixed arguments and each trial driver's resources."""
    from ray import tune

    search = config.search
    return tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=base_tree(config),
            space={k: p.model_dump() for k, p in search.space.items()},
            runs=runs,
            experiment=name,
            metric=search.metric,
            mode=mode,
        ),
        # The trial's driver function only waits on its TorchTrainer, which reserves the workers. Any CPU share
        # here would leave less than the 1 CPU a Ray Data read task needs on a small node, and reads would hang.
        {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY},
    )


def _announce(
    config: TuneConfig,
    name: str,
    path: str,
    resuming: bool,
    mode: str,
    epochs: int,
    keys: list[str],
    biggest: Any,
    logfile: Path | None,
) -> None:
    """The sweep's first console lines: where it writes, what it searches and what each trial takes."""
    from viscy.console import log_path

    search = config.search
    print(
        f"viscy tune: {'continuing' if resuming else 'experiment'} '{name}' -> {path}\n"
        f"  {search.num_samples} trials ({search.max_concurrent_trials} at a time), {search.metric} ({mode}), "
        f"{search.scheduler.name.upper()} over {epochs} epochs; searching {', '.join(keys)}\n"
        f"  each trial: {biggest.num_workers} worker(s) x {biggest.cpus_per_worker:g} CPU"
        + (f" + {biggest.gpus_per_worker:g} GPU" if biggest.use_gpu else "")
        + (f"; log {logfile or log_path()}" if (logfile or log_path()) else "")
    )


def _new_tuner(
    config: TuneConfig, trainable: Any, name: str, storage: str, mode: str, epochs: int, keys: list[str]
) -> Any:
    """A fresh ``Tuner``: Optuna's TPE search with ASHA (or FIFO) over the trials, our console as its callback."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    search = config.search
    if search.scheduler.name == "asha":
        scheduler = ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=epochs,
            grace_period=min(search.scheduler.grace_period, epochs),
            reduction_factor=search.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = OptunaSearch(
        points_to_evaluate=[encode_point(p, config) for p in search.points_to_evaluate] or None,
        seed=search.seed,
    )
    return tune.Tuner(
        trainable,
        param_space=tune_domains(config),
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=search.num_samples,
            max_concurrent_trials=search.max_concurrent_trials,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=0,
            callbacks=[_console_callback(search.num_samples, search.metric, mode, keys, epochs)],
        ),
    )


def _publish(grid: Any, config: TuneConfig, name: str, storage: str, local: Path, runs: str, keys: list[str]
             ) -> TuneResult:
    """Write the leaderboard, figures, best config and model (uploaded to URI storage), print the summary.

    Raises
    ------
    KeyboardInterrupt
        If the sweep was interrupted (a rerun continues it).
    TuneError
        If no trial reported the metric.
    """
    from viscy.train.storage import upload_run_files
    from viscy.tune.report import write_figures

    search = config.search
    rows = collect_rows(grid, config, runs)
    interrupted = any(r.status == "interrupted" for r in rows) or len(rows) < search.num_samples
    write_leaderboard(rows, local / LEADERBOARD, search.metric)
    figures = write_figures(rows, config, local / "figures")
    best_config = best_model = None
    scored = [r for r in rows if not math.isnan(r.metric)]
    if scored:
        best_config, best_model = export_best_trial(scored[0], config, storage, local)
    upload_run_files(local, storage, name, dirs=False)
    upload_run_files(local, storage, name, dirs=True)
    path = f"{storage.rstrip('/')}/{name}"
    mode = search.metric_mode()
    result = TuneResult(local, path, rows, search.metric, mode, best_config, best_model, figures, interrupted)
    _print_summary(result, keys, config)
    if interrupted:
        raise KeyboardInterrupt(f"sweep interrupted; continue it with the same command (experiment {name})")
    if not scored:
        raise TuneError(
            f"no trial reported {search.metric}; see the leaderboard {local / LEADERBOARD} and the log for why"
        )
    return result


def _print_summary(result: TuneResult, keys: list[str], config: TuneConfig) -> None:
    rows = result.leaderboard
    stopped = sum(r.status == "stopped early" for r in rows)
    failed = sum(r.status == "failed" for r in rows)
    print(
        f"viscy tune: {len(rows)} trial(s): {sum(r.status == 'finished' for r in rows)} finished, {stopped} stopped "
        f"early, {failed} failed" + (f", {sum(r.status == 'interrupted' for r in rows)} interrupted" if
                                    result.interrupted else "")
    )
    print(format_leaderboard(rows, result.metric, keys))
    where = result.experiment_dir
    print(f"  leaderboard {where / LEADERBOARD}  figures {where / 'figures'}")
    if result.best_config is not None:
        print(f"  best config {result.best_config} (viscy train --config {result.best_config})")
    if result.best_model is not None:
        print(f"  best model {result.best_model} (self-describing: viscy export / predict need nothing else)")
    print(f"  dashboards: tensorboard --logdir {result.experiment_path}")
    if result.interrupted:
        name = config.search.experiment or where.name
        print(f"  continue: rerun the same command with --search.experiment {name} (or --resume true)")
