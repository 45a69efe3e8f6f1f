"""Built-in plate formats, and :func:`open_plate`, which opens a path with the reader of its format.

Every module of this package is imported with it, so a format module placed here registers itself (with
``@register_reader``, see ``viscy.data.reader``) and needs no other edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from viscy.data.ngff import describe
from viscy.data.reader import READERS, PlateReader, reader_for
from viscy.errors import DataError

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def open_plate(path: str | Path, engine: str = "auto") -> PlateReader:
    """Open a plate, a position inside a plate, or a single-FOV store with the first registered reader that
    claims it (``viscy.data.reader.READERS``, in registration order).

    Raises
    ------
    DataError
        If ``path`` does not exist, no reader claims it (saying what it holds), or the reader refuses it.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path (plates usually end in .zarr)")
    cls = reader_for(path)
    if cls is None:
        others = [name for name in READERS if not name.startswith("ngff-")]
        also = f" (nor a plate of the other registered formats: {', '.join(others)})" if others else ""
        raise DataError(
            f"{path} is not an OME-Zarr HCS plate or image{also}: it is {describe(path)}. Point to the plate root "
            "(the group whose metadata hold 'plate') or convert the data with `iohub convert`"
        )
    return cls(path, engine)
