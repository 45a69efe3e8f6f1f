"""viscy: distributed virtual staining of label-free microscopy on Ray."""

__version__ = "0.1.0"
