"""Online inference on Ray Serve: the application (:mod:`viscy.serve.app`), ``viscy serve`` and a client."""

from viscy.serve.client import ServeClient, ServeError, StainResult, StainSegmentResult

__all__ = ["ServeClient", "ServeError", "StainResult", "StainSegmentResult"]
