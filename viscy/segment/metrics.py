"""Instance-segmentation metrics for one pair of label images.

They follow Cellpose's ``metrics.average_precision``: instances are matched one-to-one (Hungarian assignment on
IoU, a pair counts at threshold ``th`` when its IoU >= ``th``), and the "average precision" at ``th`` is
``TP / (TP + FP + FN)``. ``ap_50_95`` averages it over IoU 0.50, 0.55, ..., 0.95. Dice and Jaccard are computed
on the binary foreground (any label > 0).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

SEGMENTATION_METRICS = ("ap_50_95", "ap_50", "ap_75", "f1_50", "precision_50", "recall_50", "dice", "jaccard")
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU between every true instance (rows, ids in order) and every predicted instance (columns)."""
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {true.shape} vs {pred.shape}")
    t_ids, t_idx = np.unique(true, return_inverse=True)
    p_ids, p_idx = np.unique(pred, return_inverse=True)
    n_t, n_p = len(t_ids), len(p_ids)
    overlap = np.bincount(t_idx.ravel() * n_p + p_idx.ravel(), minlength=n_t * n_p).reshape(n_t, n_p)
    area_t, area_p = overlap.sum(1), overlap.sum(0)
    union = area_t[:, None] + area_p[None, :] - overlap
    iou = overlap / np.maximum(union, 1)
    return iou[t_ids > 0][:, p_ids > 0]


def match_counts(iou: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(TP, FP, FN) of the one-to-one matching that maximises matches with IoU >= ``threshold``."""
    n_true, n_pred = iou.shape
    if n_true == 0 or n_pred == 0:
        return 0, n_pred, n_true
    # As in Cellpose: assign on a cost that rewards pairs above threshold, then count those pairs.
    above = iou >= threshold
    cost = -(above.astype(np.float64) + iou / (2 * max(n_true, n_pred)))
    rows, cols = linear_sum_assignment(cost)
    tp = int(above[rows, cols].sum())
    return tp, n_pred - tp, n_true - tp


def segmentation_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """AP@[0.5:0.95], AP@0.5, AP@0.75, F1/precision/recall@0.5, foreground Dice and Jaccard.

    Parameters
    ----------
    true, pred
        Integer label images of equal shape (0 is background).

    Returns
    -------
    dict
        One float per name in ``SEGMENTATION_METRICS`` plus ``n_true`` and ``n_pred`` instance counts.
        With no instances in either image every score is 1 (nothing to find, nothing found).
    """
    iou = iou_matrix(np.asarray(true), np.asarray(pred))
    n_true, n_pred = iou.shape
    ap = {}
    for th in IOU_THRESHOLDS:
        tp, fp, fn = match_counts(iou, th)
        ap[th] = tp / (tp + fp + fn) if tp + fp + fn else 1.0
    tp, fp, fn = match_counts(iou, 0.5)
    fg_t, fg_p = np.asarray(true) > 0, np.asarray(pred) > 0
    inter, total = int(np.sum(fg_t & fg_p)), int(fg_t.sum() + fg_p.sum())
    union = int(np.sum(fg_t | fg_p))
    return {
        "ap_50_95": float(np.mean(list(ap.values()))),
        "ap_50": ap[0.5],
        "ap_75": ap[0.75],
        "f1_50": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "precision_50": tp / (tp + fp) if tp + fp else (1.0 if n_true == 0 else 0.0),
        "recall_50": tp / (tp + fn) if tp + fn else 1.0,
        "dice": 2 * inter / total if total else 1.0,
        "jaccard": inter / union if union else 1.0,
        "n_true": float(n_true),
        "n_pred": float(n_pred),
    }
