"""The search space of ``viscy tune``: dotted training-config keys, checked by the training schema itself.

A trial's config is the base training config with each searched key replaced, then validated as a
:class:`~viscy.train.config.TrainConfig` (and, where a searched key can change the model or what it must fit,
checked by :func:`~viscy.train.check.check_model`, as ``viscy train`` does). Choices are sent to Optuna as JSON
strings (Optuna's categorical values must be scalars, and a patch size or a normalisation list is not), and
decoded for the trial.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

from viscy.config import ConfigError, canonical_key, format_validation_error, set_dotted
from viscy.train.config import SEGMENTATION_SCORES, TrainConfig
from viscy.tune.config import SearchParam, TuneConfig

TRAIN_SECTIONS = tuple(TrainConfig.model_fields)
# Keys the model/data check reads: a trial searching one of them gets the check (torch, a meta-device model).
MODEL_KEYS = ("model", "trainer.fcmae", "data.source_channels", "data.target_channels", "data.z_window_size",
              "data.target_2d", "data.yx_patch_size")


def base_tree(config: TuneConfig) -> dict[str, Any]:
    """The training part of a tune config as a plain tree, with every ``fixed`` value of the space applied."""
    tree = json.loads(config.model_dump_json(include=set(TRAIN_SECTIONS)))
    for key, param in config.search.space.items():
        if param.kind == "fixed":
            set_dotted(tree, key, param.fixed)
    return tree


def encode_choice(value: Any) -> str:
    """A choice value as Optuna sees it (a JSON string)."""
    return json.dumps(value)


def decode_params(params: dict[str, Any], space: dict[str, SearchParam]) -> dict[str, Any]:
    """Tune's sampled values as training-config values (choices decoded from JSON)."""
    out = {}
    for key, value in params.items():
        param = space.get(key)
        is_choice = param is not None and param.kind == "choice" and isinstance(value, str)
        out[key] = json.loads(value) if is_choice else value
    return out


def trial_tree(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``base`` with each dotted key of ``params`` (already decoded) replaced."""
    tree = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(tree, key, value)
    return tree


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> TrainConfig:
    """Validate one trial's training config; the error names the searched key like ``viscy train`` would."""
    try:
        return TrainConfig.model_validate(trial_tree(base, params))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, TrainConfig)) from None


def changes_model(keys: Iterable[str]) -> bool:
    """Whether any of these dotted training keys can change the model or what it must fit."""
    keys = [canonical_key(TrainConfig, k) for k in keys]
    return any(k == m or k.startswith(m + ".") for k in keys for m in MODEL_KEYS)


def checked_trial(base: dict[str, Any], params: dict[str, Any]) -> TrainConfig:
    """:func:`trial_config`, plus the model/data check where ``params`` can change the model."""
    from viscy.train.check import check_model

    config = trial_config(base, params)
    if changes_model(params):
        check_model(config)
    return config


def _one_line(exc: ConfigError) -> str:
    """A training-schema error as one line (its problems joined by '; ')."""
    return str(exc).removeprefix("invalid configuration:\n  ").replace("\n  ", "; ")


def _space_problems(
    config: TuneConfig, base: dict[str, Any], check: Callable[[dict[str, Any], dict[str, Any]], TrainConfig]
) -> list[str]:
    """What ``check`` (a trial's config from ``base``) refuses at the extremes of each searched key."""
    problems = []
    for key, param in config.search.space.items():
        if key.split(".")[0] not in TRAIN_SECTIONS:
            problems.append(
                f"search.space: {key!r} is not a training-config key; keys start with one of "
                f"{', '.join(TRAIN_SECTIONS)} (e.g. trainer.lr)"
            )
            continue
        for value in param.extremes():
            try:
                check(base, {key: value})
            except ConfigError as exc:
                problems.append(f"search.space.{key} value {value!r}: {_one_line(exc)}")
                break
    return problems


