"""Errors of the training stack, under the package's typed hierarchy."""

from __future__ import annotations

from ..errors import PyBitNetError


class DataError(PyBitNetError):
    """A data file is missing or unreadable, or a record in it is malformed (the message names file, line)."""


class CheckpointError(PyBitNetError):
    """A training checkpoint is missing, incomplete, or does not match the model or optimizer resumed."""
