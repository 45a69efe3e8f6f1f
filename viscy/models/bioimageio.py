"""bioimage.io model packages (BMZ, model spec 0.5): export a trained viscy model, run packages others made.

**Export** (``viscy export --format bioimageio``): the model card supplies channels, Z window, YX multiple and
normalisation; the training run (``run_info.json``, ``viscy_config.yaml`` beside ``best_model.pt``) supplies the
plate whose dataset statistics become the package's fixed pre- and postprocessing and whose held-out FOV gives
the test tensors and the cover. The package is built with ``bioimageio.spec`` and must pass ``bioimageio.core``'s
own model test (the zoo's check) for each of its weights formats before it is written.

**Import**: :func:`is_package` paths are read with ``bioimageio.spec`` (any format version, updated to 0.5);
:func:`package_card` turns the description into the :class:`~viscy.models.card.ModelCard` that predict and serve
plan with, and :class:`PackageBackend` predicts through ``bioimageio.core``'s prediction pipeline, so the
package's own preprocessing, halo, padding and postprocessing apply exactly as in any other consumer.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from viscy.errors import ModelError
from viscy.models.card import ModelCard
from viscy.models.registry import ModelSpec

if TYPE_CHECKING:
    from torch import nn

    from viscy.data.config import NormalizationConfig
    from viscy.data.plate import Plate
    from viscy.models.config import ExportConfig
    from viscy.models.export import ExportResult

log = logging.getLogger(__name__)

DESCRIPTION_FILES = ("rdf.yaml", "bioimageio.yaml")
PACKAGE_ARCHITECTURE = "bioimageio"  # the spec's architecture name on cards of imported packages
RUNNABLE_WEIGHTS = ("onnx", "pytorch_state_dict", "torchscript")  # in the order viscy prefers them
# The test output's tolerance for other weights and devices: the spec's defaults (relative 1e-3, 100 elements
# per million), the absolute part scaled to the output's largest value (outputs are in plate intensities).
TEST_RTOL = 1e-3
TEST_MISMATCHED_PPM = 100
TEST_YX_MAX = 256  # largest side of the test tensors cut from the training plate
HALO = 16  # pixels cropped from each side of a block by consumers that tile (at least; see export_package)
CITATIONS = (
    ("Liu, Hirata-Miyasaki et al. (2025) Robust virtual staining of landmark organelles with Cytoland. "
     "Nature Machine Intelligence", "10.1038/s42256-025-01046-2"),
    ("Guo, Yeh et al. (2020) Revealing architectural order with quantitative label-free imaging and deep "
     "learning. eLife", "10.7554/eLife.55502"),
)


# ---------------------------------------------------------------------------------------- the libraries
def _spec_error(exc: Exception, what: str) -> ModelError:
    """A :class:`ModelError` for a description ``bioimageio.spec`` refused: its first errors, no traceback."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        lines = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in errors()[:5]]
        return ModelError(f"{what}: " + "; ".join(lines))
    return ModelError(f"{what}: {exc}")


# ---------------------------------------------------------------------------------------------- import
def is_package(path: str | Path) -> bool:
    """Whether ``path`` is a bioimage.io package: a zip or a folder holding ``rdf.yaml``/``bioimageio.yaml``."""
    path = Path(path)
    if path.is_dir():
        return any((path / name).is_file() for name in DESCRIPTION_FILES) or any(path.glob("*.bioimageio.yaml"))
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        return any(n in DESCRIPTION_FILES or n.endswith(".bioimageio.yaml") for n in names)
    return False


def load_package(path: str | Path) -> Any:
    """The package's model description, updated to spec 0.5 (``bioimageio.spec.model.v0_5.ModelDescr``).

    Raises
    ------
    ModelError
        If it is not a valid bioimage.io model description, naming what ``bioimageio.spec`` found.
    """
    from bioimageio.spec import InvalidDescr, load_model_description

    path = Path(path)
    try:
        descr = load_model_description(path, format_version="latest", perform_io_checks=False)
    except Exception as exc:
        raise _spec_error(exc, f"{path} is not a bioimage.io model package") from None
    if isinstance(descr, InvalidDescr):
        details = [e.msg for d in descr.validation_summary.details for e in d.errors][:3]
        raise ModelError(f"{path} is not a valid bioimage.io model description: {'; '.join(details)}")
    return descr


@dataclass(frozen=True)
class PackageLayout:
    """How viscy's ``(B, C, Z, Y, X)`` arrays map onto a package's single input and output tensor."""

    input_id: str
    output_id: str
    input_axes: tuple[str, ...]  # the package's axis ids, e.g. ("batch", "channel", "y", "x")
    output_axes: tuple[str, ...]
    weights_format: str


def _axis_size(axis: Any) -> int | None:
    size = getattr(axis, "size", None)
    return size if isinstance(size, int) else None


