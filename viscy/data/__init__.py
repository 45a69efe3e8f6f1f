"""OME-Zarr data layer: plates, synthetic plates, normalisation statistics and patches."""

from viscy.data.patches import PatchSampler, PatchSpec, build_augmentation, denormalize, normalization_params, normalize
from viscy.data.plate import Plate

__all__ = [
    "PatchSampler",
    "PatchSpec",
    "Plate",
    "build_augmentation",
    "denormalize",
    "normalization_params",
    "normalize",
]
