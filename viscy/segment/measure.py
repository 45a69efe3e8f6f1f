"""Per-object measurements of a label image: one row per object, built with ``skimage.measure.regionprops_table``."""

from __future__ import annotations

import numpy as np
import pandas as pd

ID_COLUMNS = ("plate", "fov", "t", "channel", "label")
GEOMETRY_COLUMNS = ("centroid_z", "centroid_y", "centroid_x", "area")


def object_columns(intensity_names: list[str] | tuple[str, ...]) -> list[str]:
    """The table's columns, in order, for intensities measured under ``intensity_names``."""
    return [*ID_COLUMNS, *GEOMETRY_COLUMNS, *(f"mean_{name}" for name in intensity_names)]


def object_table(
    labels: np.ndarray, intensities: dict[str, np.ndarray], *, plate: str, fov: str, t: int, channel: str
) -> pd.DataFrame:
    """One row per object of ``labels``: where it is, its size, and the mean of each intensity inside it.

    Parameters
    ----------
    labels
        Integer label image (Z, Y, X) or (Y, X); 0 is background.
    intensities
        Channel name -> intensity image of the same shape as ``labels``.
    plate, fov, t, channel
        Written into every row: the plate, the FOV's name, the time point and the segmented channel.

    Returns
    -------
    pandas.DataFrame
        Columns ``plate, fov, t, channel, label, centroid_z, centroid_y, centroid_x, area`` (pixels in 2D,
        voxels in 3D) and ``mean_<name>`` per intensity; rows sorted by label; no rows when there is no object.
        A (Y, X) image has ``centroid_z`` 0.

    Raises
    ------
    ValueError
        If ``labels`` is not a 2D or 3D integer array, or an intensity differs from it in shape.
    """
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    if labels.ndim not in (2, 3) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2D or 3D integer image, got {labels.dtype} of shape {labels.shape}")
    for name, image in intensities.items():
        if np.shape(image) != labels.shape:
            raise ValueError(f"intensity {name!r} has shape {np.shape(image)}, labels have {labels.shape}")
    volume = labels if labels.ndim == 3 else labels[None]
    geometry = regionprops_table(volume, properties=("label", "centroid", "area"))
    table = pd.DataFrame(
        {
            "plate": plate,
            "fov": fov,
            "t": int(t),
            "channel": channel,
            "label": geometry["label"].astype(np.int64),
            "centroid_z": geometry["centroid-0"],
            "centroid_y": geometry["centroid-1"],
            "centroid_x": geometry["centroid-2"],
            "area": geometry["area"].astype(np.int64),
        },
        index=pd.RangeIndex(len(geometry["label"])),
    )
    # One call per channel instead of one multichannel call: stacking the channels would copy the whole volume.
    for name, image in intensities.items():
        image = np.asarray(image)
        means = regionprops_table(
            volume, intensity_image=image if image.ndim == 3 else image[None], properties=("intensity_mean",)
        )
        table[f"mean_{name}"] = np.asarray(means["intensity_mean"], dtype=np.float64)
    return table[object_columns(list(intensities))]
