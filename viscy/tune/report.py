"""PNG figures of a sweep: learning curves of every trial, and Optuna's optimisation history, parameter
importances and parallel coordinates (its matplotlib visualisations, over a study rebuilt from the results).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viscy.tune.config import TuneConfig

if TYPE_CHECKING:
    from viscy.tune.leaderboard import TrialRow

log = logging.getLogger("viscy")


def learning_curves(rows: list[TrialRow], metric: str, path: Path) -> Path:
    """The metric against epochs for every trial on one plot; trials stopped early dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for row in rows:
        if not row.history:
            continue
        epochs, values = zip(*sorted(dict(row.history).items()), strict=True)
        style = "--" if row.status == "stopped early" else "-"
        ax.plot(epochs, values, style, marker="o", markersize=3, label=f"{row.trial_id} ({row.status})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs trained")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of every trial (dashed: stopped early by ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def study_from_rows(rows: list[TrialRow], config: TuneConfig) -> Any:
    """An Optuna study holding each scored trial's parameters and best metric (for Optuna's figures)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = {k: p for k, p in config.search.space.items() if p.kind != "fixed"}
    distributions = {}
    for key, p in space.items():
        if p.kind == "loguniform":
            distributions[key] = FloatDistribution(*p.loguniform, log=True)
        elif p.kind == "uniform":
            distributions[key] = FloatDistribution(*p.uniform)
        elif p.kind == "int":
            distributions[key] = IntDistribution(*p.int_range)
        else:
            distributions[key] = CategoricalDistribution([json.dumps(v) for v in p.choice])
    direction = "minimize" if config.search.metric_mode() == "min" else "maximize"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction)
    for row in rows:
        if math.isnan(row.metric):
            continue
        params = {k: json.dumps(row.params[k]) if space[k].kind == "choice" else row.params[k] for k in space
                  if k in row.params}
        if len(params) != len(space):
            continue
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: distributions[k] for k in params},
                value=row.metric,
                user_attrs={"trial_id": row.trial_id},
            )
        )
    return study


def write_figures(rows: list[TrialRow], config: TuneConfig, out_dir: Path) -> list[Path]:
    """Write the sweep's PNG figures into ``out_dir``; return those written.

    A figure Optuna cannot draw (parameter importances need two scored trials that differ) is skipped and
    the reason logged, so a small or failed sweep still gets the others.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    metric = config.search.metric
    written = [learning_curves(rows, metric, out_dir / "learning_curves.png")]
    study = study_from_rows(rows, config)
    plots = {
        "optimization_history.png": ovm.plot_optimization_history,
        "param_importances.png": ovm.plot_param_importances,
        "parallel_coordinate.png": ovm.plot_parallel_coordinate,
    }
    for filename, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("figure %s skipped: %s", filename, exc)
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=120)
        plt.close(fig)
        written.append(out_dir / filename)
    return written
