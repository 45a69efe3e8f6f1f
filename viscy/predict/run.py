"""``viscy predict``: whole plates through a torch or ONNX model on Ray Data, resumable.

The driver validates everything (channels, statistics, existing outputs) before writing anything, creates
the output arrays, then streams work units ``(plate, FOV, t, z-block)`` through an actor pool
(``map_batches`` with a callable class: each actor loads the model once, then reads, predicts tile by tile
with :mod:`viscy.predict.tiling` and writes whole chunks). As units come back the driver marks FOVs
complete; a rerun of the same job skips them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from viscy.config import save_config
from viscy.data.config import NormalizationConfig
from viscy.data.patches import denormalize, normalization_for_channel, normalization_params, normalize
from viscy.data.plate import Plate
from viscy.errors import DataError, ModelError, ShapeError
from viscy.models.card import ModelCard
from viscy.predict.backends import describe_model, load_backend
from viscy.predict.config import PredictConfig
from viscy.predict.tiling import TilingOptions, predict_stack
from viscy.predict.writer import (
    RESUMING,
    OutputTarget,
    check_output,
    finish_output,
    is_complete,
    mark_complete,
    prediction_names,
    prepare_output,
    resolve_output_version,
    write_block,
)

log = logging.getLogger(__name__)

FALLBACK_SOURCES = ["Phase3D"]
FALLBACK_TARGETS = ["Nuclei", "Membrane"]


# ------------------------------------------------------------------------------------------ resolving
def resolve_channels(config: PredictConfig, card: ModelCard) -> tuple[list[str], list[str]]:
    """Source and target channel names: config, else the model card (checkpoint, preset, ONNX), else VisCy's."""
    spec = card.spec
    sources = config.source_channels or card.source_channels or None
    targets = config.target_channels or card.target_channels or None
    if sources is None and spec.in_channels == len(FALLBACK_SOURCES):
        sources = FALLBACK_SOURCES
    if targets is None and spec.out_channels <= len(FALLBACK_TARGETS):
        targets = FALLBACK_TARGETS[: spec.out_channels]
    if sources is None or len(sources) != spec.in_channels:
        raise ModelError(
            f"the model takes {spec.in_channels} input channel(s) but source_channels is {sources}; "
            f"set source_channels to {spec.in_channels} channel name(s)"
        )
    if targets is None or len(targets) != spec.out_channels:
        raise ModelError(
            f"the model predicts {spec.out_channels} channel(s) but target_channels is {targets}; "
            f"set target_channels to {spec.out_channels} name(s)"
        )
    return list(sources), list(targets)


def resolve_normalization(config: PredictConfig, card: ModelCard, sources: list[str]) -> list[NormalizationConfig]:
    """Config normalisation, else the model card's, else fov median/iqr of the sources."""
    if config.normalization is not None:
        return list(config.normalization)
    if card.normalization:
        return [NormalizationConfig(**group) for group in card.normalization]
    return [NormalizationConfig(channels=list(sources))]


def tiling_options(config: PredictConfig, card: ModelCard) -> TilingOptions:
    """Tiling options from the config and the model's spec."""
    return TilingOptions.for_model(
        card.spec,
        config.tile_yx,
        overlap=config.tile_overlap,
        blend=config.blend,
        tta=config.tta,
        tta_reduction=config.tta_reduction,
        z_stride=config.z_stride,
        batch_size=config.batch_size,
    )


