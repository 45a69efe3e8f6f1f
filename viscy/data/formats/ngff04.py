"""OME-NGFF 0.4 on zarr v2 (what iohub 0.2 and VisCy write): NGFF metadata in each group's ``.zattrs``, the NGFF
version inside ``plate``, ``well`` and ``multiscales`` (a store that declares none is taken as 0.4)."""

from __future__ import annotations

from viscy.data.ngff import NgffReader
from viscy.data.reader import register_reader


@register_reader("ngff-0.4")
class Ngff04Reader(NgffReader):
    """NGFF 0.4 plates and images (zarr v2); pixels through tensorstore or zarr-python 2."""

    zarr_format = 2
