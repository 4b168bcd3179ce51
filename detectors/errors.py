"""Errors raised by the detectors package."""

from __future__ import annotations

__all__ = ["DetectorError", "DetectorConfigError", "UnknownWindowError"]


class DetectorError(Exception):
    """Root of every error this package raises on purpose."""


class DetectorConfigError(DetectorError, ValueError):
    """An argument is out of its domain: a bad constructor argument, threshold or quantile."""


class UnknownWindowError(DetectorError, KeyError):
    """A window name that a :class:`~detectors.window.MultiWindow` was not built with."""
