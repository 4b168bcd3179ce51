"""Streamed generation as server-sent events (OpenAI's chunk shape, ending in ``data: [DONE]``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from opentelemetry.trace import Status, StatusCode

from adapters.base import (
    GenerationRequest,
)
from orchestrator.http.errors import ApiError
from orchestrator.http.frame import Call, dumps
from orchestrator.http.schemas import (
    finish_reason,
    now_s,
    usage,
)

log = logging.getLogger("orchestrator.server")  # one logger name for the whole server, as before the split


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def stream_completion(
    call: Call,
    model: str,
    gen_request: GenerationRequest,
    request_id: str,
    kind: str,
    include_usage: bool,
    *,
    echo_prompt: str | None = None,
) -> web.StreamResponse:
    """Server-sent events: ``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``.

    Headers go out with the first chunk, so a failure before it is an ordinary JSON error with its status; a
    failure after it is an ``error`` event followed by ``[DONE]``.
    """
    request = call.request
    created = now_s()
    response: web.StreamResponse | None = None
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text: str | None, finish: str | None, *, first: bool = False) -> dict[str, Any]:
        if kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [choice]}

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    client_gone = False
    try:
        async with call.admitted(model):
            stream = call.state.manager.generate_stream(model, gen_request)
            try:
                last_prompt = last_completion = 0
                async for piece in stream:
                    call.first_token()
                    if response is None:
                        response = web.StreamResponse(headers=SSE_HEADERS)
                        await response.prepare(request)
                        first_text = echo_prompt if echo_prompt is not None else ("" if kind == "chat" else None)
                        if kind == "chat" or first_text:
                            await send(chunk(first_text, None, first=True))
                    last_prompt = piece.prompt_tokens or last_prompt
                    last_completion = piece.completion_tokens or last_completion
                    if piece.text:
                        await send(chunk(piece.text, None))
                    if piece.finish_reason is not None:
                        await send(chunk(None if kind == "chat" else "", finish_reason(piece.finish_reason)))
                        call.finish_reasons.append(piece.finish_reason)
                call.prompt_tokens, call.completion_tokens = last_prompt, last_completion
            except (ConnectionResetError, ConnectionError):
                client_gone = True
                raise asyncio.CancelledError from None
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception as exc:  # noqa: BLE001 - the answer is already decided; say what was left open
                        log.warning("closing the generation stream of %s failed: %r", model, exc)
    except asyncio.CancelledError:
        if not client_gone:
            raise
        return response or web.Response(status=499)
    except ApiError as exc:
        if response is None:
            raise
        if call.recording:
            call.span.set_attribute("error.type", exc.code or str(exc.status))
            call.span.set_status(Status(StatusCode.ERROR, exc.message))
        try:
            await send({"error": {"message": exc.message, "type": exc.type, "code": exc.code, "param": exc.param}})
            await send("[DONE]")
        except (ConnectionResetError, ConnectionError):
            pass
        return response
    if response is None:  # a stream that produced nothing at all
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        await send(chunk(None if kind == "chat" else "", "stop"))
    try:
        if include_usage:
            await send({"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
                        "usage": usage(call.prompt_tokens, call.completion_tokens)})
        await send("[DONE]")
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass
    return response


__all__ = [
    "SSE_HEADERS",
    "stream_completion",
]
