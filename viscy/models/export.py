"""ONNX export with self-describing metadata, an onnxruntime session factory and a parity check.

The dynamo exporter is used: the legacy TorchScript exporter turns UNeXt2's 5D pixel shuffle into an
ATen fallback op that onnxruntime cannot load. Batch, Y and X are dynamic (Y and X as multiples of the
model's ``yx_multiple``); Z is fixed by the model.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from viscy.errors import ModelError
from viscy.models import create_model, get_spec, resolve_model_source
from viscy.models.card import ModelCard
from viscy.models.presets import Preset
from viscy.models.registry import ModelSpec

if TYPE_CHECKING:
    import onnxruntime as ort

    from viscy.config import ExportConfig

log = logging.getLogger(__name__)

META_PREFIX = "viscy."
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


def onnx_metadata(
    model: nn.Module,
    name: str | None = None,
    source_channels: Sequence[str] | None = None,
    target_channels: Sequence[str] | None = None,
    normalization: Sequence[Mapping[str, Any]] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    card: ModelCard | None = None,
) -> dict[str, str]:
    """The metadata_props written into an exported file (all values are strings, JSON where structured).

    Channel names and normalisation come from the explicit arguments, else the model card of the checkpoint,
    else the preset. Unknown channel names are left out (never invented), so ``viscy predict`` asks for them
    instead of looking for channels that do not exist. With channel names known, the full model card is
    stored as ``viscy.model_card``.
    """
    spec = get_spec(model)
    preset: Preset | None = getattr(model, "preset", None)
    base_sources = card.source_channels if card else preset.source_channels if preset else None
    base_targets = card.target_channels if card else preset.target_channels if preset else None
    base_norm = card.normalization if card else preset.normalization if preset else None
    sources = list(source_channels or base_sources or []) or None
    targets = list(target_channels or base_targets or []) or None
    norm = [dict(n) for n in (normalization if normalization is not None else base_norm or [])]
    name = name or (card.name if card else preset.name if preset else spec.architecture)
    kwargs = dict(kwargs if kwargs is not None else card.kwargs if card else {})
    for what, names, n in (("source", sources, spec.in_channels), ("target", targets, spec.out_channels)):
        if names is not None and len(names) != n:
            raise ModelError(f"{len(names)} {what} channel names {names} for a model with {n} {what} channel(s)")
    meta = {
        "model_name": name,
        "architecture": spec.architecture,
        "in_channels": str(spec.in_channels),
        "out_channels": str(spec.out_channels),
        "in_depth": str(spec.in_depth),
        "out_depth": str(spec.out_depth),
        "yx_multiple": str(spec.yx_multiple),
        "normalization": json.dumps(norm),
        "kwargs": json.dumps(kwargs, default=str),
        "input_layout": "BCZYX",
    }
    if sources is not None:
        meta["source_channels"] = json.dumps(sources)
    if targets is not None:
        meta["target_channels"] = json.dumps(targets)
    if sources is not None and targets is not None:
        full = ModelCard(
            name=name,
            kwargs=kwargs,
            spec=spec,
            source_channels=sources,
            target_channels=targets,
            normalization=norm,
            z_window_size=card.z_window_size if card else spec.in_depth,
            target_depth=card.target_depth if card else spec.out_depth,
            training=card.training if card else {},
        )
        meta["model_card"] = json.dumps(full.to_dict())
    return {META_PREFIX + k: v for k, v in meta.items()}


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
    example = torch.randn(2, spec.in_channels, spec.in_depth, ny * m, nx * m)
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


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """Parsed viscy metadata of an exported file (channel lists, depths, normalisation, ...)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"cannot read ONNX file {path}: {exc}") from exc
    raw = {p.key[len(META_PREFIX) :]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}
    if not raw:
        raise ModelError(f"{path} carries no viscy metadata; export it with `viscy export`")
    out: dict[str, Any] = dict(raw)
    for key in ("source_channels", "target_channels", "normalization", "kwargs", "model_card"):
        if key in raw:
            out[key] = json.loads(raw[key])
    if isinstance(out.get("normalization"), dict):  # files exported before normalisation groups: {channel: spec}
        out["normalization"] = [{"channels": [ch], **spec} for ch, spec in out["normalization"].items()]
    for key in ("in_channels", "out_channels", "in_depth", "out_depth", "yx_multiple"):
        if key in raw:
            out[key] = int(raw[key])
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    out["opset"] = opsets.get("ai.onnx")
    return out


def spec_from_metadata(meta: Mapping[str, Any]) -> ModelSpec:
    """The :class:`ModelSpec` recorded in an exported file's metadata."""
    return ModelSpec(
        architecture=meta["architecture"],
        in_channels=meta["in_channels"],
        out_channels=meta["out_channels"],
        in_depth=meta["in_depth"],
        out_depth=meta["out_depth"],
        yx_multiple=meta["yx_multiple"],
    )


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
            inp = torch.randn(batch, spec.in_channels, spec.in_depth, y, x, generator=gen)
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
        source_channels=config.source_channel,
        target_channels=config.target_channel,
        normalization=norm,
    )
    # Written under a temporary name and renamed only after the parity check passes, so a failed export
    # never leaves a file that looks usable.
    partial = output.with_name(output.stem + ".partial.onnx")
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
    parsed = read_onnx_metadata(output)
    channels = (
        f"{', '.join(parsed['source_channels'])} -> {', '.join(parsed['target_channels'])}"
        if "source_channels" in parsed and "target_channels" in parsed
        else "channel names unknown (pass --source_channel/--target_channel to name them)"
    )
    print(
        f"viscy export: {meta[META_PREFIX + 'model_name']} ({spec.architecture}, {channels}, Z {spec.in_depth}->"
        f"{spec.out_depth}) -> {output} ({size_mb:.1f} MiB, opset {config.opset}"
        + (f", parity max|diff| {diff:.1e}" if diff is not None else ", parity not checked")
        + f", {time.perf_counter() - t0:.1f} s)"
    )
    return ExportResult(onnx=output, config=config_path, metadata=parsed, parity_max_abs_diff=diff)


@dataclass(frozen=True)
class ExportResult:
    """What ``viscy export`` wrote."""

    onnx: Path
    config: Path
    metadata: dict[str, Any]
    parity_max_abs_diff: float | None


def check_export_output(output: Path, overwrite: bool) -> None:
    """Refuse to replace a file viscy did not export, or any existing file without ``overwrite``."""
    if not output.exists():
        return
    if output.is_dir():
        raise ModelError(f"output {output} is a directory; give a file path ending in .onnx")
    try:
        ours = bool(read_onnx_metadata(output))
    except ModelError:
        ours = False
    if not ours:
        raise ModelError(
            f"output {output} exists and was not written by `viscy export`; it is left untouched. "
            "Choose another --output"
        )
    if not overwrite:
        raise ModelError(
            f"output {output} already exists; pass --overwrite true to replace it, or choose another --output"
        )
