"""Checks of ``viscy predict``'s segmentation outputs shared by the predict tests: masks and the object table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def read_masks(store: Path, fov: str, name: str) -> np.ndarray:
    """A FOV's ``(T, Z, Y, X)`` label image ``name``, found the way any NGFF reader finds it (labels list,
    multiscales)."""
    from viscy.data.plate import Plate

    plate = Plate(store)
    assert name in plate.labels(fov), plate.labels(fov)
    key = plate.label_key(fov, name)
    return np.stack([plate.read(fov, t, array=key)[0] for t in range(plate.info(fov).shape[0])])


def _check_means(table: pd.Series, labels: np.ndarray, image: np.ndarray, ids: np.ndarray) -> None:
    """``table`` (indexed by label) holds the mean of ``image`` inside every object ``ids`` of ``labels``."""
    sums = np.bincount(labels.ravel(), weights=image.ravel().astype(np.float64), minlength=int(ids.max()) + 1)
    counts = np.bincount(labels.ravel(), minlength=int(ids.max()) + 1)
    expected = sums[ids] / counts[ids]
    if np.issubdtype(image.dtype, np.integer):  # summed exactly: the mean of the stored integers
        np.testing.assert_allclose(table.loc[ids], expected, rtol=1e-12)
    else:  # scikit-image sums float32 in float32
        np.testing.assert_allclose(table.loc[ids], expected, rtol=1e-5, atol=1e-6 * float(np.abs(image).max()))


def check_table(
    store: Path, source: Path, fovs: list[str], objects: int, mask: str, measured: list[str], columns: list[str]
) -> pd.DataFrame:
    """The job's table: one row per object of the masks ``mask`` (per FOV and t), with its area, the mean of each
    stored prediction channel and of each raw ``measured`` channel of ``source`` inside it; the table.

    ``columns`` are the table's expected columns; the prediction channels are the store's.
    """
    from viscy.data.plate import Plate

    table = pd.read_parquet(store / "viscy_objects.parquet")
    assert list(table.columns) == columns and len(table) == objects > 0
    pd.testing.assert_frame_equal(pd.read_csv(store / "viscy_objects.csv"), table, check_dtype=False)
    channel = mask.removesuffix("_masks")
    assert set(table.fov) <= set(fovs) and set(table.channel) == {channel}
    assert set(table.plate) == {Path(source).name}
    pred, raw = Plate(store), Plate(source)
    predicted = [c for c in pred.channel_names if c.endswith("_prediction")]
    for fov in fovs:
        for t, volume in enumerate(read_masks(store, fov, mask)):
            rows = table[(table.fov == fov) & (table.t == t)].set_index("label")
            ids, counts = np.unique(volume[volume > 0], return_counts=True)
            assert sorted(rows.index) == ids.tolist()
            if not len(ids):
                continue
            np.testing.assert_array_equal(rows.loc[ids, "area"], counts)
            images = pred.read(fov, t, pred.channel_indices(predicted))
            for name, image in zip(predicted, images, strict=True):
                _check_means(rows[f"mean_{name}"], volume, image, ids)
            images = raw.read(fov, t, raw.channel_indices(measured))
            for name, image in zip(measured, images, strict=True):  # as stored, not normalised or rescaled
                _check_means(rows[f"mean_{name}"], volume, image, ids)
    return table