def read_layout(descr: Any, path: str | Path) -> tuple[PackageLayout, ModelCard]:
    """The axis mapping and the card of a package viscy can run; refuses the others, naming what it found."""
    from bioimageio.spec.model.v0_5 import ParameterizedSize, SizeReference

    name = f"bioimage.io package {Path(path).name}"
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise ModelError(
            f"{name} has {len(descr.inputs)} input and {len(descr.outputs)} output tensors; viscy runs packages "
            "with one image in and one image out"
        )
    weights = [f for f in RUNNABLE_WEIGHTS if getattr(descr.weights, f, None) is not None]
    if not weights:
        found = [f for f, w in descr.weights if w is not None]
        raise ModelError(f"{name} has weights {found}; viscy runs {', '.join(RUNNABLE_WEIGHTS)} weights")
    inp, out = descr.inputs[0], descr.outputs[0]
    in_axes = {str(a.id): a for a in inp.axes}
    out_axes = {str(a.id): a for a in out.axes}
    allowed = {"batch", "channel", "z", "y", "x"}
    for what, axes in (("input", in_axes), ("output", out_axes)):
        extra = sorted(set(axes) - allowed)
        if extra or not {"y", "x"} <= set(axes):
            raise ModelError(
                f"{name}: its {what} has axes {list(axes)}; viscy runs packages whose axes are batch, channel, "
                "z, y and x (y and x required)"
            )
    if "z" in in_axes and _axis_size(in_axes["z"]) is None:
        raise ModelError(
            f"{name}: its input's z axis has a variable size ({in_axes['z'].size}); viscy runs packages whose Z "
            "window is fixed (or that have no z axis)"
        )
    z_window = _axis_size(in_axes["z"]) if "z" in in_axes else 1
    out_z = out_axes.get("z")
    out_depth = 1 if out_z is None else (z_window if isinstance(out_z.size, SizeReference) else _axis_size(out_z))
    if out_depth not in (1, z_window):
        raise ModelError(
            f"{name} maps {z_window} Z slices to {out_z.size}; viscy runs packages returning one slice or as many "
            "as they read"
        )
    for ax in ("y", "x"):
        size = out_axes[ax].size
        if not (isinstance(size, SizeReference) and str(size.axis_id) == ax and str(size.tensor_id) == str(inp.id)):
            raise ModelError(f"{name}: its output's {ax} size is {size}, not the input's {ax}; viscy runs "
                             "image-to-image packages")
        if getattr(out_axes[ax], "scale", 1.0) != getattr(in_axes[ax], "scale", 1.0):
            raise ModelError(f"{name}: its output is rescaled along {ax}; viscy runs same-size image-to-image packages")
        if not isinstance(in_axes[ax].size, (int, ParameterizedSize)):
            raise ModelError(f"{name}: its input's {ax} size is {in_axes[ax].size}; viscy needs a fixed or "
                             "min + n*step size")

    def channels(axes: dict[str, Any], fallback: str) -> list[str]:
        axis = axes.get("channel")
        return [str(c) for c in axis.channel_names] if axis is not None else [fallback]

    sources, targets = channels(in_axes, str(inp.id)), channels(out_axes, str(out.id))
    # A viscy export keeps the card of training (channel names that are not identifiers included).
    viscy_meta = (descr.config.model_extra or {}).get("viscy") if descr.config is not None else None
    card_dict = viscy_meta.get("model_card") if isinstance(viscy_meta, Mapping) else None
    if isinstance(card_dict, Mapping):
        stored = card_dict.get("source_channels") or [], card_dict.get("target_channels") or []
        if len(stored[0]) == len(sources) and len(stored[1]) == len(targets):
            sources, targets = list(stored[0]), list(stored[1])
    spec = ModelSpec(
        architecture=PACKAGE_ARCHITECTURE,
        in_channels=len(sources),
        out_channels=len(targets),
        z_window_size=int(z_window),
        out_depth=int(out_depth),
        yx_multiple=1,  # the package pads its own inputs (min + n*step, halo): viscy passes whole images
    )
    card = ModelCard(
        name=str(descr.name),
        kwargs={},
        spec=spec,
        source_channels=sources,
        target_channels=targets,
        normalization=[],  # the package's own preprocessing normalises
        training={"bioimageio": {"name": str(descr.name), "format_version": str(descr.format_version),
                                 "weights": weights}},
    )
    layout = PackageLayout(str(inp.id), str(out.id), tuple(in_axes), tuple(out_axes), weights[0])
    return layout, card


def package_card(path: str | Path) -> ModelCard:
    """The card predict and serve plan a package with (channel names, Z window; no viscy normalisation)."""
    return read_layout(load_package(path), path)[1]