def fingerprint(config: PredictConfig, sources: list[str], targets: list[str], norms: list[NormalizationConfig]) -> str:
    """Hash of everything that changes the predicted values (not the parallelism)."""

    def file_id(p: Path | None) -> Any:
        if p is None or not Path(p).exists():
            return None
        st = Path(p).stat()
        return [str(Path(p).resolve()), st.st_size, st.st_mtime_ns]

    key = {
        "model": config.model.model_dump(mode="json") if config.model else None,
        "checkpoint": file_id(config.model.checkpoint) if config.model else None,
        "onnx": file_id(config.onnx),
        "sources": sources,
        "targets": targets,
        "normalization": [n.model_dump(mode="json") for n in norms],
        "denormalize": config.denormalize,
        "tiling": [config.tile_yx, config.tile_overlap, config.blend, config.tta, config.tta_reduction],
        "z_stride": config.z_stride,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _output_for(config: PredictConfig, plate: Plate) -> Path | None:
    if config.output is None:
        return None
    if len(config.data_path) == 1:
        return Path(config.output)
    return Path(config.output) / plate.root.name


def _target_norms(norms: list[NormalizationConfig]) -> list[NormalizationConfig]:
    return list(norms) + [NormalizationConfig()]


def target_normalization(targets: list[str], norms: list[NormalizationConfig]) -> list[dict[str, Any]]:
    """One explicit normalisation entry per target channel: what a prediction in normalised units means.

    A target without its own entry falls back to FOV median/iqr (VisCy's default), as de-normalisation does.
    """
    out = []
    for ch in targets:
        spec = normalization_for_channel(ch, _target_norms(norms))
        out.append({**spec.model_dump(mode="json"), "channels": [ch]})
    return out


def _needs_stats(sources: list[str], norms: list[NormalizationConfig], denorm: bool) -> bool:
    """Whether a FOV's stored statistics are read (to normalise sources or de-normalise targets)."""
    return denorm or any(normalization_for_channel(c, norms) for c in sources)


# -------------------------------------------------------------------------------------------- actor
class PredictActor:
    """Ray Data callable class: loads the model once, then reads, predicts and writes whole work units."""

    def __init__(
        self,
        card: ModelCard,
        checkpoint: str | None,
        onnx: str | None,
        opts: dict,
        sources: list[str],
        targets: list[str],
        norms: list[dict],
        denorm: bool,
        outputs: dict[str, OutputTarget],
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        self.predict_fn = load_backend(card, checkpoint, Path(onnx) if onnx else None, device=device, threads=threads)
        self.opts = TilingOptions(**opts)
        self.sources, self.targets = sources, targets
        self.norms = [NormalizationConfig(**n) for n in norms]
        self.denorm = denorm
        self.outputs = outputs
        self._plates: dict[str, Plate] = {}

    def _plate(self, path: str) -> Plate:
        if path not in self._plates:
            self._plates[path] = Plate(path)
        return self._plates[path]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seconds = []
        for i in range(len(batch["fov"])):
            t0 = time.perf_counter()
            predict_unit(
                self._plate(str(batch["plate"][i])),
                str(batch["fov"][i]),
                int(batch["t"][i]),
                (int(batch["z0"][i]), int(batch["z1"][i])),
                self.predict_fn,
                self.opts,
                self.sources,
                self.targets,
                self.norms,
                self.denorm,
                self.outputs[str(batch["plate"][i])],
            )
            seconds.append(time.perf_counter() - t0)
        return {"plate": batch["plate"], "fov": batch["fov"], "seconds": np.asarray(seconds)}


def predict_unit(
    plate: Plate,
    fov: str,
    t: int,
    z_range: tuple[int, int],
    predict_fn,
    opts: TilingOptions,
    sources: list[str],
    targets: list[str],
    norms: list[NormalizationConfig],
    denorm: bool,
    target: OutputTarget,
) -> None:
    """Read, normalise, predict (tiled), de-normalise and write one ``(FOV, t, z-block)`` unit."""
    n_z = plate.info(fov).shape[2]
    src_idx = plate.channel_indices(sources)
    meta = plate.normalization(fov) if _needs_stats(sources, norms, denorm) else {}
    params = normalization_params(meta, sources, norms)

    def read(idx: np.ndarray) -> np.ndarray:
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        data = plate.read(fov, t, src_idx, slice(lo, hi))[:, idx - lo]
        return normalize(data.astype(np.float32), params)

    pred = predict_stack(read, n_z, predict_fn, opts, z_range)
    if denorm:
        pred = denormalize(pred, normalization_params(meta, targets, _target_norms(norms)))
    write_block(target, fov, t, z_range[0], pred)


# -------------------------------------------------------------------------------------------- driver
def _validate_plate(
    plate: Plate,
    fovs: list[str],
    sources: list[str],
    targets: list[str],
    norms: list[NormalizationConfig],
    denorm: bool,
    append: bool,
) -> None:
    plate.channel_indices(sources)
    needs_stats = _needs_stats(sources, norms, denorm)
    for fov in fovs:
        inf = plate.info(fov)
        if needs_stats:
            meta = plate.normalization(fov)
            normalization_params(meta, sources, norms)
            if denorm:
                normalization_params(meta, targets, _target_norms(norms))
        if append and not np.issubdtype(inf.dtype, np.floating):
            raise DataError(
                f"{plate.root}/{fov} stores {inf.dtype}; appending float predictions to it would truncate them. "
                "Predict into a new store with output instead"
            )


def _units(plate: Plate, fov: str, z_block: int | None, z_chunk: int) -> list[dict[str, Any]]:
    t_n, _, z_n, _, _ = plate.info(fov).shape
    block = z_n if z_block is None else -(-z_block // z_chunk) * z_chunk
    return [
        {"plate": str(plate.path), "fov": fov, "t": t, "z0": z0, "z1": min(z0 + block, z_n)}
        for t in range(t_n)
        for z0 in range(0, z_n, block)
    ]


def _use_gpu(setting: Any) -> bool:
    import ray

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if setting is True and not has_gpu:
        raise ModelError("use_gpu: true but the Ray cluster has no GPU; set use_gpu: auto or false")
    return bool(has_gpu) if setting == "auto" else bool(setting)


@dataclass(frozen=True)
class PredictResult:
    """What ``viscy predict`` wrote.

    Attributes
    ----------
    outputs
        Per input plate, in ``data_path`` order: the store holding its predictions (the plate itself when
        appending).
    channels
        Prediction channel names (``<target>_prediction``), in raw target units if ``denormalized``.
    denormalized
        Whether predictions were mapped back to raw intensities.
    fovs, skipped, units
        FOVs predicted now, FOVs already complete (resumed job), work units run.
    megapixels, seconds, unit_seconds
        Pixels predicted, wall time, and time spent inside the actors.
    """

    outputs: list[Path]
    channels: list[str]
    denormalized: bool
    fovs: int
    skipped: int
    units: int
    megapixels: float
    seconds: float
    unit_seconds: float


class PlatePlan(NamedTuple):
    """One input plate's share of the job, validated before anything is written."""

    plate: Plate
    fovs: list[str]
    output: Path | None  # None: append the prediction channels to the plate
    action: str  # what check_output decided: a new store, resume, replace, ...
    version: str  # NGFF version of a new store


def run_predict(config: PredictConfig) -> PredictResult:
    """Predict every selected FOV of every plate (resuming a killed job); see the module docstring."""
    t_start = time.perf_counter()
    card = describe_model(config.model, config.onnx)
    sources, targets = resolve_channels(config, card)
    norms = resolve_normalization(config, card, sources)
    opts = tiling_options(config, card)
    fp = fingerprint(config, sources, targets, norms)
    # 1. validate every plate and output before writing anything
    plans = plan_plates(config, sources, targets, norms, fp)
    # 2. create outputs, list the units of incomplete FOVs (a rerun skips the complete ones)
    job = _job_metadata(config, card, sources, targets, norms)
    outputs, units, skipped = _prepare_outputs(config, plans, targets, fp, job)
    remaining: dict[tuple[str, str], int] = defaultdict(int)  # units left per (plate, FOV)
    for u in units:
        remaining[(u["plate"], u["fov"])] += 1
    n_fovs = len(remaining)
    megapixels = 0.0
    for plan in plans:
        for fov in plan.fovs:
            if (str(plan.plate.path), fov) in remaining:
                t_n, _, z_n, y, x = plan.plate.info(fov).shape
                megapixels += t_n * z_n * y * x / 1e6

    def result(seconds: float, unit_seconds: float) -> PredictResult:
        return PredictResult(
            outputs=[t.path for t in outputs.values()],
            channels=prediction_names(targets),
            denormalized=config.denormalize,
            fovs=n_fovs,
            skipped=skipped,
            units=len(units),
            megapixels=megapixels,
            seconds=seconds,
            unit_seconds=unit_seconds,
        )

    if not units:
        for target in outputs.values():
            finish_output(target)  # a replacement completed by a killed job
        print(f"viscy predict: nothing to do ({skipped} FOV(s) already complete)")
        return result(time.perf_counter() - t_start, 0.0)

    # 3. stream units through the actor pool, marking each FOV complete as its last unit comes back
    _start_ray(outputs)
    ds, gpu = _actor_pool_dataset(config, card, opts, sources, targets, norms, outputs, units)
    unit_seconds = _collect(ds, remaining, outputs, fp, targets, config.progress)
    # 4. publish: every FOV is complete, the outputs are finished
    for target in outputs.values():
        finish_output(target)
    elapsed = time.perf_counter() - t_start
    where = ", ".join(str(t.path) for t in outputs.values())
    print(
        f"viscy predict: {n_fovs} FOV(s), {len(units)} unit(s), {megapixels:.1f} Mpx in {elapsed:.1f} s "
        f"({megapixels / max(elapsed, 1e-9):.2f} Mpx/s; {unit_seconds:.1f} s inside {config.num_actors} actor(s), "
        f"{'GPU' if gpu else 'CPU'}); {skipped} FOV(s) already complete; channels "
        f"{prediction_names(targets)} in {where}"
    )
    return result(elapsed, unit_seconds)


def plan_plates(
    config: PredictConfig, sources: list[str], targets: list[str], norms: list[NormalizationConfig], fp: str
) -> list[PlatePlan]:
    """Every plate's FOVs, output and action, once plates, statistics and outputs are checked; nothing is written.

    Raises
    ------
    DataError
        For outputs that collide or contain their input, a plate viscy cannot append to, missing statistics, or
        an output that holds something else (naming the fix).
    """
    plans = []
    seen_outputs: set[Path] = set()
    for path in config.data_path:
        plate = Plate(path)
        fovs = plate.select(config.positions)
        output = _output_for(config, plate)
        written = (output or plate.root).resolve()
        if written in seen_outputs:
            raise DataError(f"two input plates would write to {written}; list each plate once, with distinct names")
        seen_outputs.add(written)
        if output is None and plate.zarr_format != 2:
            raise DataError(
                f"{plate.root} is an NGFF {plate.version} (zarr v{plate.zarr_format}) plate; viscy appends prediction "
                "channels to NGFF 0.4 (zarr v2) plates only. Set output to a new store to predict into"
            )
        if output is not None:
            if written == plate.root.resolve():
                raise DataError(f"output {output} is the input plate; set output: null to append channels instead")
            if plate.root.resolve().is_relative_to(written):
                raise DataError(f"output {output} contains the input plate {plate.root}; choose another output")
        # NGFF version of new stores: "auto" (a config without ngff_version) keeps each input plate's.
        version = resolve_output_version(plate, config.ngff_version, output)
        _validate_plate(plate, fovs, sources, targets, norms, config.denormalize, output is None)
        action = check_output(plate, fovs, output, targets, fp, config.overwrite, version)
        plans.append(PlatePlan(plate, fovs, output, action, version))
    return plans


def _job_metadata(
    config: PredictConfig, card: ModelCard, sources: list[str], targets: list[str], norms: list[NormalizationConfig]
) -> dict[str, Any]:
    """What the outputs record about the job (``viscy evaluate`` reads the units and normalisation)."""
    return {
        "model": card.name,
        "targets": targets,
        "sources": sources,
        "denormalized": config.denormalize,
        # How sources were normalised and how targets map to prediction units (evaluate reads this).
        "normalization": [n.model_dump(mode="json") for n in norms],
        "target_normalization": target_normalization(targets, norms),
        "units": "raw intensity (denormalized)" if config.denormalize else "normalized",
    }


def _prepare_outputs(
    config: PredictConfig, plans: list[PlatePlan], targets: list[str], fp: str, job: dict[str, Any]
) -> tuple[dict[str, OutputTarget], list[dict[str, Any]], int]:
    """Create every output (config and log beside it); (outputs by plate, units to run, FOVs already complete)."""
    from viscy.console import place_log

    outputs: dict[str, OutputTarget] = {}
    units: list[dict[str, Any]] = []
    skipped = 0
    for plate, fovs, output, action, version in plans:
        target = prepare_output(plate, fovs, output, targets, fp, action, job, version)
        outputs[str(plate.path)] = target
        save_config(config, target.config_dir, "predict")
        place_log(target.config_dir, "viscy_predict.log")
        z_chunk = plate.info(fovs[0]).chunks[2] if target.append else 1
        for fov in fovs:
            if action in RESUMING and is_complete(target, fov, fp):
                skipped += 1
                continue
            units.extend(_units(plate, fov, config.z_block, z_chunk))
    return outputs, units, skipped


def _start_ray(outputs: dict[str, OutputTarget]) -> None:
    """Start (or join) Ray, say where outputs are not shared across nodes, and set up Ray Data."""
    import ray

    from viscy.ray_utils import check_shared_path, ensure_ray

    ensure_ray()
    for target in outputs.values():  # actors on every node write the predictions
        where = Path(target.path)
        note = check_shared_path(str(where if where.is_dir() else where.parent), "output")
        if note:
            print(f"viscy predict: {note}")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.op_resource_reservation_enabled = False
    ctx.raise_original_map_exception = True  # a ViscyError in an actor reaches the CLI as itself


def _actor_pool_dataset(
    config: PredictConfig,
    card: ModelCard,
    opts: TilingOptions,
    sources: list[str],
    targets: list[str],
    norms: list[NormalizationConfig],
    outputs: dict[str, OutputTarget],
    units: list[dict[str, Any]],
) -> tuple[Any, bool]:
    """The units mapped through a pool of :class:`PredictActor` (the Ray Data pipeline); whether it uses GPUs."""
    import ray

    gpu = _use_gpu(config.use_gpu)
    cpus_total = ray.cluster_resources().get("CPU", 1)
    cpus = min(config.num_cpus_per_actor, cpus_total / config.num_actors)
    if cpus < config.num_cpus_per_actor:
        log.warning("only %s CPUs for %d actors; using %.2f CPUs per actor", cpus_total, config.num_actors, cpus)
    checkpoint = config.model.checkpoint if config.model else None
    actor_kwargs = {
        "card": card,  # actors build exactly what the driver described
        "checkpoint": str(checkpoint) if checkpoint else None,
        "onnx": str(config.onnx) if config.onnx else None,
        "opts": asdict(opts),
        "sources": sources,
        "targets": targets,
        "norms": [n.model_dump(mode="json") for n in norms],
        "denorm": config.denormalize,
        "outputs": outputs,
        "device": "cuda" if gpu else "cpu",
        "threads": max(1, int(cpus)),
    }
    ds = ray.data.from_items(units, override_num_blocks=min(len(units), 2000))
    ds = ds.map_batches(
        PredictActor,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=cpus,
        num_gpus=1 if gpu else 0,
    )
    return ds, gpu


def _collect(
    ds: Any,
    remaining: dict[tuple[str, str], int],
    outputs: dict[str, OutputTarget],
    fp: str,
    targets: list[str],
    progress: bool,
) -> float:
    """Run the pipeline and mark each FOV complete as its last unit comes back; the seconds spent in actors.

    Raises
    ------
    ShapeError
        If a FOV did not finish (a rerun resumes it).
    """
    n_fovs = len(remaining)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(remaining.values()), desc="predict", unit="unit")
    done_fovs = 0
    unit_seconds = 0.0
    for row in ds.iter_rows():
        unit_seconds += float(row["seconds"])
        key = (str(row["plate"]), str(row["fov"]))
        remaining[key] -= 1
        if remaining[key] == 0:
            plate_path, fov = key
            mark_complete(outputs[plate_path], fov, fp, {"targets": targets, "finished": time.time()})
            done_fovs += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if done_fovs != n_fovs:
        raise ShapeError(f"only {done_fovs} of {n_fovs} FOVs finished; rerun to resume")
    return unit_seconds
