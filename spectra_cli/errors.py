"""The error hierarchy. Every message says what was wrong and what to do about it."""

from __future__ import annotations


class SpectraError(Exception):
    """Base class: an input or option problem the user can fix. The CLI prints it as one line."""


class CheckpointError(SpectraError):
    """A checkpoint path is missing, of an unknown format, truncated or corrupt."""


class ShapeMismatch(SpectraError):
    """A tensor does not have the shape (or dtype) the operation needs."""


class SelectionError(SpectraError):
    """Filters selected nothing, or named something that is not there."""


class BudgetError(SpectraError):
    """The work does not fit the memory budget (``--max-memory``)."""


class DeviceError(SpectraError):
    """The requested compute device is not available."""


class PolicyError(SpectraError):
    """A policy file is invalid."""
