"""``viscy predict``: whole plates through a torch or ONNX model on Ray Data, resumable.

The driver validates everything (channels, statistics, existing outputs) before writing anything and creates
the output arrays (:mod:`viscy.predict.plan`), then streams work units ``(plate, FOV, t, z-block)`` through an
actor pool (``map_batches`` with a callable class: each actor loads the model once, then reads, predicts tile by
tile with :mod:`viscy.predict.tiling` and writes whole chunks). As units come back the driver marks FOVs
complete; a rerun of the same job skips them.

With ``segment`` set, a second stage with its own actors and resources follows (:mod:`viscy.predict.segmentation`):
units are then whole ``(FOV, t)`` Z stacks, the staining actors hand their predictions to it in their output
rows, and it writes NGFF label images and returns per-object rows that the driver persists per FOV.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from viscy.data.config import NormalizationConfig
from viscy.data.patches import denormalize, normalization_params, normalize
from viscy.data.plate import Plate
from viscy.errors import ModelError, ShapeError
from viscy.models.card import ModelCard
from viscy.predict.backends import describe_model, load_backend
from viscy.predict.config import PredictConfig
from viscy.predict.masks import write_object_table
from viscy.predict.plan import (
    file_id,
    fingerprint,
    job_metadata,
    needs_stats,
    plan_plates,
    prepare_outputs,
    resolve_channels,
    resolve_normalization,
    target_norms,
    tiling_options,
)
from viscy.predict.segmentation import SegmentActor, SegmentPlan, finish_fov, plan_segmentation, table_from_bytes
from viscy.predict.tiling import TilingOptions, predict_stack
from viscy.predict.writer import OutputTarget, finish_output, mark_complete, prediction_names, write_block

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- actor
class PredictActor:
    """Ray Data callable class: loads the model once, then reads, predicts and writes whole work units.

    With ``handoff`` its output rows also carry each unit's prediction (and the raw ``measure`` channels) for
    the segmentation stage, which therefore reads nothing again.
    """

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
        handoff: bool = False,
        measure: list[str] | None = None,
        block_yx: tuple[int, int] | None = None,
    ) -> None:
        self.predict_fn = load_backend(
            card, checkpoint, Path(onnx) if onnx else None, device=device, threads=threads, block_yx=block_yx
        )
        self.opts = TilingOptions(**opts)
        self.sources, self.targets = sources, targets
        self.norms = [NormalizationConfig(**n) for n in norms]
        self.denorm = denorm
        self.outputs = outputs
        self.handoff, self.measure = handoff, list(measure or [])
        self._plates: dict[str, Plate] = {}

    def _plate(self, path: str) -> Plate:
        if path not in self._plates:
            self._plates[path] = Plate(path)
        return self._plates[path]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seconds, predictions, measured = [], [], []
        for i in range(len(batch["fov"])):
            t0 = time.perf_counter()
            plate, fov, t = self._plate(str(batch["plate"][i])), str(batch["fov"][i]), int(batch["t"][i])
            pred = predict_unit(
                plate,
                fov,
                t,
                (int(batch["z0"][i]), int(batch["z1"][i])),
                self.predict_fn,
                self.opts,
                self.sources,
                self.targets,
                self.norms,
                self.denorm,
                self.outputs[str(batch["plate"][i])],
            )
            if self.handoff:  # as stored, so that the table's means are those of the written predictions
                predictions.append(pred.astype(np.float32, copy=False))
                if self.measure:
                    measured.append(plate.read(fov, t, plate.channel_indices(self.measure)))
            seconds.append(time.perf_counter() - t0)
        rows = {"plate": batch["plate"], "fov": batch["fov"], "t": batch["t"], "seconds": np.asarray(seconds)}
        if self.handoff:
            rows["prediction"] = np.stack(predictions)
            if self.measure:
                rows["measured"] = np.stack(measured)
        return rows


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
) -> np.ndarray:
    """Read, normalise, predict (tiled), de-normalise and write one ``(FOV, t, z-block)`` unit; its prediction
    ``(C, Z_block, Y, X)``."""
    n_z = plate.info(fov).shape[2]
    src_idx = plate.channel_indices(sources)
    meta = plate.normalization(fov) if needs_stats(sources, norms, denorm) else {}
    params = normalization_params(meta, sources, norms)

    def read(idx: np.ndarray) -> np.ndarray:
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        data = plate.read(fov, t, src_idx, slice(lo, hi))[:, idx - lo]
        return normalize(data.astype(np.float32), params)

    pred = predict_stack(read, n_z, predict_fn, opts, z_range)
    if denorm:
        pred = denormalize(pred, normalization_params(meta, targets, target_norms(norms)))
    write_block(target, fov, t, z_range[0], pred)
    return pred


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
        Pixels predicted, wall time, and time spent inside the staining actors.
    masks, tables, objects, segment_seconds
        With segmentation: the label images of each FOV (``<fov>/labels/<name>``), the object table of each
        output (``viscy_objects.parquet``, a ``.csv`` beside it), the number of objects in them, and the time
        spent inside the segmentation actors.
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
    masks: list[str] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    objects: int = 0
    segment_seconds: float = 0.0


def run_predict(config: PredictConfig) -> PredictResult:
    """Predict (and segment) every selected FOV of every plate, resuming a killed job; see the module docstring."""
    t_start = time.perf_counter()
    card = describe_model(config.model, config.onnx)
    sources, targets = resolve_channels(config, card)
    norms = resolve_normalization(config, card, sources)
    opts = tiling_options(config, card)
    seg = plan_segmentation(config.segment, targets) if config.segment is not None else None
    fp = fingerprint(config, sources, targets, norms, seg.key(file_id) if seg is not None else None)
    # 1. validate every plate and output before writing anything
    plans = plan_plates(config, sources, targets, norms, fp, seg)
    # 2. create outputs, list the units of incomplete FOVs (a rerun skips the complete ones)
    job = job_metadata(config, card, sources, targets, norms, seg)
    outputs, units, skipped = prepare_outputs(config, plans, targets, fp, job, seg)
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
    # 3. stream units through the actor pool(s), marking each FOV complete as its last unit comes back
    unit_seconds = segment_seconds = 0.0
    gpu = False
    if units:
        _start_ray(outputs)
        ds, gpu = _pipeline(config, card, opts, sources, targets, norms, outputs, units, seg)
        unit_seconds, segment_seconds = _collect(ds, remaining, outputs, fp, targets, config.progress, seg)
    # 4. publish: every FOV is complete; the tables are built, the outputs finished
    tables, objects = [], 0
    for plan in plans:
        target = outputs[str(plan.plate.path)]
        if seg is not None:
            table, count = write_object_table(target, plan.fovs, seg.columns(targets))
            tables.append(table)
            objects += count
        finish_output(target)  # swaps a replacement in (one a killed job completed, too)
    elapsed = time.perf_counter() - t_start
    where = ", ".join(str(t.path) for t in outputs.values())
    if units:
        print(
            f"viscy predict: {n_fovs} FOV(s), {len(units)} unit(s), {megapixels:.1f} Mpx in {elapsed:.1f} s "
            f"({megapixels / max(elapsed, 1e-9):.2f} Mpx/s; {unit_seconds:.1f} s inside {config.num_actors} "
            f"actor(s), {'GPU' if gpu else 'CPU'}); {skipped} FOV(s) already complete; channels "
            f"{prediction_names(targets)} in {where}"
        )
    else:
        print(f"viscy predict: nothing to do ({skipped} FOV(s) already complete)")
    if seg is not None:
        print(
            f"viscy predict: masks <fov>/labels/{{{','.join(seg.masks)}}} ({seg.config.method}, {seg.config.dims}; "
            f"{segment_seconds:.1f} s inside {seg.config.num_actors} segmentation actor(s)) in {where}; "
            f"{objects} object(s) in {', '.join(map(str, tables))} (and .csv)"
        )
    return PredictResult(
        outputs=[t.path for t in outputs.values()],
        channels=prediction_names(targets),
        denormalized=config.denormalize,
        fovs=n_fovs,
        skipped=skipped,
        units=len(units),
        megapixels=megapixels,
        seconds=elapsed,
        unit_seconds=unit_seconds,
        masks=list(seg.masks) if seg is not None else [],
        tables=tables,
        objects=objects,
        segment_seconds=segment_seconds,
    )


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


class StageResources(NamedTuple):
    """What each actor of the two stages reserves."""

    stain_cpus: float
    stain_gpus: float
    segment_cpus: float
    segment_gpus: float


def _resources(config: PredictConfig, seg: SegmentPlan | None, gpu: bool) -> StageResources:
    """Each stage's reservation, scaled down to what the cluster has so that every actor of both pools starts.

    Raises
    ------
    ModelError
        If the segmentation actors ask for more GPUs than the cluster has, or leave none for GPU staining.
    """
    import ray

    cluster = ray.cluster_resources()
    cpus_total, gpus_total = cluster.get("CPU", 1), cluster.get("GPU", 0)
    seg_actors = seg.config.num_actors if seg is not None else 0
    seg_cpus = seg.config.num_cpus_per_actor if seg is not None else 0.0
    seg_gpus = seg.config.num_gpus_per_actor if seg is not None else 0.0
    wanted = config.num_actors * config.num_cpus_per_actor + seg_actors * seg_cpus
    scale = min(1.0, cpus_total / wanted)
    if scale < 1:
        log.warning(
            "the actors ask for %s CPUs but the cluster has %s; each gets %.0f%% of its share",
            wanted,
            cpus_total,
            100 * scale,
        )
    if seg_actors * seg_gpus > gpus_total:
        raise ModelError(
            f"the segmentation actors ask for {seg_actors * seg_gpus:g} GPU(s) but the Ray cluster has "
            f"{gpus_total:g}; lower segment.num_gpus_per_actor or segment.num_actors (0 GPUs: Cellpose on CPU)"
        )
    stain_gpus = 1.0 if gpu else 0.0
    if gpu and seg_gpus > 0 and config.num_actors + seg_actors * seg_gpus > gpus_total:
        # one GPU for both stages (e.g. a workstation): the staining actors share what segmentation leaves
        stain_gpus = (gpus_total - seg_actors * seg_gpus) / config.num_actors
        if stain_gpus <= 0:
            raise ModelError(
                f"the segmentation actors take all {gpus_total:g} GPU(s), none is left for staining; lower "
                "segment.num_gpus_per_actor (e.g. 0.5), or set use_gpu: false"
            )
        log.warning("staining and segmentation share the GPUs: %.2f GPU per staining actor", stain_gpus)
    return StageResources(config.num_cpus_per_actor * scale, stain_gpus, seg_cpus * scale, seg_gpus)


def _pipeline(
    config: PredictConfig,
    card: ModelCard,
    opts: TilingOptions,
    sources: list[str],
    targets: list[str],
    norms: list[NormalizationConfig],
    outputs: dict[str, OutputTarget],
    units: list[dict[str, Any]],
    seg: SegmentPlan | None,
) -> tuple[Any, bool]:
    """The Ray Data pipeline: units through a pool of :class:`PredictActor`, then (segmenting) a pool of
    :class:`~viscy.predict.segmentation.SegmentActor` with its own resources; whether staining uses GPUs."""
    import ray

    gpu = _use_gpu(config.use_gpu)
    res = _resources(config, seg, gpu)
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
        "threads": max(1, int(res.stain_cpus)),
        "handoff": seg is not None,
        "measure": seg.config.measure_channels if seg is not None else None,
        "block_yx": config.tile_yx,  # only a bioimage.io package uses it (its own blocks; opts has no tiles then)
    }
    ds = ray.data.from_items(units, override_num_blocks=min(len(units), 2000))
    ds = ds.map_batches(
        PredictActor,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=res.stain_cpus,
        num_gpus=res.stain_gpus,
    )
    if seg is not None:
        plate_names = {str(p): Plate(p).root.name for p in {u["plate"] for u in units}}
        ds = ds.map_batches(
            SegmentActor,
            fn_constructor_kwargs={
                "segment": seg.config.model_dump(mode="json"),
                "targets": targets,
                "chosen": seg.chosen,
                "outputs": outputs,
                "plate_names": plate_names,
                "threads": max(1, int(res.segment_cpus)),
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=seg.config.num_actors),
            num_cpus=res.segment_cpus,
            num_gpus=res.segment_gpus,
        )
    return ds, gpu


def _collect(
    ds: Any,
    remaining: dict[tuple[str, str], int],
    outputs: dict[str, OutputTarget],
    fp: str,
    targets: list[str],
    progress: bool,
    seg: SegmentPlan | None = None,
) -> tuple[float, float]:
    """Run the pipeline and mark each FOV complete as its last unit comes back (its object rows and masks
    first); the seconds spent in the staining and the segmentation actors.

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
    unit_seconds = segment_seconds = 0.0
    objects: dict[tuple[str, str], list[Any]] = defaultdict(list)  # object rows of the units back, per FOV
    for row in ds.iter_rows():
        unit_seconds += float(row["seconds"])
        key = (str(row["plate"]), str(row["fov"]))
        if seg is not None:
            segment_seconds += float(row["segment_seconds"])
            objects[key].append(table_from_bytes(row["objects"]))
        remaining[key] -= 1
        if remaining[key] == 0:
            plate_path, fov = key
            if seg is not None:
                finish_fov(outputs[plate_path], fov, list(seg.masks), objects.pop(key))
            mark_complete(outputs[plate_path], fov, fp, {"targets": targets, "finished": time.time()})
            done_fovs += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if done_fovs != n_fovs:
        raise ShapeError(f"only {done_fovs} of {n_fovs} FOVs finished; rerun to resume")
    return unit_seconds, segment_seconds
