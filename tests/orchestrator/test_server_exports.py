"""The public surface of the server's modules (pinned so changes are deliberate)."""

import orchestrator.admission
import orchestrator.health
import orchestrator.http
import orchestrator.http.admin
import orchestrator.http.frame
import orchestrator.http.openai
import orchestrator.http.probes
import orchestrator.http.sse
import orchestrator.http.workflow_routes
import orchestrator.lifecycle
import orchestrator.metrics
import orchestrator.server
import orchestrator.state
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


def test_the_servers_parts_by_role():
    """server.py wires; each role lives in its own module (routes per API, the frame, SSE, admin, lifecycle)."""
    assert {"ServerState", "STATE", "running_limit", "refresh_status", "make_event_hook"} <= set(orchestrator.state.__all__)
    assert {"lifecycle", "shutdown_grace", "close_connections", "MIN_SHUTDOWN_GRACE_S"} <= set(orchestrator.lifecycle.__all__)
    assert {"Call", "traced", "map_exception"} <= set(orchestrator.http.frame.__all__)
    assert set(orchestrator.http.sse.__all__) == {"SSE_HEADERS", "stream_completion"}
    assert set(orchestrator.http.openai.__all__) == {"completions", "chat_completions", "embeddings", "list_models",
                                                     "get_model"}
    assert set(orchestrator.http.workflow_routes.__all__) == {"run_workflow"}
    assert set(orchestrator.http.probes.__all__) == {"live", "ready", "readiness", "metrics_endpoint"}
    assert {"admin_get_config", "admin_patch_config"} <= set(orchestrator.http.admin.__all__)
    for module in (orchestrator.state, orchestrator.lifecycle, orchestrator.http.frame, orchestrator.http.sse,
                   orchestrator.http.openai, orchestrator.http.workflow_routes, orchestrator.http.probes,
                   orchestrator.http.admin):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
