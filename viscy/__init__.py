"""viscy: distributed virtual staining of label-free microscopy on Ray."""

import os as _os

# Ray (>= 2.59) protects clusters with a token; its clients must say so before Ray is imported.
_os.environ.setdefault("RAY_AUTH_MODE", "token")

__version__ = "0.1.0"
