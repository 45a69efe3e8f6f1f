"""Validation segmentation scores: match counts pooled over patches, ground truth or the target's segmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from viscy.segment.metrics import iou_matrix, match_counts
from viscy.segment.segmenters import classical_nuclei
from viscy.train.config import TrainConfig, TrainerConfig, ValSegmentationConfig
from viscy.train.val_segmentation import InstanceMatchScore, ValSegmentationScorer


def _blobs(centres: list[tuple[int, int]], yx: int = 48, radius: float = 5.0) -> np.ndarray:
    yy, xx = np.mgrid[:yx, :yx]
    image = np.zeros((yx, yx), np.float32)
    for cy, cx in centres:
        image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    return image


def test_scores_pool_matches_over_patches():
    ap, f1 = InstanceMatchScore("ap50"), InstanceMatchScore("f1")
    for counts in [(3, 1, 0), (1, 0, 2)]:  # TP 4, FP 1, FN 2
        ap.update(*counts)
        f1.update(*counts)
    assert ap.compute().item() == pytest.approx(4 / 7)
    assert f1.compute().item() == pytest.approx(8 / 11)
    empty = InstanceMatchScore("ap50")
    empty.update(0, 0, 0)
    assert empty.compute().item() == 1.0  # nothing to find, nothing found
    with pytest.raises(ValueError, match="score must be"):
        InstanceMatchScore("ap75")


def test_scorer_against_target_segmentation_and_ground_truth():
    three = _blobs([(12, 12), (12, 36), (36, 24)])
    two = _blobs([(12, 12), (12, 36)])
    config = ValSegmentationConfig(channels=["Nuclei", "Membrane"], labels={"Membrane": "cells"}, diameter=10)
    scorer = ValSegmentationScorer(config, ["Nuclei", "Membrane"])
    # batch of 2 patches, 2 channels, one Z plane: the prediction misses one nucleus in the first patch
    pred = torch.from_numpy(np.stack([np.stack([two, three]), np.stack([three, three])])[:, :, None])
    target = torch.from_numpy(np.stack([np.stack([three, three]), np.stack([three, three])])[:, :, None])
    truth = classical_nuclei(three, 10)
    assert truth.max() == 3
    labels = torch.from_numpy(np.stack([truth, truth])[:, None, None].astype(np.float32))  # as Ray sends them
    counts = scorer.counts(pred, target, labels)
    assert counts["Nuclei"] == (2 + 3, 0, 1)
    assert counts["Membrane"] == (6, 0, 0)
    # ground truth is used as given: a reference with one object less than the prediction finds an extra one
    fewer = np.where(truth == 3, 0, truth)
    counts = scorer.counts(pred, target, torch.from_numpy(np.stack([fewer, fewer])[:, None, None].astype(np.float32)))
    tp, fp, fn = match_counts(iou_matrix(fewer, classical_nuclei(three, 10)), 0.5)
    assert counts["Membrane"] == (2 * tp, 2 * fp, 2 * fn) == (4, 2, 0)
    with pytest.raises(RuntimeError, match="no ground-truth labels for Membrane"):
        scorer.counts(pred, target, None)


def _train_tree(**seg) -> dict:
    return {"data": {"data_path": ["p.zarr"], "source_channels": ["Phase3D"], "target_channels": ["Nuclei"]},
            "trainer": {"val_segmentation": seg}}


def test_config_names_scored_channels_and_their_labels():
    assert TrainerConfig().val_segmentation.channels == []  # off by default
    config = TrainConfig.model_validate(_train_tree(channels=["Nuclei"], labels={"Nuclei": "nuclei"}))
    assert config.trainer.val_segmentation.label_names() == ("nuclei",)
    with pytest.raises(ValueError, match=r"not target channels; choose from \['Nuclei'\]"):
        TrainConfig.model_validate(_train_tree(channels=["Membrane"]))
    with pytest.raises(ValueError, match="labels name channels that are not scored"):
        TrainConfig.model_validate(_train_tree(channels=[], labels={"Nuclei": "nuclei"}))
    tree = _train_tree(channels=["Nuclei"])
    tree["trainer"]["fcmae"] = {"pretraining": True}
    with pytest.raises(ValueError, match="FCMAE pre-training predicts none"):
        TrainConfig.model_validate(tree)
