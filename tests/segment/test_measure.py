"""The per-object table on hand-made label images with known centroids, sizes and means."""

from __future__ import annotations

import numpy as np
import pytest

from viscy.segment import object_table
from viscy.segment.measure import object_columns


def test_object_table_of_a_volume() -> None:
    labels = np.zeros((3, 8, 10), np.int32)
    labels[0, 1:3, 1:4] = 4  # 6 voxels in slice 0, centroid (0, 1.5, 2)
    labels[1:3, 5:7, 6:10] = 9  # 2 x 2 x 4 = 16 voxels, centroid (1.5, 5.5, 7.5)
    nuclei = np.zeros(labels.shape, np.float32)
    nuclei[labels == 4] = 2.0
    nuclei[1, 5:7, 6:10] = 1.0
    nuclei[2, 5:7, 6:10] = 3.0  # mean 2.0 over object 9
    dapi = labels.astype(np.uint16) * 10  # a measured input channel of another dtype

    table = object_table(labels, {"Nuclei": nuclei, "DAPI": dapi}, plate="p.zarr", fov="B/3/1", t=2, channel="Nuclei")

    assert list(table.columns) == [
        *("plate", "fov", "t", "channel", "label", "centroid_z", "centroid_y", "centroid_x", "area"),
        *("mean_Nuclei", "mean_DAPI"),
    ]
    assert table["label"].tolist() == [4, 9]
    assert table[["centroid_z", "centroid_y", "centroid_x"]].to_numpy().tolist() == [[0, 1.5, 2], [1.5, 5.5, 7.5]]
    assert table["area"].tolist() == [6, 16]
    assert table["mean_Nuclei"].tolist() == [2.0, 2.0]
    assert table["mean_DAPI"].tolist() == [40.0, 90.0]
    assert set(table["plate"]) == {"p.zarr"} and set(table["fov"]) == {"B/3/1"}
    assert set(table["t"]) == {2} and set(table["channel"]) == {"Nuclei"}


def test_object_table_of_a_2d_image_has_centroid_z_zero() -> None:
    labels = np.zeros((6, 6), np.int64)
    labels[2:4, 1:4] = 1
    table = object_table(labels, {"Nuclei": np.full((6, 6), 0.5)}, plate="p", fov="A/1/0", t=0, channel="Nuclei")
    assert table[["centroid_z", "centroid_y", "centroid_x", "area", "mean_Nuclei"]].to_numpy().tolist() == [
        [0, 2.5, 2, 6, 0.5]
    ]


def test_object_table_without_objects_is_empty_with_the_columns() -> None:
    empty = np.zeros((2, 5, 5), np.int32)
    table = object_table(empty, {"Nuclei": np.ones(empty.shape)}, plate="p", fov="A/1/0", t=1, channel="Nuclei")
    assert table.empty and list(table.columns) == object_columns(["Nuclei"])


def test_object_table_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="integer"):
        object_table(np.zeros((4, 4), np.float32), {}, plate="p", fov="f", t=0, channel="c")
    with pytest.raises(ValueError, match="'Nuclei' has shape"):
        object_table(np.zeros((4, 4), np.int32), {"Nuclei": np.zeros((4, 5))}, plate="p", fov="f", t=0, channel="c")
