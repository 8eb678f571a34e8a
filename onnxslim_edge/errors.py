"""Typed errors for bad user input.

Every error a user can cause (a corrupt model, a wrong data file, an unknown pass or
option, an impossible target) derives from `OnnxSlimEdgeError`. The CLI prints its
message as one line and exits with status 2; library callers catch it by type.
`assert` is kept for internal invariants only.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "InvalidModelError",
    "OnnxSlimEdgeError",
    "UnsupportedError",
    "first_line",
]


class OnnxSlimEdgeError(Exception):
    """Base class: an input problem the user can fix. The message is one line."""


class InvalidModelError(OnnxSlimEdgeError):
    """The model file is missing, corrupt, unsafe or fails the ONNX checker."""


class UnsupportedError(OnnxSlimEdgeError):
    """The model uses something a pass or runtime cannot handle (op, dtype, target)."""


class ConfigError(OnnxSlimEdgeError):
    """A pass name, option, recipe or target is unknown or has an invalid value."""


class DataError(OnnxSlimEdgeError):
    """Calibration/evaluation data is missing, malformed or does not fit the model."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
