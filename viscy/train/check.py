"""The model/data check of ``viscy train``: the model is resolved and its spec built once, on the driver.

Config validation checks values only. :func:`check_model` resolves the model (architecture, preset, or the
card of a checkpoint), builds its :class:`~viscy.models.ModelSpec` on torch's meta device (no weights),
checks it against the ``data`` section and returns the :class:`~viscy.models.ModelCard` that training writes
with the weights. ``run_train`` calls it before Ray starts and sends the card to the Ray Train workers, which
build the network from the card's name and kwargs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from viscy.config import ConfigError
from viscy.errors import ModelError, ViscyError
from viscy.models.card import ModelCard
from viscy.train.config import DEFAULT_TRAIN_MODEL, TrainConfig


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


def check_val_segmentation(config: TrainConfig, fovs: list[tuple[str, str]]) -> None:
    """Check ``trainer.val_segmentation`` against the plates: validation FOVs exist, with any ground-truth labels.

    Raises
    ------
    ConfigError
        If segmentation scores are asked for without validation FOVs, or for a segmenter that cannot run here.
    DataError
        If a validation FOV lacks a named label image.
    """
    from viscy.segment.segmenters import check_segmenter
    from viscy.train.datasource import check_val_labels, split_fovs

    seg = config.trainer.val_segmentation
    if not seg.channels:
        return
    if not split_fovs(fovs, config.data).val:
        raise ConfigError(
            "trainer.val_segmentation scores validation predictions but there are no validation FOVs; set "
            "data.val_fraction or data.val_positions"
        )
    try:
        check_segmenter(seg)
    except ViscyError as exc:
        raise ConfigError(f"trainer.val_segmentation: {exc}") from None
    if seg.labels:
        check_val_labels(fovs, config.data, seg.label_names())


def check_model(config: TrainConfig, run_name: str | None = None) -> ModelCard:
    """The card of the model ``config`` trains, once the model is known to fit the data section.

    Parameters
    ----------
    config
        The training config (already validated).
    run_name
        Recorded in the card's provenance with the git commit.

    Raises
    ------
    ConfigError
        For an unknown model (listing the allowed names), kwargs its constructor refuses, or a model that does
        not fit the data (channels, Z window, target depth, YX patch size); each problem names keys and a fix.
    """
    from viscy.data.patches import explicit_normalization
    from viscy.models import model_spec, resolve_model_source, training_kwargs

    mc, data, fcmae = config.model, config.data, config.trainer.fcmae
    shape = data.model_shape(fcmae.pretraining)
    try:
        name, kwargs, _ = resolve_model_source(
            mc.name or (None if mc.checkpoint else DEFAULT_TRAIN_MODEL), mc.kwargs, mc.checkpoint
        )
        kwargs = training_kwargs(name, kwargs, fcmae.pretraining, fcmae.mask_ratio, shape)
        spec = model_spec(name, kwargs)
    except ModelError as exc:
        given = mc.name or mc.checkpoint or DEFAULT_TRAIN_MODEL
        raise ConfigError(f"invalid configuration:\n  model {given}: {exc}") from None
    targets = data.source_channels if fcmae.pretraining else data.target_channels
    key = (
        "data.source_channels (pre-training reconstructs the sources)" if fcmae.pretraining else "data.target_channels"
    )
    problems = spec.check_data(
        data.source_channels, targets, data.z_window_size, shape["out_depth"], data.yx_patch_size, key
    )
    if problems:
        raise ConfigError(
            f"invalid configuration:\n  model {name} does not fit the data:\n    - " + "\n    - ".join(problems)
        )
    channels = [*data.source_channels, *data.target_channels]
    return ModelCard(
        name=name,
        kwargs=kwargs,
        spec=spec,
        source_channels=list(data.source_channels),
        target_channels=list(targets),
        normalization=[n.model_dump(mode="json") for n in explicit_normalization(channels, data.normalization)],
        training={"run_name": run_name, "git_commit": git_commit()},
    )