def check_space(config: TuneConfig) -> None:
    """Reject keys and values the training schema refuses, before anything starts.

    Every key is tried at each of its extremes (both ends of a range, every choice) in the base config, so an
    unknown key, a value out of the schema's bounds or a model that cannot take a value fails here with the
    training schema's own message (the model/data check runs for the base config once, and per value only for
    keys that can change the model). ``points_to_evaluate`` must name searched keys only and validate too.
    """
    from viscy.train.check import check_model

    base = base_tree(config)
    # The schema alone first: a misspelt key is named in a second, before the model check imports torch.
    problems = _space_problems(config, base, trial_config)
    if problems:
        raise ConfigError("invalid search:\n  " + "\n  ".join(problems))
    check_model(trial_config(base, {}))
    problems = _space_problems(config, base, checked_trial)
    searched = {k for k, p in config.search.space.items() if p.kind != "fixed"}
    for i, point in enumerate(config.search.points_to_evaluate):
        unknown = sorted(set(point) - searched)
        if unknown:
            problems.append(
                f"search.points_to_evaluate[{i}]: {', '.join(unknown)} not searched; searched keys: "
                f"{', '.join(sorted(searched)) or 'none'}"
            )
            continue
        full = complete_point(point, config)
        for key, value in full.items():
            param = config.search.space[key]
            inside = (
                value in (param.choice or []) if param.kind == "choice"
                else value is not None and min(param.extremes()) <= value <= max(param.extremes())
            )
            if not inside:
                given = "gives" if key in point else "omits it and the base config has"
                problems.append(
                    f"search.points_to_evaluate[{i}] {given} {key}={value!r}, outside search.space.{key}; give a "
                    "value inside the space"
                )
        try:
            checked_trial(base, full)
        except ConfigError as exc:
            problems.append(f"search.points_to_evaluate[{i}]: {_one_line(exc)}")
    if not searched:
        problems.append("search.space has only fixed values; search at least one key (loguniform, uniform, int, "
                        "choice)")
    if problems:
        raise ConfigError("invalid search:\n  " + "\n  ".join(problems))


def allowed_metrics(config: TrainConfig) -> list[str]:
    """Metrics a training run reports: train/val loss and validation metrics per target channel."""
    from viscy.train.module import METRICS

    targets = config.data.source_channels if config.trainer.fcmae.pretraining else config.data.target_channels
    scored = [] if config.trainer.fcmae.pretraining else config.trainer.val_segmentation.channels
    return (
        ["val_loss", "train_loss"]
        + [f"val_{m}_{c}" for c in targets for m in METRICS]
        + [f"val_{s}_{c}" for c in scored for s in SEGMENTATION_SCORES]
    )


def check_metric(config: TuneConfig) -> None:
    """The metric must be one that training reports (validation ones need a validation split), and mean the same
    thing in every trial (:func:`check_comparable`)."""
    allowed = allowed_metrics(config)
    metric = config.search.metric
    if metric not in allowed:
        score = next((s for s in SEGMENTATION_SCORES if metric.startswith(f"val_{s}_")), None)
        if score is not None and metric.removeprefix(f"val_{score}_") in config.data.target_channels:
            channel = metric.removeprefix(f"val_{score}_")
            raise ConfigError(
                f"search.metric {metric} is reported only for channels whose validation predictions are segmented: "
                f"add {channel} to trainer.val_segmentation.channels (and trainer.val_segmentation.labels: "
                f"{{{channel}: <label image>}} to score against the plate's ground truth)"
            )
        raise ConfigError(f"search.metric {metric!r} is not reported by training; choose one of {', '.join(allowed)}")
    if metric != "train_loss" and config.data.val_fraction <= 0:
        raise ConfigError(
            f"search.metric {metric} needs validation FOVs but data.val_fraction is 0; set data.val_fraction or use "
            "train_loss"
        )
    check_comparable(config)


LOSS_METRICS = ("train_loss", "val_loss")


def metric_definition(train: TrainConfig, metric: str) -> tuple | None:
    """What ``metric`` measures in a trial of config ``train``: trials whose definitions are equal are comparable.

    Follows ``viscy.train.module.VSModule``: FCMAE pre-training reconstructs the masked source (a masked MSE, the
    metrics per source channel, the input masked by ``fcmae.mask_ratio``); otherwise the losses are
    ``viscy.train.loss.MixedLoss``'s weighted mixture, whose MS-SSIM term has as many scales as the patch allows,
    and the per-channel metrics compare prediction and target whatever the loss. None: not reported.
    """
    if metric not in allowed_metrics(train):
        return None
    fcmae = train.trainer.fcmae
    if fcmae.pretraining:
        return ("fcmae pre-training", fcmae.mask_ratio)
    for score in SEGMENTATION_SCORES:
        if metric.startswith(f"val_{score}_"):
            seg, channel = train.trainer.val_segmentation, metric.removeprefix(f"val_{score}_")
            reference = f"labels/{seg.labels[channel]}" if channel in seg.labels else "segmented target"
            return ("segmentation", seg.method, seg.model if seg.method == "cellpose" else None, seg.diameter,
                    reference)
    if metric not in LOSS_METRICS:
        return ("virtual staining",)
    trainer = train.trainer
    scales = None
    if trainer.ms_dssim_alpha:
        from viscy.train.loss import ms_ssim_scales

        scales = ms_ssim_scales(min(train.data.yx_patch_size))
    return ("mixed loss", (trainer.l1_alpha, trainer.l2_alpha, trainer.ms_dssim_alpha), scales)


