"""The public surface of the server's modules (pinned so changes are deliberate)."""

import orchestrator.admission
import orchestrator.health
import orchestrator.http
import orchestrator.metrics
import orchestrator.server
import orchestrator.tracing


def test_exported_members():
    assert set(orchestrator.server.__all__) == {
        "STATE", "ServerError", "ServerState", "create_app", "map_exception", "readiness", "serve"}
    assert set(orchestrator.http.__all__) == {
        "ApiError", "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "EmbeddingRequest",
        "WorkflowRequest", "error_body", "error_middleware", "render_chat"}
    assert {"AdmissionQueue", "AdmissionRejected", "AdmissionState", "Ticket"} <= set(orchestrator.admission.__all__)
    assert {"ServerMetrics", "ModelMetrics", "ResourceSampler", "ThroughputWindow"} <= set(orchestrator.metrics.__all__)
    assert {"build_tracing", "Tracing", "AdjustableRatioSampler", "ObservedSpanExporter",
            "extract_context", "inject_headers"} <= set(orchestrator.tracing.__all__)
    assert {"evaluate_readiness", "HealthState", "ModelRequirement", "Readiness"} <= set(orchestrator.health.__all__)
    for module in (orchestrator.server, orchestrator.http, orchestrator.admission, orchestrator.metrics,
                   orchestrator.tracing, orchestrator.health):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
