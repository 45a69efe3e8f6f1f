"""Prediction: one tiling engine (YX tiles, Z windows, TTA) and resumable plate prediction on Ray Data."""

from viscy.predict.tiling import TilingOptions, predict_stack, predict_yx

__all__ = ["TilingOptions", "predict_stack", "predict_yx"]
