"""OpenAI request shapes as pydantic models, the chat template, and the response bodies.

Requests are validated strictly (a string where a number belongs is a 422 naming the field) from the raw body in one
pass (``model_validate_json``). Fields OpenAI defines that MuAI does not use (``logprobs``, ``presence_penalty``,
``user``, ...) are accepted and ignored, so the official clients work unchanged; ``conversation_id`` is MuAI's own
extra field: turns of one conversation that carry it reuse the engine's cached key/value state.

Chat template. The tiny models have no chat template of their own, so chat messages are rendered with one simple,
documented template (:func:`render_chat`)::

    <|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>

Each message is ``<|{role}|>\\n{content}\\n``; the prompt ends with ``<|assistant|>\\n``. An assistant message renders
exactly as the model's earlier output followed the earlier prompt, so the next turn's prompt extends the previous
turn's prompt + completion textually, which is what KV-cache reuse needs.
"""

from __future__ import annotations

import base64
import itertools
import struct
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from orchestrator.workflows import render_messages

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 256  # OpenAI has no bound here; MuAI caps an unset max_tokens at this
MAX_N = 16
MAX_TOKENS = 2**31 - 1
"""Largest ``max_tokens`` accepted (a 422 beyond): no context comes near it, and a value past 64 bits would reach the
engines and the span attributes (whose OTLP encoder logs a trace for every span) as it came."""
MAX_ITEMS = 256
"""Most prompts x ``n`` (completions) or texts (embeddings) one request may carry: a request holds one admission
slot, so without a cap one request could bring more work than the whole queue bound allows."""


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class StreamOptions(_Request):
    include_usage: bool = False


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class _Sampling(_Request):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    conversation_id: str | None = Field(None, min_length=1, max_length=256)
    ignore_eos: bool = Field(False, description="vLLM's extension: generate `max_tokens` tokens even past the "
                                                "model's end-of-sequence token (fixed-length outputs for benchmarks).")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,) if self.stop else ()
        return tuple(s for s in self.stop if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    model: str = Field(..., min_length=1)
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _bounded(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        if isinstance(value, list):
            n = info.data.get("n", 1)  # validated before prompt (field order)
            if len(value) * n > MAX_ITEMS:
                raise ValueError(f"{len(value)} prompts x n={n} is more than {MAX_ITEMS} completions per request; "
                                 "split it into several requests")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def max_new_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    model: str = Field(..., min_length=1)
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)

    def max_new_tokens(self) -> int:
        for value in (self.max_completion_tokens, self.max_tokens):
            if value is not None:
                return value
        return DEFAULT_CHAT_MAX_TOKENS


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings`` (text input; token-id input is refused with a 422)."""

    model: str = Field(..., min_length=1)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) > MAX_ITEMS:
            raise ValueError(f"{len(value)} inputs is more than {MAX_ITEMS} per request; split it into several requests")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class WorkflowRequest(_Request):
    """``POST /v1/workflows/{name}``: the workflow's parameters."""

    parameters: dict[str, Any] = Field(default_factory=dict)


class CordonRequest(BaseModel):
    """``POST /admin/devices/{id}/cordon``'s optional body: why (shown in readiness and the inventory). Closed: an
    admin who misspells ``reason`` is told, not ignored."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=1000)


def render_chat(messages: list[ChatMessage]) -> str:
    """The documented chat template (module docstring), shared with the ``chat`` workflow."""
    return render_messages([{"role": m.role, "content": m.text()} for m in messages])


_ID_PREFIX = uuid.uuid4().hex[:12]
_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    """Unique per process and across processes (a random prefix), without the cost of a uuid per request."""
    return f"{prefix}-{_ID_PREFIX}{next(_ids):x}"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(value: str | None) -> str | None:
    # OpenAI knows stop | length | content_filter | tool_calls; an engine's "error" never reaches a client as one.
    return value if value in ("stop", "length") else ("stop" if value else None)


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # OpenAI's base64 form: little-endian float32, what the official client decodes.
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The one error shape (OpenAI's)."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


__all__ = [
    "DEFAULT_CHAT_MAX_TOKENS",
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "MAX_ITEMS",
    "MAX_N",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "EmbeddingRequest",
    "WorkflowRequest",
    "encode_embedding",
    "error_body",
    "finish_reason",
    "new_id",
    "render_chat",
    "usage",
]
