"""The HTTP layer's pieces: OpenAI request/response shapes and the one JSON error shape."""

from orchestrator.http.errors import ApiError, error_middleware
from orchestrator.http.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    WorkflowRequest,
    error_body,
    render_chat,
)

__all__ = [
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "EmbeddingRequest",
    "WorkflowRequest",
    "error_body",
    "error_middleware",
    "render_chat",
]
