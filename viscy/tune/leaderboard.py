"""The leaderboard of a sweep: one row per trial from Tune's results, as ``leaderboard.csv`` and a console table."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from viscy.tune.config import TuneConfig
from viscy.tune.space import decode_params

LEADERBOARD = "leaderboard.csv"
TIME_ATTR = "epochs_done"  # what every trial's report counts epochs in (ASHA's clock)


@dataclass(frozen=True)
class TrialRow:
    """One line of the leaderboard."""

    trial_id: str
    params: dict[str, Any]
    metric: float
    epochs: int
    max_epochs: int
    status: str  # finished | stopped early | failed | interrupted
    error: str
    run_dir: str
    history: list[tuple[int, float]]  # (epochs done, metric) per report
    checkpoints: list[tuple[float, str]]  # (metric, checkpoint path) per report with a checkpoint


def collect_rows(grid: Any, config: TuneConfig, runs: str) -> list[TrialRow]:
    """Leaderboard rows from Tune's results, best first (trials without the metric last)."""
    metric, mode = config.search.metric, config.search.metric_mode()
    space = config.search.space
    statuses = saved_statuses(grid)
    rows = []
    for i in range(len(grid)):
        result = grid[i]
        trial_id = Path(result.path).name.removeprefix("trial_")
        df = result.metrics_dataframe
        history: list[tuple[int, float]] = []
        checkpoints: list[tuple[float, str]] = []
        if df is not None and metric in df.columns:
            for _, r in df.iterrows():
                value = r.get(metric)
                if value is None or not math.isfinite(float(value)):
                    continue
                history.append((int(r.get(TIME_ATTR, len(history) + 1)), float(value)))
                path = r.get("checkpoint_path")
                if isinstance(path, str) and path:
                    checkpoints.append((float(value), path))
        values = [v for _, v in history]
        best = (min(values) if mode == "min" else max(values)) if values else float("nan")
        params = decode_params({k: v for k, v in (result.config or {}).items() if k in space}, space)
        epochs = max((e for e, _ in history), default=0)
        target = int(params.get("trainer.max_epochs", config.trainer.max_epochs))
        if result.error is not None:
            status, error = "failed", _first_line(result.error)
        elif epochs >= target:
            status, error = "finished", ""
        else:
            ended = statuses.get(trial_id) == "TERMINATED"
            status, error = ("stopped early", "") if ended else ("interrupted", "")
        rows.append(
            TrialRow(trial_id, params, best, epochs, target, status, error, f"{runs}/{trial_id}", history, checkpoints)
        )
    sign = 1.0 if mode == "min" else -1.0
    return sorted(rows, key=lambda r: (math.isnan(r.metric), sign * r.metric if not math.isnan(r.metric) else 0))


def saved_statuses(grid: Any) -> dict[str, str]:
    """Each trial's status as Tune saved it. After a Ctrl-C the trials in memory all read TERMINATED; the saved
    state still tells the ones that were cut off (loaded back as PENDING) from the ones that ended."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    return {t.trial_id: t.status for t in analysis.trials}


def _first_line(error: BaseException | str) -> str:
    from viscy.console import failure_message

    text = failure_message(error) if isinstance(error, BaseException) else str(error).strip().splitlines()[-1]
    return text[:300]


def write_leaderboard(rows: list[TrialRow], path: Path, metric: str) -> Path:
    """``leaderboard.csv``: rank, trial, status, metric, epochs, parameters, run directory."""
    import pandas as pd

    records = [
        {
            "rank": i + 1,
            "trial_id": r.trial_id,
            "status": r.status,
            metric: r.metric,
            "epochs": r.epochs,
            "max_epochs": r.max_epochs,
            "stopped_early": r.status == "stopped early",
            **{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.params.items()},
            "run_dir": r.run_dir,
            "error": r.error,
        }
        for i, r in enumerate(rows)
    ]
    pd.DataFrame.from_records(records).to_csv(path, index=False)
    return path


def format_leaderboard(rows: list[TrialRow], metric: str, keys: list[str]) -> str:
    """The leaderboard as a console table."""
    head = ["#", "trial", *keys, metric, "epochs", "status"]
    body = [
        [str(i + 1), r.trial_id, *(short(r.params.get(k)) for k in keys), f"{r.metric:.4g}",
         f"{r.epochs}/{r.max_epochs}", r.status + (f": {r.error[:60]}" if r.error else "")]
        for i, r in enumerate(rows)
    ]
    widths = [max(len(row[c]) for row in [head, *body]) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [head, *body]]
    return "\n".join(lines)


def short(value: Any) -> str:
    """A parameter value for a console line (floats to 3 significant digits)."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
