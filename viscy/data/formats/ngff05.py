"""OME-NGFF 0.5 on zarr v3 (ome-zarr-py 0.11+, iohub 0.3): NGFF metadata under ``attributes.ome`` of each group's
``zarr.json``, one ``ome.version`` per group; arrays sharded or not."""

from __future__ import annotations

from viscy.data.ngff import NgffReader
from viscy.data.reader import register_reader


@register_reader("ngff-0.5")
class Ngff05Reader(NgffReader):
    """NGFF 0.5 plates and images (zarr v3); pixels through tensorstore."""

    zarr_format = 3