def read_package_card(path: str | Path) -> ModelCard:
    """What a package says about its model: the card of training for a ``viscy export`` (use
    :func:`viscy.models.read_card`), else :func:`package_card`."""
    descr = load_package(path)
    extra = (descr.config.model_extra or {}) if descr.config is not None else {}
    stored = extra.get("viscy", {}).get("model_card") if isinstance(extra.get("viscy"), Mapping) else None
    if isinstance(stored, Mapping):
        return ModelCard.from_dict(stored, source=f"viscy model card of {path}")
    return read_layout(descr, path)[1]


class PackageBackend:
    """A bioimage.io package behind viscy's ``predict_fn``: raw ``(B, C, Z, Y, X)`` in, ``(B, C', Z', Y, X)`` out.

    Each batch entry is one sample of ``bioimageio.core``'s prediction pipeline (its per-sample statistics are
    then those of that image, as in any consumer): preprocessing, halo padding, weights, postprocessing and
    cropping are the package's. An image of a size the package accepts runs at once; any other is first
    padded (symmetrically, the spec's default) to the next size it accepts, and cropped back. With
    ``block_yx``, images larger than that are cut by the pipeline into blocks of about that size, each padded
    by the package's halo.
    """

    def __init__(
        self, path: str | Path, device: str = "cpu", threads: int | None = None,
        block_yx: tuple[int, int] | None = None,
    ) -> None:
        descr = load_package(path)
        self.layout, self.card = read_layout(descr, path)
        from bioimageio.core import create_prediction_pipeline

        from viscy.models.export import cuda_usable

        fmt = self.layout.weights_format
        gpu = device == "cuda" or (device == "auto" and cuda_usable())
        if fmt == "onnx":
            devices = ["CUDAExecutionProvider" if gpu else "CPUExecutionProvider"]
        else:
            devices = ["cuda" if gpu else "cpu"]
            if threads:
                import torch

                torch.set_num_threads(threads)
        try:
            self.pipeline = create_prediction_pipeline(descr, weights_format=fmt, devices=devices)
        except Exception as exc:
            raise ModelError(f"bioimage.io package {Path(path).name}: its {fmt} weights do not load: {exc}") from exc
        self.sizes = input_yx_sizes(descr)
        self.block_yx = block_yx

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        from bioimageio.core import Sample, Tensor

        lay = self.layout
        outputs = []
        for b in range(batch.shape[0]):
            czyx = np.ascontiguousarray(batch[b], dtype=np.float32)
            y, x = czyx.shape[-2:]
            (ty, tx), block = padded_yx(self.sizes, y, x, self.block_yx)
            if (ty, tx) != (y, x):
                czyx = np.pad(czyx, [(0, 0), (0, 0), (0, ty - y), (0, tx - x)], mode="symmetric")
            arr = _to_axes(czyx, lay.input_axes)
            sample = Sample(members={lay.input_id: Tensor.from_numpy(arr, dims=lay.input_axes)}, stat={}, id=b)
            if block is None:
                result = self.pipeline.predict_sample_without_blocking(sample)
            else:
                result = self.pipeline.predict_sample_with_fixed_blocking(
                    sample, input_block_shape={lay.input_id: {"y": block[0], "x": block[1]}}
                )
            data = result.members[lay.output_id].data
            out = _from_axes(np.asarray(data.values, dtype=np.float32), tuple(map(str, data.dims)))
            outputs.append(out[..., :y, :x])
        return np.stack(outputs)


def input_yx_sizes(descr: Any) -> dict[str, Any]:
    """The package input's ``y`` and ``x`` sizes (an int, or ``ParameterizedSize`` min + n * step)."""
    return {str(a.id): a.size for a in descr.inputs[0].axes if str(a.id) in ("y", "x")}


def padded_yx(
    sizes: Mapping[str, Any], y: int, x: int, block_yx: tuple[int, int] | None = None
) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """What :class:`PackageBackend` runs for a ``y`` x ``x`` image: the padded size and the block shape (None:
    the whole image at once). Serving bounds a request's cost with it before any work.

    A fixed-size axis is always cut in blocks of its size, a ``min + n*step`` axis only with ``block_yx``; the
    image is padded to the next size the package accepts (whole), or to at least one block (blocked).
    """
    fixed = any(isinstance(size, int) for size in sizes.values())
    if block_yx is None and not fixed:
        return (_valid_size(y, sizes["y"], up=True), _valid_size(x, sizes["x"], up=True)), None
    wanted = block_yx or (None, None)
    block = []
    for n, size, want in ((y, sizes["y"], wanted[0]), (x, sizes["x"], wanted[1])):
        if isinstance(size, int):
            block.append(size)
        else:
            limit = min(want, n) if want else n
            block.append(_valid_size(limit, size, up=False) or _valid_size(limit, size, up=True))
    if block[0] >= y and block[1] >= x and not fixed:
        return (_valid_size(y, sizes["y"], up=True), _valid_size(x, sizes["x"], up=True)), None
    return (max(y, block[0]), max(x, block[1])), (block[0], block[1])


