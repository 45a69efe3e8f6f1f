"""ONNX export with self-describing metadata, an onnxruntime session factory and a parity check.

The dynamo exporter is used: the legacy TorchScript exporter turns UNeXt2's 5D pixel shuffle into an
ATen fallback op that onnxruntime cannot load. Batch, Y and X are dynamic (Y and X as multiples of the
model's ``yx_multiple``); Z is fixed by the model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from viscy.errors import ModelError
from viscy.models import create_model, get_spec, read_card, resolve_model_source
from viscy.models.card import ONNX_PREFIX, ModelCard, card_for_model, onnx_metadata_props, read_onnx_props
from viscy.models.presets import Preset

if TYPE_CHECKING:
    import onnxruntime as ort

    from viscy.models.config import ExportConfig

log = logging.getLogger(__name__)

MIN_OPSET = 18
PARITY_TOL = 1e-3  # CLI check on full-size models; tests use 1e-4 on small ones


class _FirstOutput(nn.Module):
    """Export wrapper: models returning ``(prediction, mask)`` export only the prediction."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def onnx_metadata(model: nn.Module, **card_fields: Any) -> dict[str, str]:
    """The metadata_props written into an exported file: the model card of :func:`export_card` (same arguments)."""
    return onnx_metadata_props(export_card(model, **card_fields))


