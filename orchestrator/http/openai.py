"""The OpenAI routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings`` and ``/v1/models``."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from adapters.base import (
    GenerationRequest,
    GenerationResult,
)
from orchestrator.http import errors as err
from orchestrator.http.frame import Call, sampling_params, traced
from orchestrator.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    encode_embedding,
    finish_reason,
    new_id,
    now_s,
    render_chat,
    usage,
)
from orchestrator.http.sse import stream_completion
from orchestrator.state import STATE


async def completions(request: web.Request) -> web.StreamResponse:
    return await traced(request, "text_completion", _completions)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await traced(request, "chat", _chat)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await traced(request, "embeddings", _embeddings)


async def _completions(call: Call) -> web.StreamResponse:
    body: CompletionRequest = await call.parse(CompletionRequest)
    model = call.resolve(body.model, "generate")
    sampling = sampling_params(body, body.max_new_tokens())
    request_id = new_id("cmpl")
    prompts = body.prompts()
    if not prompts:
        raise err.invalid_field("prompt", "prompt: give at least one prompt")
    # One id per generation (prompt x choice): the batcher and the engines tell requests apart by it.
    requests = [
        GenerationRequest(prompt, sampling, f"{request_id}-{p * body.n + i}", body.conversation_id)
        for p, prompt in enumerate(prompts) for i in range(body.n)
    ]
    if body.stream:
        if len(requests) != 1:
            raise err.invalid_field("stream", "stream: streaming takes one prompt and n = 1")
        return await stream_completion(call, model, requests[0], request_id, "text_completion", body.include_usage,
                                       echo_prompt=prompts[0] if body.echo else None)
    async with call.admitted(model):
        results = await _generate_all(call, model, requests, body.n)
    choices = []
    for index, result in enumerate(results):
        text = (prompts[index // body.n] + result.text) if body.echo else result.text
        choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason(result.finish_reason)})
    return web.json_response({
        "id": request_id, "object": "text_completion", "created": now_s(), "model": model, "choices": choices,
        "usage": usage(call.prompt_tokens, call.completion_tokens),
    })


async def _chat(call: Call) -> web.StreamResponse:
    body: ChatCompletionRequest = await call.parse(ChatCompletionRequest)
    model = call.resolve(body.model, "generate")
    sampling = sampling_params(body, body.max_new_tokens())
    request_id = new_id("chatcmpl")
    prompt = render_chat(list(body.messages))
    requests = [GenerationRequest(prompt, sampling, f"{request_id}-{i}", body.conversation_id) for i in range(body.n)]
    if body.stream:
        if body.n != 1:
            raise err.invalid_field("n", "n: streaming takes n = 1")
        return await stream_completion(call, model, requests[0], request_id, "chat", body.include_usage)
    async with call.admitted(model):
        results = await _generate_all(call, model, requests, body.n)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
         "finish_reason": finish_reason(r.finish_reason)}
        for i, r in enumerate(results)
    ]
    return web.json_response({
        "id": request_id, "object": "chat.completion", "created": now_s(), "model": model, "choices": choices,
        "usage": usage(call.prompt_tokens, call.completion_tokens),
    })


async def _generate_all(call: Call, model: str, requests: list[GenerationRequest], n: int) -> list[GenerationResult]:
    manager = call.state.manager
    if len(requests) == 1:
        results = [await manager.generate(model, requests[0])]
    else:
        tasks = [asyncio.ensure_future(manager.generate(model, r)) for r in requests]
        try:
            results = list(await asyncio.gather(*tasks))
        except BaseException:
            # gather leaves the other choices running after the first error; their answer has nowhere to go.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    for i, result in enumerate(results):
        if result.error is not None:
            raise result.error
        # OpenAI counts a prompt once however many choices (n) it has.
        call.result(result.prompt_tokens if i % n == 0 else 0, result.completion_tokens, result.finish_reason)
    return results


async def _embeddings(call: Call) -> web.StreamResponse:
    body: EmbeddingRequest = await call.parse(EmbeddingRequest)
    model = call.resolve(body.model, "embed")
    texts = body.texts()
    if not texts:
        raise err.invalid_field("input", "input: give at least one text")
    if body.dimensions is not None:
        raise err.invalid_field("dimensions", "dimensions: this server returns the model's own dimensions; omit it")
    async with call.admitted(model):
        results = await call.state.manager.embed(model, texts)
        for result in results:
            if result.error is not None:
                raise result.error
        call.result(sum(r.prompt_tokens for r in results), 0, None)
    data = [
        {"object": "embedding", "index": i, "embedding": encode_embedding(r.vector, body.encoding_format)}
        for i, r in enumerate(results)
    ]
    return web.json_response({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": call.prompt_tokens, "total_tokens": call.prompt_tokens},
    })


def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "muai"}


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"object": "list", "data": [_model_entry(m) for m in state.manager.models()]})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["model"]
    models = state.manager.models()
    if name not in models:
        raise err.unknown_model(name, models)
    return web.json_response(_model_entry(name))


__all__ = [
    "chat_completions",
    "completions",
    "embeddings",
    "get_model",
    "list_models",
]
