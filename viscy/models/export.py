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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from viscy.errors import ModelError
from viscy.models import create_model, get_spec, resolve_model
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
    normalization: Mapping[str, Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The metadata_props written into an exported file (all values are strings, JSON where structured)."""
    spec = get_spec(model)
    preset: Preset | None = getattr(model, "preset", None)
    if preset is not None:
        source_channels = source_channels or preset.source_channels
        target_channels = target_channels or preset.target_channels
        normalization = normalization if normalization is not None else preset.normalization
        name = name or preset.name
    source_channels = list(source_channels or [f"source_{i}" for i in range(spec.in_channels)])
    target_channels = list(target_channels or [f"target_{i}" for i in range(spec.out_channels)])
    if len(source_channels) != spec.in_channels or len(target_channels) != spec.out_channels:
        raise ModelError(
            f"channel names {source_channels} -> {target_channels} do not match the model's "
            f"{spec.in_channels} -> {spec.out_channels} channels"
        )
    meta = {
        "model_name": name or spec.architecture,
        "architecture": spec.architecture,
        "source_channels": json.dumps(source_channels),
        "target_channels": json.dumps(target_channels),
        "in_channels": str(spec.in_channels),
        "out_channels": str(spec.out_channels),
        "in_depth": str(spec.in_depth),
        "out_depth": str(spec.out_depth),
        "yx_multiple": str(spec.yx_multiple),
        "normalization": json.dumps(dict(normalization or {})),
        "kwargs": json.dumps(dict(kwargs or {}), default=str),
        "input_layout": "BCZYX",
    }
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
    for key in ("source_channels", "target_channels", "normalization", "kwargs"):
        if key in raw:
            out[key] = json.loads(raw[key])
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
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
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


def run_export(config: ExportConfig) -> int:
    """``viscy export``: build (and load) the model, export it with metadata, check parity, summarise."""
    from viscy.config import save_config

    t0 = time.perf_counter()
    mc = config.model
    arch, kwargs, preset = resolve_model(mc.name, mc.kwargs)
    model = create_model(mc.name, checkpoint=mc.checkpoint, **mc.kwargs).eval()
    output = Path(config.output)
    if output.suffix != ".onnx":
        output = output.with_suffix(".onnx")
    meta = onnx_metadata(model, name=preset.name if preset else arch, kwargs=kwargs)
    # Written under a temporary name and renamed only after the parity check passes, so a failed export
    # never leaves a file that looks usable.
    partial = output.with_name(output.stem + ".partial.onnx")
    try:
        export_onnx(model, partial, example_yx=tuple(config.example_yx), opset=config.opset, metadata=meta)
        spec = get_spec(model)
        diff_txt = "parity not checked"
        if config.check_parity:
            yx = spec.padded_yx(*config.example_yx)
            diff = parity(model, partial, [yx])
            if diff > PARITY_TOL:
                raise ModelError(f"ONNX output differs from torch by {diff:.3g} at YX {yx}; export is not faithful")
            diff_txt = f"parity max|diff|={diff:.2e} at {yx[0]}x{yx[1]}"
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    save_config(config, output.parent, "export")
    size_mb = output.stat().st_size / 2**20
    print(
        f"exported {meta[META_PREFIX + 'model_name']} ({arch}, Z {spec.in_depth}->{spec.out_depth}, "
        f"YX multiple {spec.yx_multiple}) to {output} ({size_mb:.1f} MiB, opset {config.opset}); "
        f"{diff_txt}; {time.perf_counter() - t0:.1f} s"
    )
    return 0