def export_card(
    model: nn.Module,
    name: str | None = None,
    source_channels: Sequence[str] | None = None,
    target_channels: Sequence[str] | None = None,
    normalization: Sequence[Mapping[str, Any]] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    card: ModelCard | None = None,
) -> ModelCard:
    """The card of an exported ``model``.

    Channel names and normalisation come from the explicit arguments, else the model card of the checkpoint,
    else the preset. Unknown channel names are left empty (never invented), so ``viscy predict`` asks for
    them instead of looking for channels that do not exist.
    """
    spec = get_spec(model)
    preset: Preset | None = getattr(model, "preset", None)
    name = name or (card.name if card else preset.name if preset else spec.architecture)
    kwargs = dict(kwargs if kwargs is not None else card.kwargs if card else {})
    for what, names, n in (
        ("source", source_channels, spec.in_channels),
        ("target", target_channels, spec.out_channels),
    ):
        if names and len(names) != n:
            raise ModelError(
                f"{len(names)} {what} channel names {list(names)} for a model with {n} {what} channel(s); "
                f"give {n} name(s) in {what}_channels"
            )
    base = card_for_model(name, kwargs, spec, card)
    return dataclasses.replace(
        base,
        source_channels=list(source_channels or base.source_channels),
        target_channels=list(target_channels or base.target_channels),
        normalization=[dict(n) for n in normalization] if normalization is not None else base.normalization,
    )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    example_yx: tuple[int, int] | None = None,
    opset: int = MIN_OPSET,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export ``model`` to ONNX (dynamo) with dynamic batch/Y/X and write ``metadata`` into the file.

    Parameters
    ----------
    model
        A registered model (it must declare ``spec``).
    path
        Output ``.onnx`` file.
    example_yx
        Tracing size (rounded up to ``yx_multiple``, at least two multiples so Y/X stay symbolic).
    opset
        ONNX opset (>= 18).
    metadata
        metadata_props; default :func:`onnx_metadata` of ``model``.
    """
    import onnx
    from torch.export import Dim

    if opset < MIN_OPSET:
        raise ModelError(f"opset must be >= {MIN_OPSET}, got {opset}")
    spec = get_spec(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = spec.yx_multiple
    y, x = spec.padded_yx(*(example_yx or (2 * m, 2 * m)))
    # a size of exactly one multiple would be specialised to a constant by torch.export
    ny, nx = max(2, y // m), max(2, x // m)
    example = torch.randn(2, spec.in_channels, spec.z_window_size, ny * m, nx * m)
    dyn = {
        0: Dim("batch", min=1, max=4096),
        3: m * Dim("ny", min=1, max=8192 // m),
        4: m * Dim("nx", min=1, max=8192 // m),
    }
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _FirstOutput(model),
                (example,),
                dynamo=True,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=(dyn,),
                opset_version=opset,
                verbose=False,
            )
    except Exception as exc:
        raise ModelError(f"ONNX export of {spec.architecture} failed: {exc}") from exc
    finally:
        model.train(was_training)
    proto = program.model_proto
    meta = dict(metadata) if metadata is not None else onnx_metadata(model)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    return path


def cuda_usable() -> bool:
    """True only when torch sees a GPU and onnxruntime has its CUDA provider."""
    import onnxruntime as ort

    return bool(torch.cuda.is_available()) and "CUDAExecutionProvider" in ort.get_available_providers()


def create_ort_session(path: str | Path, device: str = "auto", threads: int | None = None) -> ort.InferenceSession:
    """onnxruntime session on CUDA when usable (``device="auto"``) or forced (``"cuda"``), else CPU.

    On CPU only ``CPUExecutionProvider`` is requested and the log level is raised to errors, so
    onnxruntime-gpu does not print provider failures on machines without a GPU.
    """
    import onnxruntime as ort

    if device not in ("auto", "cpu", "cuda"):
        raise ModelError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and cuda_usable())
    if device == "cuda" and not cuda_usable():
        raise ModelError("device='cuda' requested but no usable GPU / CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = threads
    # HEURISTIC: the exhaustive cuDNN search re-runs for every new tile-batch shape; measured on an H200, it made
    # batch-8 tiles of a 2048² image 3x slower (benchmarks/bench_stainer_device.py, docs/benchmarks.md)
    cuda = ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})
    providers = [cuda, "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load {path}: {exc}") from exc


def parity(
    model: nn.Module,
    session: ort.InferenceSession | str | Path,
    yx_sizes: Sequence[tuple[int, int]],
    batch: int = 1,
    seed: int = 0,
) -> float:
    """Max absolute difference between torch and onnxruntime outputs over the given YX sizes."""
    if not hasattr(session, "run"):
        session = create_ort_session(session, device="cpu")
    spec = get_spec(model)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    was_training = model.training
    model.eval()
    try:
        for y, x in yx_sizes:
            inp = torch.randn(batch, spec.in_channels, spec.z_window_size, y, x, generator=gen)
            with torch.no_grad():
                ref = _FirstOutput(model)(inp).numpy()
            out = session.run(["output"], {"input": inp.numpy()})[0]
            if out.shape != ref.shape:
                raise ModelError(f"ONNX output shape {out.shape} != torch {ref.shape} at YX {y}x{x}")
            worst = max(worst, float(np.abs(out - ref).max()))
    finally:
        model.train(was_training)
    return worst


def run_export(config: ExportConfig) -> ExportResult:
    """``viscy export``: build (and load) the model, export it with metadata, check parity, summarise.

    The model is given by a self-describing ``best_model.pt`` (``model.checkpoint`` alone), or by name, kwargs
    and weights. An existing output is replaced only with ``overwrite: true`` and only if viscy exported it.
    """
    from viscy.config import save_config

    t0 = time.perf_counter()
    if config.format != "onnx":
        raise ModelError(f"run_export writes ONNX; export format {config.format!r} through viscy.api.export")
    mc = config.model
    output = Path(config.output)
    if output.suffix != ".onnx":
        output = output.with_suffix(".onnx")
    check_export_output(output, config.overwrite)
    name, kwargs, card = resolve_model_source(mc.name, mc.kwargs, mc.checkpoint)
    model = create_model(name, checkpoint=mc.checkpoint, **kwargs).eval()
    norm = [n.model_dump(mode="json") for n in config.normalization] if config.normalization is not None else None
    meta = onnx_metadata(
        model,
        name=name,
        kwargs=kwargs,
        card=card,
        source_channels=config.source_channels,
        target_channels=config.target_channels,
        normalization=norm,
    )
    # Written under a temporary name and renamed only after the parity check passes, so a failed export
    # never leaves a file that looks usable.
    partial = new_partial(output)
    spec = get_spec(model)
    try:
        export_onnx(model, partial, example_yx=tuple(config.example_yx), opset=config.opset, metadata=meta)
        diff: float | None = None
        if config.check_parity:
            yx = spec.padded_yx(*config.example_yx)
            diff = parity(model, partial, [yx])
            if diff > PARITY_TOL:
                raise ModelError(f"ONNX output differs from torch by {diff:.3g} at YX {yx}; export is not faithful")
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    config_path = save_config(config, output.parent, "export", filename=output.stem + ".viscy_config.yaml")
    size_mb = output.stat().st_size / 2**20
    written = read_card(output)
    hint = "" if written.names_channels else " (pass --source_channels/--target_channels to name the channels)"
    print(
        f"viscy export: {written.describe()} -> {output} ({size_mb:.1f} MiB, opset {config.opset}"
        + (f", parity max|diff| {diff:.1e}" if diff is not None else ", parity not checked")
        + f", {time.perf_counter() - t0:.1f} s){hint}"
    )
    return ExportResult(onnx=output, config=config_path, card=written, parity_max_abs_diff=diff)


@dataclass(frozen=True)
class ExportResult:
    """What ``viscy export`` wrote."""

    onnx: Path  # the written file: the .onnx, or the package's .zip with format bioimageio
    config: Path
    card: ModelCard  # as read back from the written file
    parity_max_abs_diff: float | None


def new_partial(output: Path) -> Path:
    """A new, empty file beside ``output`` to write it under until it is checked (a unique name: never a file of
    the user's, which a fixed name such as ``<name>.partial`` could be)."""
    import os
    import tempfile

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{output.stem}.", suffix=f".partial{output.suffix}", dir=output.parent)
    os.close(fd)
    return Path(name)


def _onnx_of_viscy(path: Path) -> bool:
    try:
        return any(key.startswith(ONNX_PREFIX) for key in read_onnx_props(path)[0])
    except ModelError:
        return False


def check_export_output(output: Path, overwrite: bool, ours: Callable[[Path], bool] = _onnx_of_viscy) -> None:
    """Refuse to replace a file viscy did not export (``ours`` tells), or any existing file without ``overwrite``."""
    if not output.exists() and not output.is_symlink():
        return
    if output.is_symlink():
        raise ModelError(f"output {output} is a link; it is left untouched. Choose another --output")
    if output.is_dir():
        raise ModelError(f"output {output} is a directory; give a file path ending in {output.suffix or '.onnx'}")
    if not ours(output):
        raise ModelError(
            f"output {output} exists and was not written by `viscy export`; it is left untouched. "
            "Choose another --output"
        )
    if not overwrite:
        raise ModelError(
            f"output {output} already exists; pass --overwrite true to replace it, or choose another --output"
        )
