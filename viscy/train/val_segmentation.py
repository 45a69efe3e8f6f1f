"""Segmentation scores of validation predictions: ``val_ap50_<channel>`` and ``val_f1_<channel>`` per epoch.

Each validation patch's prediction is segmented with the configured segmenter (``viscy.segment``) and its
instances are matched one-to-one to the reference's at IoU >= 0.5 (``viscy.segment.metrics.match_counts``). The
reference is the plate's ground-truth label image when ``trainer.val_segmentation.labels`` names one, else the
same segmentation of the target patch. Matches are pooled over the epoch's patches (and, under DDP, its ranks):
AP@0.5 = TP / (TP + FP + FN) as in Cellpose, F1@0.5 = 2 TP / (2 TP + FP + FN).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from viscy.train.config import SEGMENTATION_SCORES, ValSegmentationConfig


class InstanceMatchScore(Metric):
    """AP@0.5 (``score="ap50"``) or F1@0.5 (``"f1"``) from match counts summed over patches and ranks."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, score: str) -> None:
        super().__init__()
        if score not in SEGMENTATION_SCORES:
            raise ValueError(f"score must be one of {SEGMENTATION_SCORES}, got {score!r}")
        self.score = score
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, tp: int, fp: int, fn: int) -> None:
        self.tp += tp
        self.fp += fp
        self.fn += fn

    def compute(self) -> Tensor:
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        weight = 2 if self.score == "f1" else 1
        total = weight * tp + fp + fn
        # Nothing to find and nothing found is a perfect score, as in viscy.segment.metrics.
        return torch.where(total > 0, weight * tp / total.clamp_min(1), torch.ones_like(total)).float()


class ValSegmentationScorer:
    """Segment validation predictions and count their matches against the reference, per scored channel.

    Parameters
    ----------
    config
        ``trainer.val_segmentation``.
    channels
        The model's output channels, in order (``config.channels`` is a subset).
    """

    def __init__(self, config: ValSegmentationConfig, channels: list[str]) -> None:
        self.config = config
        self.index = {ch: channels.index(ch) for ch in config.channels}
        label_names = config.label_names()
        self.label_index = {ch: label_names.index(name) for ch, name in config.labels.items()}
        # Validation crops are the same every epoch: each target's segmentation is computed once.
        self._reference: dict[bytes, np.ndarray] = {}

    def _segment(self, image: np.ndarray) -> np.ndarray:
        from viscy.segment.segmenters import get_segmenter

        segment = get_segmenter(self.config)
        return segment(image[0] if image.shape[0] == 1 else image)

    def _target_masks(self, target: np.ndarray) -> np.ndarray:
        key = hashlib.blake2b(np.ascontiguousarray(target).tobytes(), digest_size=16).digest()
        if key not in self._reference:
            self._reference[key] = self._segment(target)
        return self._reference[key]

    def counts(self, pred: Tensor, target: Tensor, labels: Tensor | None) -> dict[str, tuple[int, int, int]]:
        """(TP, FP, FN) at IoU 0.5 per scored channel, summed over the batch.

        Parameters
        ----------
        pred, target
            (N, C, Z, Y, X) prediction and target patches (normalised).
        labels
            (N, L, Z, Y, X) ground-truth label patches (the batch's ``labels``), or None.
        """
        from viscy.segment.metrics import iou_matrix, match_counts

        pred_np, target_np = pred.detach().float().cpu().numpy(), target.detach().float().cpu().numpy()
        labels_np = None if labels is None else labels.detach().cpu().numpy().astype(np.int32)
        out = {}
        for ch, i in self.index.items():
            tp = fp = fn = 0
            for k in range(pred_np.shape[0]):
                if ch in self.label_index:
                    if labels_np is None:
                        raise RuntimeError(f"validation batch has no ground-truth labels for {ch}")
                    reference = labels_np[k, self.label_index[ch]]
                    reference = reference[0] if reference.shape[0] == 1 else reference
                else:
                    reference = self._target_masks(target_np[k, i])
                masks = self._segment(pred_np[k, i])
                a, b, c = match_counts(iou_matrix(reference, masks), 0.5)
                tp, fp, fn = tp + a, fp + b, fn + c
            out[ch] = (tp, fp, fn)
        return out
