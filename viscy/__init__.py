"""viscy: distributed virtual staining of label-free microscopy on Ray."""

import os as _os

# The private local cluster viscy starts uses Ray's token auth, and Ray's client reads the mode when it is
# imported. A process joining a cluster (RAY_ADDRESS) keeps the mode the user set for that cluster.
if not _os.environ.get("RAY_ADDRESS"):
    _os.environ.setdefault("RAY_AUTH_MODE", "token")

__version__ = "0.1.0"
