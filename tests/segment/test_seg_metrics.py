"""Segmentation metrics on hand-made label images with known answers, and against Cellpose's."""

from __future__ import annotations

import numpy as np
import pytest

from viscy.segment.metrics import IOU_THRESHOLDS, iou_matrix, match_counts, segmentation_metrics


def _discs(centres: list[tuple[int, int]], shape=(64, 64), r: int = 6) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for i, (y, x) in enumerate(centres, start=1):
        out[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = i
    return out


CENTRES = [(10, 10), (10, 50), (50, 10), (50, 50)]


def test_identical_labels() -> None:
    true = _discs(CENTRES)
    m = segmentation_metrics(true, true * 3)  # ids differ, objects do not
    assert m["ap_50_95"] == 1 and m["ap_50"] == 1 and m["f1_50"] == 1
    assert m["dice"] == 1 and m["jaccard"] == 1 and m["n_true"] == 4 == m["n_pred"]


def test_one_missing_object() -> None:
    true, pred = _discs(CENTRES), _discs(CENTRES[:3])
    m = segmentation_metrics(true, pred)
    assert m["ap_50"] == pytest.approx(3 / 4)  # TP / (TP + FP + FN) = 3 / (3 + 0 + 1)
    assert m["f1_50"] == pytest.approx(6 / 7)  # 2 TP / (2 TP + FP + FN)
    assert m["precision_50"] == 1 and m["recall_50"] == pytest.approx(3 / 4)
    assert m["dice"] == pytest.approx(2 * 3 / 7)
    assert m["jaccard"] == pytest.approx(3 / 4)


def test_shifted_and_extra_objects() -> None:
    true = _discs(CENTRES)
    # One object shifted by 6 px (IoU well below 0.5), one spurious object added.
    pred = _discs([(10, 10), (10, 50), (50, 10), (50, 56), (30, 30)])
    iou = iou_matrix(true, pred)
    assert iou.shape == (4, 5)
    assert iou[3, 3] < 0.5
    tp, fp, fn = match_counts(iou, 0.5)
    assert (tp, fp, fn) == (3, 2, 1)
    assert segmentation_metrics(true, pred)["ap_50"] == pytest.approx(3 / 6)


def test_empty_images() -> None:
    empty = np.zeros((16, 16), np.int32)
    assert segmentation_metrics(empty, empty)["ap_50_95"] == 1
    m = segmentation_metrics(_discs(CENTRES), np.zeros((64, 64), np.int32))
    assert m["ap_50"] == 0 and m["f1_50"] == 0 and m["dice"] == 0


def test_agrees_with_cellpose_average_precision() -> None:
    cp_metrics = pytest.importorskip("cellpose.metrics")
    rng = np.random.default_rng(5)
    true = _discs([tuple(c) for c in rng.integers(8, 120, (12, 2))], shape=(128, 128), r=7)
    pred = _discs([tuple(c) for c in rng.integers(8, 120, (12, 2))], shape=(128, 128), r=7)
    pred[true > 0] = np.where(pred[true > 0] > 0, pred[true > 0], true[true > 0] + 100)  # partial overlaps
    ap, tp, fp, fn = cp_metrics.average_precision(true, pred, threshold=list(IOU_THRESHOLDS))
    m = segmentation_metrics(true, pred)
    assert m["ap_50_95"] == pytest.approx(float(np.mean(ap)), abs=1e-6)
    assert m["ap_50"] == pytest.approx(float(ap[0]), abs=1e-6)