def _valid_size(n: int, size: Any, up: bool) -> int | None:
    """The nearest size the package accepts at or above (``up``) or below ``n``; None if none is below."""
    from bioimageio.spec.model.v0_5 import ParameterizedSize

    if isinstance(size, ParameterizedSize):
        if n <= size.min:
            return size.min if up or n == size.min else None
        k = (n - size.min) // size.step + (1 if up and (n - size.min) % size.step else 0)
        return size.min + k * size.step
    return size if up or n >= size else None


def _to_axes(czyx: np.ndarray, axes: Sequence[str]) -> np.ndarray:
    """``(C, Z, Y, X)`` as the package's input axes (a missing channel or z axis must have size 1)."""
    out, order = czyx, ["channel", "z", "y", "x"]
    for ax in ("channel", "z"):
        if ax not in axes:
            out = out.take(0, axis=order.index(ax))
            order.remove(ax)
    if "batch" in axes:
        out, order = out[None], ["batch", *order]
    return np.transpose(out, [order.index(a) for a in axes])


def _from_axes(data: np.ndarray, dims: tuple[str, ...]) -> np.ndarray:
    """A package output with ``dims`` as ``(C, Z, Y, X)``."""
    for ax in ("channel", "z"):
        if ax not in dims:
            data, dims = data[..., None], (*dims, ax)
    if "batch" in dims:
        data, dims = data.take(0, axis=dims.index("batch")), tuple(d for d in dims if d != "batch")
    return np.transpose(data, [dims.index(a) for a in ("channel", "z", "y", "x")])


