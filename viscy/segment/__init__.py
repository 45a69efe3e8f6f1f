"""Instance segmentation shared by ``evaluate``, ``predict`` and ``serve``: one segmenter set, one schema, one
set of metrics, one per-object table."""

from viscy.segment.config import SegmenterConfig
from viscy.segment.measure import object_table
from viscy.segment.metrics import SEGMENTATION_METRICS, segmentation_metrics
from viscy.segment.segmenters import SEGMENTERS, check_segmenter, get_segmenter, label_stack, register

__all__ = [
    "SEGMENTATION_METRICS",
    "SEGMENTERS",
    "SegmenterConfig",
    "check_segmenter",
    "get_segmenter",
    "label_stack",
    "object_table",
    "register",
    "segmentation_metrics",
]
