"""Instance segmenters shared by evaluate, predict and serve: a registry ``name -> factory(SegmenterConfig)``.

``classical`` (Gaussian smoothing, Otsu threshold, distance-transform watershed) needs no weights and suits
nuclei; ``cellpose`` wraps ``cellpose.models.CellposeModel`` (Cellpose >= 4, Cellpose-SAM). A segmenter is a
callable mapping a float image, 2D (Y, X) or a 3D volume (Z, Y, X) segmented as one volume, to an int32 label
image of the same shape (0 is background); :func:`label_stack` applies one to a Z stack.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from viscy.errors import ModelError, ViscyError
from viscy.segment.config import SegmenterConfig

Segmenter = Callable[[np.ndarray], np.ndarray]
CLASSICAL_DEFAULT_DIAMETER = 15.0

SEGMENTERS: dict[str, Callable[[SegmenterConfig], Segmenter]] = {}
_CACHE: dict[tuple, Segmenter] = {}


def register(name: str) -> Callable:
    """Decorator adding a segmenter factory to ``SEGMENTERS``."""

    def deco(factory: Callable[[SegmenterConfig], Segmenter]) -> Callable[[SegmenterConfig], Segmenter]:
        SEGMENTERS[name] = factory
        return factory

    return deco


def get_segmenter(config: SegmenterConfig) -> Segmenter:
    """The segmenter for a config, built once per process (Ray reuses workers, so models load once).

    Raises
    ------
    ViscyError
        If ``config.method`` is not registered.
    """
    if config.method not in SEGMENTERS:
        raise ViscyError(
            f"unknown segmentation method {config.method!r}; available: {', '.join(sorted(SEGMENTERS))}"
        )
    key = (config.method, config.model, config.diameter, str(config.gpu))
    if key not in _CACHE:
        _CACHE[key] = SEGMENTERS[config.method](config)
    return _CACHE[key]


def label_stack(volume: np.ndarray, segmenter: Segmenter, dims: str = "2d") -> np.ndarray:
    """Labels of a ``(Z, Y, X)`` volume: at once (``3d``) or slice by slice with ids offset so that they are unique
    in the volume (``2d``). The one way predict's stage and serve's ``Segmenter`` apply a segmenter to a stack."""
    if dims == "3d":
        return np.asarray(segmenter(volume), dtype=np.int32)
    out = np.zeros(volume.shape, dtype=np.int32)
    offset = 0
    for z, plane in enumerate(volume):
        labels = np.asarray(segmenter(plane), dtype=np.int32)
        out[z] = np.where(labels > 0, labels + offset, 0)
        offset += int(labels.max(initial=0))
    return out


# ---------------------------------------------------------------------------------------- classical
def classical_nuclei(image: np.ndarray, diameter: float = CLASSICAL_DEFAULT_DIAMETER) -> np.ndarray:
    """Segment bright blobs: Gaussian smooth, Otsu threshold, watershed on the distance transform.

    Parameters
    ----------
    image
        Intensity image (Y, X), or a volume (Z, Y, X) segmented as one volume (objects span slices), bright
        objects on a dark background. Voxels are taken as isotropic; a one-slice volume is segmented as 2D.
    diameter
        Typical object diameter in pixels; sets the smoothing, seed spacing and minimum object size.
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    img = np.asarray(image, dtype=np.float32)
    if img.ndim not in (2, 3):
        raise ValueError(f"classical segmentation needs a 2D image or a 3D volume, got shape {img.shape}")
    if img.ndim == 3 and img.shape[0] == 1:
        return classical_nuclei(img[0], diameter)[None]
    lo, hi = float(img.min()), float(img.max())
    if not hi > lo:
        return np.zeros(img.shape, dtype=np.int32)
    # Otsu and the watershed do not depend on the intensity scale; scaling to [0, 1] first keeps an image of
    # tiny (subnormal) float32 values from smoothing to NaN.
    img = ((img.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
    smooth = gaussian(img, sigma=max(diameter / 15.0, 0.5), preserve_range=True)
    if np.ptp(smooth) <= 0:
        return np.zeros(img.shape, dtype=np.int32)
    mask = smooth > threshold_otsu(smooth)
    # The smallest object kept: a disc of half the diameter in 2D; in 3D that disc's ball, cut to the stack's
    # depth (a ball's volume is its disc's area times 2/3 of its height), so a thin stack keeps its objects.
    min_area = np.pi * (diameter / 4) ** 2
    if img.ndim == 3:
        min_area *= min(diameter / 2, img.shape[0]) * 2 / 3
    min_area = max(int(min_area), 4)
    mask = remove_small_objects(mask, max_size=min_area - 1) if _has_max_size() else remove_small_objects(
        mask, min_size=min_area
    )
    if not mask.any():
        return np.zeros(img.shape, dtype=np.int32)
    dist = ndi.distance_transform_edt(mask)
    # Smooth the distance map so one elongated object keeps one peak.
    dist = gaussian(dist, sigma=max(diameter / 10.0, 0.5), preserve_range=True)
    peaks = peak_local_max(dist, min_distance=max(int(diameter / 3), 1), labels=ndi.label(mask)[0],
                           exclude_border=False)
    markers = np.zeros(img.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=mask)
    return labels.astype(np.int32)


def _has_max_size() -> bool:
    """skimage >= 0.26 replaced ``min_size`` of ``remove_small_objects`` by ``max_size``."""
    import inspect

    from skimage.morphology import remove_small_objects

    return "max_size" in inspect.signature(remove_small_objects).parameters


@register("classical")
def _classical(config: SegmenterConfig) -> Segmenter:
    diameter = config.diameter or CLASSICAL_DEFAULT_DIAMETER
    return lambda image: classical_nuclei(image, diameter)


# ----------------------------------------------------------------------------------------- cellpose
def cellpose_device(gpu: str | bool) -> bool:
    """Whether Cellpose should run on CUDA for ``gpu`` = "auto", True or False."""
    import torch

    if gpu == "auto":
        return torch.cuda.is_available()
    if gpu is True and not torch.cuda.is_available():
        raise ViscyError("segmentation.gpu is true but CUDA is not available here; set it to auto or false")
    return bool(gpu)


def check_cellpose(model: str, gpu: str | bool = "auto") -> bool:
    """Check that Cellpose is importable and ``model`` names a known model or an existing file.

    Returns
    -------
    bool
        Whether Cellpose will run on CUDA.

    Raises
    ------
    ModelError
        If cellpose is missing or the model is neither a known name nor an existing checkpoint.
    """
    try:
        from cellpose import models
    except ImportError as exc:
        raise ModelError(
            f"cellpose is not installed ({exc}); `pip install 'cellpose>=4'` or use method classical"
        ) from None
    use_gpu = cellpose_device(gpu)
    looks_like_path = os.sep in model or model.endswith((".pt", ".pth")) or Path(model).exists()
    if looks_like_path and not Path(model).is_file():
        raise ModelError(f"Cellpose checkpoint {model} does not exist; give a model name (e.g. cpsam) or a file")
    if not looks_like_path and model not in models.MODEL_NAMES + models.get_user_models():
        raise ModelError(
            f"unknown Cellpose model {model!r}; use one of {', '.join(models.MODEL_NAMES)} or a checkpoint path"
        )
    return use_gpu


def load_cellpose(model: str, gpu: str | bool = "auto"):
    """A ``cellpose.models.CellposeModel`` for a model name (downloaded to the cache once) or a checkpoint path.

    Raises
    ------
    ModelError
        If cellpose is missing, the model is unknown, or the weights cannot be downloaded or loaded.
    """
    use_gpu = check_cellpose(model, gpu)
    from cellpose import models

    try:
        # bfloat16 is fast on GPUs but slow and lossy on most CPUs.
        return models.CellposeModel(gpu=use_gpu, pretrained_model=str(model), use_bfloat16=use_gpu)
    except Exception as exc:
        raise ModelError(
            f"cannot load Cellpose model {model!r} ({type(exc).__name__}: {exc}). Without internet, download "
            f"the weights elsewhere into {models.MODEL_DIR} or pass a checkpoint path; or use method classical"
        ) from None


def check_segmenter(config: SegmenterConfig) -> None:
    """Validate a segmentation config without loading a model (cheap; run before any work starts)."""
    if config.method not in SEGMENTERS:
        raise ViscyError(
            f"unknown segmentation method {config.method!r}; available: {', '.join(sorted(SEGMENTERS))}"
        )
    if config.method == "cellpose":
        check_cellpose(config.model, config.gpu)


_CELLPOSE_NETS: dict[tuple[str, str], object] = {}


def cached_cellpose(model: str, gpu: str | bool = "auto"):
    """``load_cellpose`` once per process and (model, gpu): segmenters differing in diameter share the net."""
    key = (str(model), str(gpu))
    if key not in _CELLPOSE_NETS:
        _CELLPOSE_NETS[key] = load_cellpose(model, gpu)
    return _CELLPOSE_NETS[key]


@register("cellpose")
def _cellpose(config: SegmenterConfig) -> Segmenter:
    net = cached_cellpose(config.model, config.gpu)

    def run(image: np.ndarray) -> np.ndarray:
        # a copy: Cellpose normalises in place, and arrays from Ray's object store are read-only
        image = np.array(image, dtype=np.float32)
        if image.ndim == 3 and image.shape[0] == 1:
            return run(image[0])[None]
        # A volume is segmented in 3D (flows from the ZY, ZX and YX planes), not slice by slice.
        volume = {"do_3D": True, "z_axis": 0} if image.ndim == 3 else {}
        masks, _flows, _styles = net.eval(image, diameter=config.diameter, **volume)
        return np.asarray(masks).astype(np.int32)

    return run
