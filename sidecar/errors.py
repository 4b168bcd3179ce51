"""The sidecar's error types: one root, leaves that also subclass the builtin they resemble."""

from __future__ import annotations


class SidecarError(Exception):
    """Root of every error the sidecar raises."""


class OtlpError(SidecarError, ValueError):
    """An OTLP request the receiver refuses; ``status`` is the HTTP status it answers with."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedPayload(OtlpError):
    """The body does not decode as an ExportTraceServiceRequest (400)."""

    status = 400


class PayloadTooLarge(OtlpError):
    """The body, as sent or after decompression, exceeds the configured limit (413)."""

    status = 413


class UnsupportedMediaType(OtlpError):
    """The Content-Type or Content-Encoding is not one OTLP/HTTP defines (415)."""

    status = 415


__all__ = ["MalformedPayload", "OtlpError", "PayloadTooLarge", "SidecarError", "UnsupportedMediaType"]
