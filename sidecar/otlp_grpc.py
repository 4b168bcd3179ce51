"""The OTLP/gRPC span receiver: opentelemetry-proto's ``TraceService/Export`` on ``sidecar.otlp_grpc_port``.

Many SDKs and vLLM export over gRPC by default, so the sidecar answers there too, beside OTLP/HTTP, with the
same decoding, mapping (:func:`sidecar.otlp.map_request`), limits and partial-success answers.

The method is registered with raw bytes in and out rather than through the generated servicer: grpcio answers a
request its deserializer cannot parse with a bare ``INTERNAL``, while decoding it here turns garbage into the
``INVALID_ARGUMENT`` (with a message) that OTLP asks for. The server is grpcio's asyncio one, created on the
sidecar's event loop, so the handler runs on that loop's thread like every other ingestion path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc
from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from sidecar.errors import OtlpError
from sidecar.otlp import PROTOBUF, decode_request, encode_response
from sidecar.state import ingest

if TYPE_CHECKING:
    from sidecar.app import SidecarState

log = logging.getLogger("muai.sidecar")

SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
METHOD = "Export"
ENCODING = "grpc"
"""The ``encoding`` label of ``muai_sidecar_export_requests_total`` for gRPC exports."""

# The HTTP receiver's statuses, as OTLP/gRPC's codes (the OTLP specification's table of retryable codes).
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          415: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE}


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcReceiver:
    """One grpcio asyncio server exposing ``TraceService/Export`` for one sidecar state.

    ``port`` 0 binds a free port (tests); :attr:`port` is the bound one after :meth:`start`.
    """

    def __init__(self, state: SidecarState, *, host: str, port: int) -> None:
        self._state = state
        self.host = host
        self.port = port
        self._server: aio.Server | None = None

    async def start(self) -> int:
        """Bind and start serving; raises ``RuntimeError`` when the address cannot be bound."""
        limit = self._state.config.receiver.max_body_bytes
        server = aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                # grpcio sets SO_REUSEPORT by default: a second sidecar (or a collector) on the same port would then
                # silently take half the exports instead of failing to bind.
                ("grpc.so_reuseport", 0),
            ]
        )
        handler = grpc.unary_unary_rpc_method_handler(self._export)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
        tls = self._state.config.tls
        if tls.enabled:
            # The same certificate as the HTTP port: spans are no less private over gRPC.
            with open(tls.key_file, "rb") as key, open(tls.cert_file, "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            bound = server.add_secure_port(_address(self.host, self.port), credentials)
        else:
            bound = server.add_insecure_port(_address(self.host, self.port))
        if not bound:  # older grpcio returns 0 instead of raising
            raise RuntimeError(f"could not bind OTLP/gRPC on {_address(self.host, self.port)}")
        await server.start()
        self._server, self.port = server, bound
        log.info("muai sidecar OTLP/gRPC listening on %s", _address(self.host, bound))
        return bound

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight exports finish within ``grace`` seconds, then close."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)

    async def _export(self, body: bytes, context: aio.ServicerContext) -> bytes:
        state = self._state
        metrics = state.metrics
        try:
            message, raw = decode_request(body, PROTOBUF)
        except OtlpError as exc:
            metrics.export(ENCODING, exc.status)
            await context.abort(_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
        mapped = ingest(state, message, raw, ENCODING)
        return encode_response(PROTOBUF, rejected=mapped.rejected, error_message=mapped.error_message)


async def start_receiver(state: SidecarState) -> GrpcReceiver | None:
    """Start the receiver ``sidecar.otlp_grpc_port`` asks for; ``None`` when it is off or cannot bind.

    A port already taken (often by an OpenTelemetry Collector on 4317) is logged and shown on ``/health`` as
    degraded rather than stopping the sidecar: OTLP/HTTP and everything else still work.
    """
    port = state.config.otlp_grpc_port
    if port is None:
        return None
    receiver = GrpcReceiver(state, host=state.config.host, port=port)
    try:
        await receiver.start()
    except (RuntimeError, OSError) as exc:
        log.error("muai sidecar OTLP/gRPC receiver not started: %s", exc)
        state.loop_errors["otlp_grpc"] = repr(exc)[:300]
        return None
    return receiver


__all__ = ["ENCODING", "METHOD", "SERVICE", "GrpcReceiver", "start_receiver"]
