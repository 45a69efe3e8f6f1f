"""The units a target channel and its prediction are compared in: raw intensities, or normalised like the
predictions (the prediction job's metadata or the ``prediction_units`` key says which)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from viscy.data.config import NormalizationConfig
from viscy.data.patches import normalization_for_channel, normalization_params
from viscy.data.plate import Plate
from viscy.errors import DataError
from viscy.evaluate.config import EvaluateConfig
from viscy.predict.writer import SUFFIX as PREDICTION_SUFFIX

RAW_UNITS = "raw intensity"


@dataclass(frozen=True)
class ChannelUnits:
    """The units one target channel is compared in.

    ``normalization`` is None for raw intensities, else how the target is normalised to match the prediction;
    ``origin`` says where that came from (the prediction job's metadata or the ``prediction_units`` key).
    """

    normalization: NormalizationConfig | None
    origin: str

    @property
    def label(self) -> str:
        """Human-readable units, e.g. ``normalized (fov_statistics mean/std)``."""
        n = self.normalization
        return RAW_UNITS if n is None else f"normalized ({n.level} {n.subtrahend}/{n.divisor})"


def resolve_units(config: EvaluateConfig, job: dict[str, Any], pred_root: Path) -> list[ChannelUnits]:
    """Units each target channel is compared in: from the prediction job's metadata or ``prediction_units``.

    Raises
    ------
    DataError
        If the units are unknown (no metadata and ``prediction_units: auto``) or the config contradicts the
        metadata.
    """
    job_norms = {}
    for entry in job.get("target_normalization") or []:
        spec = NormalizationConfig(**entry)
        for ch in spec.channels or []:
            job_norms[ch] = spec
    fallback = [*(config.target_normalization or []), NormalizationConfig()]
    out = []
    for ch in config.target_channels:
        known: str | None = None
        # The job's metadata describes only the channels it wrote: <target>_prediction.
        if ch in job.get("targets", []) and config.prediction_suffix == PREDICTION_SUFFIX:
            if job.get("denormalized") is True:
                known = "raw"
            elif ch in job_norms:
                known = "normalized"
        name = ch + config.prediction_suffix
        if config.prediction_units == "auto" and known is None:
            raise DataError(
                f"the units of prediction channel {name!r} in {pred_root} are unknown: the store has no `viscy "
                "predict` metadata for it (.zattrs['viscy_prediction']). Set prediction_units: normalized "
                "(targets are then normalised with target_normalization, default fov_statistics median/iqr) "
                "or prediction_units: raw, e.g. --prediction_units raw"
            )
        if config.prediction_units != "auto" and known is not None and known != config.prediction_units:
            raise DataError(
                f"prediction_units: {config.prediction_units} contradicts the metadata of {pred_root}, whose "
                f"prediction job wrote {name!r} as {job.get('units', known)}; set prediction_units: auto"
            )
        units = known or config.prediction_units
        origin = "prediction job metadata" if known else "prediction_units (config)"
        if units == "raw":
            out.append(ChannelUnits(None, origin))
            continue
        spec = job_norms.get(ch) if known else None
        if spec is not None and config.target_normalization is not None:
            wanted = normalization_for_channel(ch, fallback)
            if (wanted.level, wanted.subtrahend, wanted.divisor) != (spec.level, spec.subtrahend, spec.divisor):
                raise DataError(
                    f"target_normalization ({wanted.level} {wanted.subtrahend}/{wanted.divisor}) contradicts the "
                    f"metadata of {pred_root}, whose predictions of {ch!r} are normalised with {spec.level} "
                    f"{spec.subtrahend}/{spec.divisor}; remove target_normalization"
                )
        spec = spec or normalization_for_channel(ch, fallback)
        out.append(ChannelUnits(spec.model_copy(update={"channels": [ch]}), origin))
    return out


def target_params(plate: Plate, position: str, channels: list[str], units: list[ChannelUnits]) -> np.ndarray:
    """``(C, 2)`` (subtrahend, divisor) that bring each target channel into its comparison units.

    Raw channels get (0, 1) and are left untouched; statistics come from the plate's ``normalization`` zattrs.

    Raises
    ------
    DataError
        Naming the ``viscy preprocess`` command that writes the missing statistics.
    """
    params = np.tile(np.asarray([0.0, 1.0], np.float32), (len(channels), 1))
    missing = []
    meta = plate.position_attrs(position).get("normalization") or {}
    for i, (ch, u) in enumerate(zip(channels, units, strict=True)):
        if u.normalization is None:
            continue
        try:
            params[i] = normalization_params(meta, [ch], [u.normalization])[0]
        except DataError:
            missing.append((ch, u))
    if missing:
        names = " ".join(ch for ch, _ in missing)
        what = ", ".join(f"{u.normalization.level} {u.normalization.subtrahend}/{u.normalization.divisor} of {ch!r}"
                         for ch, u in missing)
        raise DataError(
            f"position {position} of {plate.root} has no statistics {what}, needed to normalise the target like the "
            f"predictions (they are in normalised units); run `viscy preprocess --data_path {plate.root} "
            f"--channels {names}` first (it adds statistics and keeps the existing ones)"
        )
    return params
