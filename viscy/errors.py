"""Errors that users can act on: each message names the problem and the fix.

Every one is a :class:`ViscyError`, including :class:`viscy.config.ConfigError` (a bad config key or value,
also a ``ValueError``), which lives with the config base so that this module imports nothing of viscy.
"""

from __future__ import annotations


class ViscyError(Exception):
    """Base of every user-facing error; the CLI prints it without a traceback."""


class DataError(ViscyError):
    """Input data are missing, malformed or inconsistent."""


class ChannelNotFoundError(DataError, KeyError):
    """A channel name is not in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ShapeError(DataError):
    """A requested window or patch does not fit the data, or shapes disagree."""


class CorruptDataError(DataError):
    """A chunk could not be read or decoded."""


class ModelError(ViscyError):
    """A model or checkpoint cannot be built, loaded or exported."""