# ---------------------------------------------------------------------------------------------- export
def package_network(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """The callable a package's ``pytorch_state_dict`` weights name: viscy's network, returning one tensor."""
    from viscy.models import create_model
    from viscy.models.export import _FirstOutput

    return _FirstOutput(create_model(name, **dict(kwargs)))


def _identifier(name: str) -> str:
    """A channel name as the spec's identifier (letters, digits, underscores; not starting with a digit)."""
    ident = re.sub(r"\W", "_", name) or "channel"
    return ident if not ident[0].isdigit() else f"c_{ident}"


def _training_run(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``viscy_config.yaml`` and ``run_info.json`` beside a ``best_model.pt`` (empty where absent)."""
    import yaml

    run_dir = checkpoint.parent
    config_file, info_file = run_dir / "viscy_config.yaml", run_dir / "run_info.json"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return config or {}, info


def _test_fov(config: ExportConfig, run_config: dict[str, Any], run_info: dict[str, Any]) -> tuple[Plate, str]:
    """The plate and FOV the test tensors come from: ``data_path`` or training's plate; its first held-out FOV."""
    from viscy.data.plate import Plate

    data = run_config.get("data") or {}
    paths = data.get("data_path") or []
    paths = [paths] if isinstance(paths, str) else list(paths)
    plate_path = Path(config.data_path) if config.data_path else (Path(paths[0]) if paths else None)
    if plate_path is None or not plate_path.exists():
        where = f"the training plate {plate_path} is not here" if plate_path else "the checkpoint names no plate"
        raise ModelError(
            f"a bioimage.io package needs the training plate (its statistics and test images): {where}; pass "
            "--data_path with the plate (or one preprocessed like it)"
        )
    plate = Plate(plate_path)
    held_out = [e.split("::", 1) for e in (run_info.get("split") or {}).get("val", []) if "::" in e]
    fovs = [fov for p, fov in held_out if Path(p).resolve() == plate_path.resolve()] or plate.positions
    return plate, fovs[0]


def _stats(meta: dict[str, Any], channel: str, group: NormalizationConfig | None) -> tuple[float, float] | None:
    """(subtrahend, divisor) of a channel's dataset statistics for its normalisation group (None: none)."""
    if group is None:
        return None
    try:
        stats = meta[channel]["dataset_statistics"]
        return float(stats[group.subtrahend]), float(stats[group.divisor])
    except KeyError:
        raise ModelError(
            f"the plate has no dataset statistics for {channel!r}; run `viscy preprocess` on it first"
        ) from None


def _crop_size(n: int, minimum: int, step: int) -> int:
    """The largest size ``minimum + k*step`` that fits ``min(n, TEST_YX_MAX)``."""
    limit = min(n, TEST_YX_MAX)
    if limit < minimum:
        raise ModelError(f"the test FOV is {n} pixels wide, below the package's minimum {minimum}")
    return minimum + (limit - minimum) // step * step


def run_package_export(config: ExportConfig) -> ExportResult:
    """``viscy export --format bioimageio``: the package, tested by bioimageio.core, and its config beside it."""
    from viscy.config import save_config
    from viscy.models.export import ExportResult, check_export_output

    t0 = time.perf_counter()
    output = Path(config.output)
    if output.suffix != ".zip":
        output = output.with_name(output.name + ".zip")
    check_export_output(output, config.overwrite, ours=lambda p: is_package(p) and _written_by_viscy(p))
    made = export_package(config, output)
    config_path = save_config(config, output.parent, "export", filename=output.stem + ".viscy_config.yaml")
    card = made["card"]
    package_card(output)  # it reads back as a package viscy runs
    size_mb = output.stat().st_size / 2**20
    fixed = made["fixed_statistics"]
    note = "; per-FOV normalisation fixed to the training plate's dataset statistics" if fixed else ""
    print(
        f"viscy export: {card.describe()} -> {output} (bioimage.io package, {size_mb:.1f} MiB; weights "
        f"{' + '.join(made['weights'])}, ONNX/torch max|diff| {made['parity']:.1e}; bioimageio.core model test "
        f"passed; {time.perf_counter() - t0:.1f} s){note}"
    )
    return ExportResult(onnx=output, config=config_path, card=card, parity_max_abs_diff=made["parity"])


def _written_by_viscy(path: Path) -> bool:
    """Whether a package was written by ``viscy export`` (its description keeps viscy's model card)."""
    try:
        extra = load_package(path).config.model_extra or {}
    except ModelError:
        return False
    return isinstance(extra.get("viscy"), Mapping) and "model_card" in extra["viscy"]


def export_package(config: ExportConfig, output: Path) -> dict[str, Any]:
    """Write the bioimage.io package of ``config.model`` to ``output`` (a .zip), tested by ``bioimageio.core``.

    Returns what the console line reports (card, weights, parity, test status, seconds).
    """
    import tempfile

    import torch

    from viscy.data.config import NormalizationConfig
    from viscy.data.patches import normalization_for_channel
    from viscy.models import create_model, get_spec, resolve_model_source
    from viscy.models.export import _FirstOutput, export_card, export_onnx, new_partial, onnx_metadata

    mc = config.model
    if mc.checkpoint is None:
        raise ModelError("a bioimage.io package is made from trained weights: pass --model.checkpoint best_model.pt")
    name, kwargs, card_in = resolve_model_source(mc.name, mc.kwargs, mc.checkpoint)
    model = _FirstOutput(create_model(name, checkpoint=mc.checkpoint, **kwargs)).eval()  # package_network's
    norm = [n.model_dump(mode="json") for n in config.normalization] if config.normalization is not None else None
    card = export_card(model.model, name=name, kwargs=kwargs, card=card_in, source_channels=config.source_channels,
                       target_channels=config.target_channels, normalization=norm)
    if not card.names_channels:
        raise ModelError("the model does not name its channels; pass --source_channels and --target_channels")
    spec = get_spec(model.model)
    run_config, run_info = _training_run(Path(mc.checkpoint))
    plate, fov = _test_fov(config, run_config, run_info)
    plate_path = plate.path
    meta = plate.normalization(fov)
    # the groups as training applied them (a group without channels covers the others)
    groups = [NormalizationConfig(**g) for g in card.normalization]
    pre = [_stats(meta, ch, normalization_for_channel(ch, groups)) for ch in card.source_channels]
    post = [_stats(meta, ch, normalization_for_channel(ch, groups)) for ch in card.target_channels]

    # test tensors: the held-out FOV's central Z window and YX crop, run as bioimageio.core's test runs them
    m = spec.yx_multiple
    # A halo of at least HALO pixels, and 2 * halo a multiple of m: padded by it, a valid size stays valid.
    half = m // 2 if m % 2 == 0 else m
    halo = -(-HALO // half) * half
    minimum = (2 * halo // m + 1) * m
    t_n, _, z_n, y_n, x_n = plate.info(fov).shape
    if z_n < spec.z_window_size:
        raise ModelError(f"FOV {fov} has {z_n} Z slices; the model reads {spec.z_window_size}")
    cy, cx = _crop_size(y_n, minimum, m), _crop_size(x_n, minimum, m)
    z0 = (z_n - spec.z_window_size) // 2
    y0, x0 = (y_n - cy) // 2, (x_n - cx) // 2
    src_idx = plate.channel_indices(card.source_channels)
    raw = plate.read(fov, 0, src_idx, slice(z0, z0 + spec.z_window_size))[..., y0 : y0 + cy, x0 : x0 + cx]
    test_input = raw.astype(np.float32)[None]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="viscy-bmz-") as tmp_name:
        tmp = Path(tmp_name)
        np.save(tmp / "test_input.npy", test_input)
        out_shape = (1, spec.out_channels, spec.out_depth, cy, cx)
        np.save(tmp / "test_output.npy", np.ones(out_shape, np.float32))  # replaced by core's prediction below
        torch.save(model.state_dict(), tmp / "weights.pt")
        export_onnx(model.model, tmp / "weights.onnx", example_yx=(cy, cx), opset=config.opset,
                    metadata=onnx_metadata(model.model, card=card))
        (tmp / "README.md").write_text(_readme(card, plate_path, fov, run_config, pre, post, (cy, cx), config))
        build = functools.partial(_description, config, card, name, kwargs, spec, tmp, halo, minimum, pre, post,
                                  run_config)
        # The test output is bioimageio.core's own run of the test input (pre -> weights -> post, no halo crop),
        # with the PyTorch weights; the ONNX weights must reproduce it.
        outputs = _core_outputs(build(covered=False), test_input)
        test_output = outputs["pytorch_state_dict"]
        np.save(tmp / "test_output.npy", test_output)
        parity = float(np.abs(outputs["onnx"] - test_output).max())
        target_idx = plate.channel_indices(card.target_channels)
        out_z = slice(z0, z0 + spec.z_window_size) if spec.out_depth > 1 else slice(
            z0 + spec.z_window_size // 2, z0 + spec.z_window_size // 2 + 1)
        target = plate.read(fov, 0, target_idx, out_z)[..., y0 : y0 + cy, x0 : x0 + cx]
        _cover(tmp / "cover.png", test_input[0], test_output[0], target, card)
        descr = build(covered=True, output_scale=float(np.abs(test_output).max()))
        partial = new_partial(output)
        from bioimageio.spec import save_bioimageio_package

        try:
            save_bioimageio_package(descr, output_path=partial)
            tests = check_package(partial)
            failed = {fmt: msg for fmt, (ok, msg) in tests.items() if not ok}
            if failed:
                raise ModelError(
                    "the package fails bioimageio.core's model test: "
                    + "; ".join(f"{fmt}: {msg}" for fmt, msg in failed.items())
                )
            partial.replace(output)
        finally:
            partial.unlink(missing_ok=True)
    return {"card": card, "weights": list(tests), "parity": parity, "seconds": time.perf_counter() - started,
            "fixed_statistics": any(g.get("level", "fov_statistics") == "fov_statistics" for g in card.normalization)}


def _core_outputs(descr: Any, test_input: np.ndarray) -> dict[str, np.ndarray]:
    """bioimageio.core's prediction of the test input with each weights format, as its model test runs it."""
    from bioimageio.core import Sample, Tensor, create_prediction_pipeline

    outputs = {}
    for fmt, devices in (("pytorch_state_dict", ["cpu"]), ("onnx", ["CPUExecutionProvider"])):
        pipeline = create_prediction_pipeline(descr, weights_format=fmt, devices=devices)
        sample = Sample(members={"input": Tensor.from_numpy(test_input, dims=("batch", "channel", "z", "y", "x"))},
                        stat={}, id="test")
        result = pipeline.predict_sample_without_blocking(sample, skip_input_padding=True, skip_output_cropping=True)
        outputs[fmt] = np.asarray(result.members["output"].data.values, dtype=np.float32)
    return outputs


def _cover(path: Path, test_input: np.ndarray, prediction: np.ndarray, target: np.ndarray, card: ModelCard) -> None:
    """The package's cover (2:1): the input, then each target channel predicted (top) and measured (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(card.target_channels)
    fig, axes = plt.subplots(2, n + 1, figsize=(8, 4), dpi=80, squeeze=False)
    zi = test_input.shape[1] // 2
    for row in range(2):
        axes[row, 0].imshow(test_input[0, zi], cmap="gray")
        axes[row, 0].set_title(card.source_channels[0] if row == 0 else "input", fontsize=9)
    for c, ch in enumerate(card.target_channels):
        zo = prediction.shape[1] // 2
        lo, hi = np.percentile(target[c, min(zo, target.shape[1] - 1)], [0.5, 99.5])
        axes[0, c + 1].imshow(prediction[c, zo], cmap="magma", vmin=lo, vmax=hi)
        axes[0, c + 1].set_title(f"{ch} predicted", fontsize=9)
        axes[1, c + 1].imshow(target[c, min(zo, target.shape[1] - 1)], cmap="magma", vmin=lo, vmax=hi)
        axes[1, c + 1].set_title(f"{ch} measured", fontsize=9)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _readme(card: ModelCard, plate: Path, fov: str, run_config: dict[str, Any], pre: list, post: list,
            test_yx: tuple[int, int], config: ExportConfig) -> str:
    """The package's documentation: what the model was trained on, how it normalises, its validation scores."""
    import viscy

    training = card.training
    metrics = training.get("metrics") or {}
    trainer = run_config.get("trainer") or {}
    spec = card.spec

    def table(channels: list[str], values: list, what: str) -> list[str]:
        rows = [f"| {ch} | {v[0]:.6g} | {v[1]:.6g} |" for ch, v in zip(channels, values, strict=True) if v]
        return [f"| channel | {what[0]} | {what[1]} |", "|---|---|---|", *rows] if rows else ["none"]

    levels = sorted({g.get("level", "fov_statistics") for g in card.normalization})
    lines = [
        f"# {config.name or f'viscy {card.name}'}",
        "",
        f"Virtual staining: predicts {', '.join(card.target_channels)} from {', '.join(card.source_channels)} "
        f"({card.describe()}).",
        "",
        "## Training data",
        "",
        f"Trained with viscy {viscy.__version__} (run `{training.get('run_name', 'unknown')}`, epoch "
        f"{training.get('epoch', 'unknown')}, {trainer.get('max_epochs', '?')} epochs planned) on the plate "
        f"`{plate.name}`; the test images are the held-out FOV `{fov}` ({test_yx[0]} x {test_yx[1]}, central Z "
        f"window of {spec.z_window_size}).",
        "",
        "## Normalisation",
        "",
        "The inputs are normalised with the package's `fixed_zero_mean_unit_variance` step (x - mean) / std:",
        "",
        *table(card.source_channels, pre, ("mean (subtrahend)", "std (divisor)")),
        "",
    ]
    if "fov_statistics" in levels:
        lines += [
            "Training normalised each FOV with its own statistics; a package holds fixed numbers, so these are the "
            "training plate's dataset statistics of the same kind (median/IQR or mean/std). Images whose intensities "
            "differ from that plate's are best predicted with `viscy predict` on a preprocessed plate.",
            "",
        ]
    lines += [
        "Outputs are rescaled by `scale_linear` (gain, offset) to the training plate's intensities:"
        if any(post) else "Outputs are in normalised units.",
        "",
        *(table(card.target_channels, post, ("offset", "gain")) if any(post) else []),
        "",
        "## Validation",
        "",
        *(["| metric | value |", "|---|---|", *[f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())
                                                 if isinstance(v, (int, float))]]
          if metrics else ["No validation metrics were recorded with this checkpoint."]),
        "",
        "The test output is bioimageio.core's prediction of the test input with the PyTorch weights; the ONNX "
        f"weights reproduce it within a relative {TEST_RTOL:g} (bioimageio.core's model test, run by `viscy export` "
        "for both).",
        "",
        "## How to run",
        "",
        "- napari: the bioimage.io plugin; Fiji: deepImageJ (ONNX weights); Python: `bioimageio.core.predict`.",
        "- viscy: `viscy predict --onnx <this package> --data_path plate.zarr`, or `viscy serve --models <it>`.",
        "- The `pytorch_state_dict` weights need viscy installed (`viscy.models.bioimageio.package_network`); the "
        "ONNX weights need only onnxruntime.",
        "",
    ]
    return "\n".join(lines)


def _description(config, card, name, kwargs, spec, tmp, halo, minimum, pre, post, run_config, covered: bool = True,
                 output_scale: float = 1.0) -> Any:
    """The spec 0.5 ``ModelDescr`` of the package (validated by ``bioimageio.spec`` as it is built); ``covered``:
    with the cover; ``output_scale``: the largest test output value, to which the absolute tolerance scales."""
    import torch
    from bioimageio.spec.model import v0_5 as bmz

    import viscy

    m = spec.yx_multiple
    ref = bmz.TensorId("input")

    def yx_input(axis: str) -> Any:
        return bmz.SpaceInputAxis(id=bmz.AxisId(axis), size=bmz.ParameterizedSize(min=minimum, step=m))

    def yx_output(axis: str) -> Any:
        size = bmz.SizeReference(tensor_id=ref, axis_id=bmz.AxisId(axis))
        return bmz.SpaceOutputAxisWithHalo(id=bmz.AxisId(axis), halo=halo, size=size)

    out_z = (bmz.SizeReference(tensor_id=ref, axis_id=bmz.AxisId("z")) if spec.out_depth == spec.z_window_size
             else spec.out_depth)
    preprocessing = []
    if any(p is not None for p in pre):
        pairs = [p or (0.0, 1.0) for p in pre]
        preprocessing.append(bmz.FixedZeroMeanUnitVarianceDescr(kwargs=bmz.FixedZeroMeanUnitVarianceAlongAxisKwargs(
            axis=bmz.AxisId("channel"), mean=[p[0] for p in pairs], std=[p[1] for p in pairs])))
    postprocessing = []
    if any(p is not None for p in post):
        pairs = [p or (0.0, 1.0) for p in post]
        postprocessing.append(bmz.ScaleLinearDescr(kwargs=bmz.ScaleLinearAlongAxisKwargs(
            axis=bmz.AxisId("channel"), gain=[p[1] for p in pairs], offset=[p[0] for p in pairs])))
    inputs = [bmz.InputTensorDescr(
        id=ref,
        axes=[bmz.BatchAxis(), bmz.ChannelAxis(channel_names=[bmz.Identifier(_identifier(c))
                                                              for c in card.source_channels]),
              bmz.SpaceInputAxis(id=bmz.AxisId("z"), size=spec.z_window_size), yx_input("y"), yx_input("x")],
        description=f"label-free input: {', '.join(card.source_channels)} (raw intensities)",
        test_tensor=bmz.FileDescr(source=tmp / "test_input.npy"),
        data=bmz.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=preprocessing,
    )]
    outputs = [bmz.OutputTensorDescr(
        id=bmz.TensorId("output"),
        axes=[bmz.BatchAxis(), bmz.ChannelAxis(channel_names=[bmz.Identifier(_identifier(c))
                                                              for c in card.target_channels]),
              bmz.SpaceOutputAxis(id=bmz.AxisId("z"), size=out_z), yx_output("y"), yx_output("x")],
        description=f"virtual staining: {', '.join(card.target_channels)}"
        + (" (in the training plate's intensities)" if postprocessing else " (normalised)"),
        test_tensor=bmz.FileDescr(source=tmp / "test_output.npy"),
        data=bmz.IntervalOrRatioDataDescr(type="float32"),
        postprocessing=postprocessing,
    )]
    torch_version = bmz.Version(torch.__version__.split("+")[0])
    weights = bmz.WeightsDescr(
        onnx=bmz.OnnxWeightsDescr(source=tmp / "weights.onnx", opset_version=config.opset,
                                  parent="pytorch_state_dict"),
        pytorch_state_dict=bmz.PytorchStateDictWeightsDescr(
            source=tmp / "weights.pt",
            pytorch_version=torch_version,
            architecture=bmz.ArchitectureFromLibraryDescr(
                import_from="viscy.models.bioimageio", callable=bmz.Identifier("package_network"),
                kwargs={"name": name, "kwargs": json.loads(json.dumps(kwargs))},
            ),
        ),
    )
    metrics = card.training.get("metrics") or {}
    tolerance = bmz.ReproducibilityTolerance(
        relative_tolerance=TEST_RTOL, absolute_tolerance=TEST_RTOL * max(1.0, output_scale),
        mismatched_elements_per_million=TEST_MISMATCHED_PPM,
    )
    try:
        return bmz.ModelDescr(
            name=config.name or f"viscy {card.name} {'+'.join(card.target_channels)}",
            description=config.description or (
                f"Virtual staining of {', '.join(card.target_channels)} from {', '.join(card.source_channels)} "
                f"({card.name}, trained with viscy)"),
            authors=[bmz.Author(name=a) for a in config.authors],
            cite=[bmz.CiteEntry(text=text, doi=bmz.Doi(doi)) for text, doi in CITATIONS],
            license=bmz.LicenseId(config.license),
            documentation=bmz.FileDescr(source=tmp / "README.md"),
            covers=[bmz.FileDescr(source=tmp / "cover.png")] if covered else [],
            tags=["virtual-staining", "label-free", "fluorescence", "2d" if spec.z_window_size == 1 else "3d",
                  "pytorch", "onnx", "viscy"],
            version=bmz.Version(config.version),
            inputs=inputs,
            outputs=outputs,
            weights=weights,
            config=bmz.Config(
                bioimageio=bmz.BioimageioConfig(reproducibility_tolerance=[tolerance]),
                viscy={"version": viscy.__version__, "model_card": card.to_dict(), "metrics": metrics,
                       "training_config": json.loads(json.dumps(run_config, default=str))},
            ),
        )
    except Exception as exc:
        raise _spec_error(exc, "bioimageio.spec refused the package description") from None


def check_package(path: Path) -> dict[str, tuple[bool, str]]:
    """``bioimageio.core.test_model`` for each weights format of a package: ``{format: (passed, first error)}``.

    ONNX is tested on onnxruntime's CPU provider and torch formats on the CPU (onnxruntime-gpu would otherwise
    try its GPU providers first and print their failures).
    """
    from bioimageio.core import test_model

    descr = load_package(path)
    results = {}
    for fmt in RUNNABLE_WEIGHTS:
        if getattr(descr.weights, fmt, None) is None:
            continue
        devices = ["CPUExecutionProvider"] if fmt == "onnx" else ["cpu"]
        summary = test_model(path, weight_format=fmt, devices=devices)
        errors = [f"{d.name}: {e.msg}" for d in summary.details for e in d.errors]
        results[fmt] = (summary.status == "passed", errors[0] if errors else "")
    return results