def _why_incomparable(definitions: list[tuple | None]) -> str:
    """How the definitions of one metric across a key's values differ, in words."""
    kinds = {d[0] if d else None for d in definitions}
    if len(kinds) > 1:
        return ("it switches FCMAE pre-training, which reconstructs the masked source (a masked MSE, metrics per "
                "source channel) instead of predicting the targets")
    if kinds == {"segmentation"}:
        return ("it changes the segmenter or the reference that the predictions' masks are matched against, so "
                "trials count matches of different segmentations")
    if kinds == {"fcmae pre-training"}:
        return "the FCMAE mask ratio sets how much of the input is hidden, so every loss and metric scores another task"
    if len({d[1] for d in definitions}) > 1:
        return ("it changes the weights of the loss mixture l1_alpha*L1 + l2_alpha*MSE + ms_dssim_alpha*(1 - MS-SSIM), "
                "so trials report losses on different scales")
    return "it changes how many scales the loss's MS-SSIM term has (the patch size bounds them)"


def incomparable_keys(config: TuneConfig) -> list[tuple[str, str, list[str]]]:
    """Searched keys whose values change what ``search.metric`` measures.

    Returns
    -------
    list of (key, why, metrics)
        The key, how it changes the metric, and the metrics training reports that it leaves alone.
    """
    base = base_tree(config)
    metric = config.search.metric
    out = []
    for key, param in config.search.space.items():
        if param.kind == "fixed":
            continue
        trials = [trial_config(base, {key: value}) for value in param.extremes()]
        definitions = [metric_definition(t, metric) for t in trials]
        if len(set(definitions)) == 1:
            continue
        steady = []
        for other in allowed_metrics(config):
            others = {metric_definition(t, other) for t in trials}
            if len(others) == 1 and None not in others:
                steady.append(other)
        out.append((key, _why_incomparable(definitions), steady))
    return out


def check_comparable(config: TuneConfig) -> None:
    """Refuse a search whose trials' ``search.metric`` values measure different things (a warning with
    ``search.allow_incomparable_metric``).

    Raises
    ------
    ConfigError
        Naming each such key, how it changes the metric, and the metrics that do not depend on it.
    """
    problems = []
    metric = config.search.metric
    for key, why, steady in incomparable_keys(config):
        if steady:
            fix = f"rank by a metric that does not depend on it: {', '.join(steady)} (e.g. --search.metric {steady[0]})"
        else:
            fix = "no metric training reports is independent of it: fix it ({fixed: value}) and compare sweeps instead"
        problems.append(f"search.space.{key} changes what {metric} measures: {why}; {fix}")
    if not problems:
        return
    if config.search.allow_incomparable_metric:
        for problem in problems:
            warnings.warn(
                f"{problem}. search.allow_incomparable_metric is true, so the trials are ranked anyway", stacklevel=2
            )
        return
    raise ConfigError(
        f"search.metric {metric} would rank numbers that do not measure the same thing:\n  "
        + "\n  ".join(problems)
        + "\n  (set search.allow_incomparable_metric: true to search anyway)"
    )


def tune_domains(config: TuneConfig) -> dict[str, Any]:
    """Ray Tune search domains of the searched (not fixed) keys."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, p in config.search.space.items():
        if p.kind == "loguniform":
            out[key] = tune.loguniform(*p.loguniform)
        elif p.kind == "uniform":
            out[key] = tune.uniform(*p.uniform)
        elif p.kind == "int":
            out[key] = tune.randint(p.int_range[0], p.int_range[1] + 1)  # randint excludes the upper bound
        elif p.kind == "choice":
            out[key] = tune.choice([encode_choice(v) for v in p.choice])
    return out


def _get_dotted(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def complete_point(point: dict[str, Any], config: TuneConfig) -> dict[str, Any]:
    """A ``points_to_evaluate`` entry with every searched key: those it omits take the base config's value."""
    base = base_tree(config)
    searched = [k for k, p in config.search.space.items() if p.kind != "fixed"]
    return {k: point[k] if k in point else _get_dotted(base, k) for k in searched}


def encode_point(point: dict[str, Any], config: TuneConfig) -> dict[str, Any]:
    """A complete ``points_to_evaluate`` entry in Tune's encoding (choices as JSON strings)."""
    space = config.search.space
    return {k: encode_choice(v) if space[k].kind == "choice" else v for k, v in complete_point(point, config).items()}


def largest_trainer(config: TuneConfig) -> Any:
    """The trainer section of the trial that asks most of the cluster (for the fits-at-all check)."""
    base = base_tree(config)
    biggest: dict[str, Any] = {}
    for key in ("trainer.num_workers", "trainer.cpus_per_worker", "trainer.gpus_per_worker", "trainer.use_gpu"):
        param = config.search.space.get(key)
        if param is not None:
            biggest[key] = max(param.extremes())
    return trial_config(base, biggest).trainer


def max_epochs(config: TuneConfig) -> int:
    """The most epochs any trial trains (ASHA's ``max_t``)."""
    param = config.search.space.get("trainer.max_epochs")
    return int(max(param.extremes())) if param is not None else config.trainer.max_epochs
