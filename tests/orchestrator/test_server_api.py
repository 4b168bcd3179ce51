"""The real server on a free port with the echo engine: OpenAI shapes, the error matrix, admission, timeouts,
readiness (preload, degradation, a stuck engine), the admin API and /metrics."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import shutil
import socket
import struct
import subprocess

import pytest
from test_server_support import ADMIN_TOKEN, echo_config, free_port, poll, running_app

from adapters.echo import EchoFaults

pytestmark = pytest.mark.timeout(120)
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ERROR_KEYS = {"message", "type", "code", "param"}


async def error_of(resp, status: int) -> dict:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


# ---------------------------------------------------------------------------------------------------------------
# OpenAI shapes


async def test_completion_chat_embedding_and_models_shapes(tmp_path):
    async with running_app(echo_config(tmp_path)) as (client, state):
        resp = await client.post("/v1/completions", json={"model": "echo", "prompt": ["a b c", "d e"], "max_tokens": 2})
        body = await resp.json()
        assert resp.status == 200, body
        assert body["object"] == "text_completion" and body["model"] == "echo"
        assert [c["text"] for c in body["choices"]] == ["b c", "d e"]
        assert [c["index"] for c in body["choices"]] == [0, 1]
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}

        resp = await client.post("/v1/chat/completions", json={
            "model": "echo", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 64, "conversation_id": "c1", "user": "ignored-openai-field"})
        body = await resp.json()
        assert resp.status == 200, body
        assert body["object"] == "chat.completion"
        choice = body["choices"][0]
        # The echo engine returns its prompt: the documented chat template.
        assert choice["message"] == {"role": "assistant", "content": "<|system|> be brief <|user|> hi <|assistant|>"}
        assert choice["finish_reason"] == "stop"
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]

        resp = await client.post("/v1/embeddings", json={"model": "echo-embed", "input": ["x", "y y"]})
        body = await resp.json()
        assert resp.status == 200, body
        assert [d["index"] for d in body["data"]] == [0, 1]
        floats = body["data"][0]["embedding"]
        assert len(floats) == 8 and abs(sum(v * v for v in floats) - 1) < 1e-6
        assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}

        resp = await client.post("/v1/embeddings", json={"model": "echo-embed", "input": "x", "encoding_format": "base64"})
        encoded = (await resp.json())["data"][0]["embedding"]
        decoded = struct.unpack("<8f", base64.b64decode(encoded))
        assert decoded == pytest.approx(floats, abs=1e-6)

        resp = await client.get("/v1/models")
        assert [m["id"] for m in (await resp.json())["data"]] == ["echo", "echo-embed"]
        resp = await client.get("/v1/models/echo")
        assert (await resp.json())["id"] == "echo"
        await error_of(await client.get("/v1/models/nope"), 404)


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    return [json.loads(e) for e in events[:-1]]


async def test_streaming_chat_and_completion(tmp_path):
    async with running_app(echo_config(tmp_path)) as (client, state):
        resp = await client.post("/v1/chat/completions", json={
            "model": "echo", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 3,
            "stream": True, "stream_options": {"include_usage": True}})
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await resp.text())
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(e["object"] == "chat.completion.chunk" for e in events)
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert text == "two three <|assistant|>"
        finals = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
        assert finals == ["length"]
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3

        resp = await client.post("/v1/completions", json={"model": "echo", "prompt": "a b", "stream": True})
        events = sse_events(await resp.text())
        assert "".join(e["choices"][0]["text"] for e in events) == "a b"
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        assert state.admission.state.in_flight == 0


async def test_client_leaving_a_stream_releases_its_slot(tmp_path):
    config = echo_config(tmp_path, models=[{"name": "echo", "path": str(tmp_path), "engine": "echo",
                                            "inject_delay_s": 0.2}])
    async with running_app(config) as (client, state):
        resp = await client.post("/v1/completions", json={"model": "echo", "prompt": "a b c d", "stream": True})
        assert resp.status == 200
        resp.close()
        await poll(lambda: state.admission.state.in_flight == 0, what="the slot to be released")


async def test_a_stream_whose_close_fails_is_logged_and_the_server_goes_on(tmp_path, caplog):
    # Defect (e) of issue 12: a failure while closing an engine's stream was passed over without a word.
    held = asyncio.Event()
    faults = EchoFaults(hold_stream=held, fail_stream_close=True)
    async with running_app(echo_config(tmp_path), faults=faults) as (client, state):
        resp = await client.post("/v1/completions", json={"model": "echo", "prompt": "a b c d", "stream": True,
                                                          "max_tokens": 4})
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data: ")  # the first word, then the stream waits
        resp.close()  # the client leaves mid-stream
        held.set()  # the next chunk finds nobody: the server closes the engine's stream, which fails
        await poll(lambda: "closing the generation stream of echo failed" in caplog.text,
                   what="the failed close to be logged")
        await poll(lambda: state.admission.state.in_flight == 0, what="the slot to be released")
        faults.clear()
        resp = await client.post("/v1/completions", json={"model": "echo", "prompt": "a b", "max_tokens": 2})
        assert resp.status == 200 and (await resp.json())["choices"][0]["text"] == "a b"


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one error shape, the right status, never a crash


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", json.dumps({"prompt": "x"}).encode(), 422, "model"),
    ("/v1/completions", json.dumps({"model": "echo", "prompt": 5}).encode(), 422, "prompt"),
    ("/v1/completions", json.dumps({"model": "echo", "prompt": "x", "max_tokens": "9"}).encode(), 422, "max_tokens"),
    ("/v1/completions", json.dumps({"model": "echo", "prompt": "x", "max_tokens": 0}).encode(), 422, "max_tokens"),
    ("/v1/completions", json.dumps({"model": "echo", "prompt": "x", "temperature": "hot"}).encode(), 422, "temperature"),
    ("/v1/completions", json.dumps({"model": "echo", "prompt": ["a", "b"], "stream": True}).encode(), 422, "stream"),
    ("/v1/chat/completions", json.dumps({"model": "echo"}).encode(), 422, "messages"),
    ("/v1/chat/completions", json.dumps({"model": "echo", "messages": []}).encode(), 422, "messages"),
    ("/v1/chat/completions", json.dumps({"model": "echo", "messages": [{"role": "robot", "content": "x"}]}).encode(),
     422, "messages[0].role"),
    ("/v1/chat/completions", json.dumps({"model": "echo", "messages": [{"role": "user", "content": 3}]}).encode(),
     422, "messages[0].content"),
    ("/v1/chat/completions", json.dumps({"model": "echo-embed", "messages": [{"role": "user", "content": "x"}]}).encode(),
     400, "model"),
    ("/v1/embeddings", json.dumps({"model": "echo-embed", "input": [1, 2, 3]}).encode(), 422, "input"),
    ("/v1/embeddings", json.dumps({"model": "echo-embed", "input": "x", "dimensions": 4}).encode(), 422, "dimensions"),
    ("/v1/workflows/chat", json.dumps({"parameters": {"model": "echo"}}).encode(), 422, "parameters"),
    ("/v1/workflows/chat", json.dumps({"parameters": "x"}).encode(), 422, "parameters"),
    # One request holds one admission slot: its prompts x n and its inputs are capped (MAX_ITEMS = 256).
    ("/v1/completions", json.dumps({"model": "echo", "prompt": ["x"] * 17, "n": 16}).encode(), 422, "prompt"),
    ("/v1/completions", json.dumps({"model": "echo", "prompt": ["x"] * 257}).encode(), 422, "prompt"),
    ("/v1/embeddings", json.dumps({"model": "echo-embed", "input": ["x"] * 257}).encode(), 422, "input"),
]


@pytest.fixture
async def echo_app(tmp_path):
    async with running_app(echo_config(tmp_path, server={"max_body_bytes": 4096})) as pair:
        yield pair


@pytest.mark.parametrize("path,body,status,param", BAD)
async def test_bad_input_matrix(echo_app, path, body, status, param):
    client, state = echo_app
    resp = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    error = await error_of(resp, status)
    assert error["param"] == param
    if status == 422:
        assert error["message"].startswith(param)


async def test_unknown_model_lists_models_and_other_404_405_413(echo_app):
    client, state = echo_app
    error = await error_of(await client.post("/v1/chat/completions", json={
        "model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}), 404)
    assert error["code"] == "model_not_found" and "echo, echo-embed" in error["message"]
    error = await error_of(await client.post("/v1/workflows/nope", json={}), 404)
    assert "chat" in error["message"] and "embed_then_generate" in error["message"]
    await error_of(await client.get("/v1/nowhere"), 404)
    resp = await client.get("/v1/completions")
    await error_of(resp, 405)
    assert "POST" in resp.headers.get("Allow", "")
    error = await error_of(await client.post("/v1/completions", data=b"x" * 5000,
                                             headers={"Content-Type": "application/json"}), 413)
    assert error["code"] == "request_too_large"
    # Without a Content-Length (chunked), the limit holds too.
    async def chunks():
        for _ in range(10):
            yield b"y" * 1000
    await error_of(await client.post("/v1/completions", data=chunks()), 413)
    # Still serving.
    resp = await client.post("/v1/completions", json={"model": "echo", "prompt": "ok"})
    assert resp.status == 200
    rejected = state.metrics.registry.get_sample_value("muai_rejected_requests_total", {"reason": "unknown_model"})
    assert rejected == 2


# ---------------------------------------------------------------------------------------------------------------
# Admission and timeouts


async def test_queue_full_gets_429_with_retry_after_and_nothing_is_lost(tmp_path):
    config = echo_config(
        tmp_path,
        models=[{"name": "echo", "path": str(tmp_path), "engine": "echo", "inject_delay_s": 2.0}],
        server={"queue_capacity": 2, "retry_after_s": 3},
    )
    async with running_app(config) as (client, state):
        def complete():
            return client.post("/v1/completions", json={"model": "echo", "prompt": "a b", "max_tokens": 2})

        admitted = [asyncio.create_task(complete()) for _ in range(2)]
        await poll(lambda: state.admission.state.in_flight == 2, what="two admitted requests")
        refused = await asyncio.gather(*(complete() for _ in range(4)))
        for resp in refused:
            error = await error_of(resp, 429)
            assert resp.headers["Retry-After"] == "3" and error["code"] == "queue_full"
        done = await asyncio.wait_for(asyncio.gather(*admitted), 60)
        assert [r.status for r in done] == [200, 200]
        assert [(await r.json())["choices"][0]["text"] for r in done] == ["a b", "a b"]
        assert state.admission.state.in_flight == 0
        reg = state.metrics.registry
        assert reg.get_sample_value("muai_rejected_requests_total", {"reason": "queue_full"}) == 4
        assert reg.get_sample_value("muai_requests_total", {"model": "echo", "operation": "text_completion",
                                                            "status": "ok"}) == 2


async def test_a_queue_waiting_past_max_queue_wait_gets_429_queue_wait_and_admitted_requests_finish(tmp_path):
    import time

    config = echo_config(
        tmp_path,
        models=[{"name": "echo", "path": str(tmp_path), "engine": "echo", "inject_delay_s": 0.5}],
        batching={"enabled": False},  # one request runs at a time; the rest wait in the admission queue
        server={"max_queue_wait_s": 0.05, "retry_after_s": 2},
    )
    async with running_app(config) as (client, state):
        def complete():
            return client.post("/v1/completions", json={"model": "echo", "prompt": "a b", "max_tokens": 2})

        admitted = [asyncio.create_task(complete()) for _ in range(2)]
        await poll(lambda: state.admission.snapshot().waiting == 1, what="one request running, one waiting")
        await poll(lambda: state.admission.state.oldest_wait("echo", time.monotonic()) > 0.05,
                   what="the waiting request past the bound")
        resp = await complete()
        error = await error_of(resp, 429)
        assert error["code"] == "queue_wait" and resp.headers["Retry-After"] == "2"
        assert "server.max_queue_wait_s" in error["message"]
        done = await asyncio.wait_for(asyncio.gather(*admitted), 60)
        assert [r.status for r in done] == [200, 200]
        assert state.metrics.registry.get_sample_value("muai_rejected_requests_total", {"reason": "queue_wait"}) == 1
        # The line is empty again: the bound admits.
        assert (await complete()).status == 200


async def test_request_timeout_gives_504_and_frees_the_slot(tmp_path):
    config = echo_config(
        tmp_path,
        models=[{"name": "echo", "path": str(tmp_path), "engine": "echo", "inject_delay_s": 1.0}],
        server={"request_timeout_s": 0.2},
    )
    async with running_app(config) as (client, state):
        error = await error_of(await client.post("/v1/completions", json={"model": "echo", "prompt": "x"}), 504)
        assert error["type"] == "timeout_error"
        assert state.admission.state.in_flight == 0
        assert state.metrics.registry.get_sample_value(
            "muai_requests_total", {"model": "echo", "operation": "text_completion", "status": "timeout"}) == 1


async def test_a_request_timing_out_in_the_queue_is_admitted_measured_and_not_a_sign_of_life(tmp_path):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = echo_config(tmp_path, batching={"enabled": False}, server={"request_timeout_s": 0.3, "stuck_after_s": 0.2})
    async with running_app(config, tracer_provider=provider) as (client, state):
        # Batching off: one echo request runs at a time. Hold that slot, as a wedged request would.
        holder = state.admission.admit("echo")
        await state.admission.start(holder)
        try:
            error = await error_of(await client.post("/v1/completions", json={"model": "echo", "prompt": "x"}), 504)
            assert error["type"] == "timeout_error"
            # Admitted (it waited in the queue), so the sidecar sees it as a request: it counts that 504.
            root = next(sp for sp in exporter.get_finished_spans() if sp.name == "POST /v1/completions")
            assert root.attributes["muai.request"] is True
            assert root.attributes["gen_ai.operation.name"] == "text_completion"
            assert root.attributes["gen_ai.request.model"] == "echo"
            # Its latency is in the histogram like any admitted request's (the outcome is on muai_requests_total).
            reg = state.metrics.registry
            assert reg.get_sample_value("muai_request_latency_seconds_count", {"model": "echo", "engine": "echo"}) == 1
            assert reg.get_sample_value("muai_requests_total", {"model": "echo", "operation": "text_completion",
                                                                "status": "timeout"}) == 1
            # A timeout is not output: busy for longer than stuck_after_s with nothing out is stuck.
            resp = await client.get("/health/ready")
            body = await resp.json()
            assert resp.status == 503 and any(r.startswith("stuck:") for r in body["reasons"]), body
            assert body["requests"]["stalled_s"] >= 0.3
        finally:
            state.admission.finish(holder)


async def test_the_other_choices_stop_when_one_fails(tmp_path):
    from adapters.base import InvalidRequestError
    from adapters.echo import EchoEngine

    held: list[str] = []
    cancelled: list[str] = []
    release = asyncio.Event()  # never set: a choice only ends by cancellation

    class PickyEcho(EchoEngine):
        """The echo engine refusing prompts with "boom" at once and holding the others until released."""

        async def generate(self, batch):
            if any("boom" in r.prompt for r in batch):
                raise InvalidRequestError("boom is refused", engine=self.name)
            held.extend(r.prompt for r in batch)
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.extend(r.prompt for r in batch)
                raise
            return await super().generate(batch)

    config = echo_config(tmp_path, batching={"enabled": False})
    async with running_app(config, engine_factory=lambda name, settings: PickyEcho(settings)) as (client, state):
        resp = await client.post("/v1/completions", json={"model": "echo", "prompt": ["slow one", "boom"]})
        error = await error_of(resp, 400)
        assert "boom is refused" in error["message"]
        await poll(lambda: cancelled == ["slow one"], what="the other choice to be cancelled")
        assert held == ["slow one"] and state.admission.state.in_flight == 0


async def test_engine_failure_is_a_json_500_not_a_crash(tmp_path):
    faults = EchoFaults()
    config = echo_config(tmp_path, models=[{"name": "echo", "path": str(tmp_path), "engine": "echo"}],
                         engines={"torch": {"enabled": True}})
    async with running_app(config, faults=faults) as (client, state):
        faults.fail_generate_times = 1
        # The chain falls back to torch, which cannot load an empty directory: the request fails cleanly.
        resp = await client.post("/v1/completions", json={"model": "echo", "prompt": "x"})
        assert resp.status in (500, 503)
        await error_of(resp, resp.status)
        faults.clear()
        ok = await client.get("/health/live")
        assert ok.status == 200


# ---------------------------------------------------------------------------------------------------------------
# Readiness


async def test_readiness_follows_preload_failure_and_recovery(tmp_path):
    faults = EchoFaults(fail_load=True)
    config = echo_config(tmp_path, models=[{"name": "echo", "path": str(tmp_path), "engine": "echo"}])
    async with running_app(config, faults=faults, wait_ready=False) as (client, state):
        async def failed():
            resp = await client.get("/health/ready")
            body = await resp.json()
            return resp.status == 503 and body["models"]["echo"]["state"] == "failed" and body
        body = await poll(failed, timeout=60, what="the failed preload to show")
        assert any("required model echo failed" in r for r in body["reasons"])
        live = await client.get("/health/live")
        assert live.status == 200
        error = await error_of(await client.post("/v1/completions", json={"model": "echo", "prompt": "x"}), 503)
        assert error["code"] == "model_not_ready"
        faults.clear()
        resp = await client.post("/admin/models/echo/load", headers=AUTH)
        assert resp.status == 200, await resp.text()
        resp = await client.get("/health/ready")
        body = await resp.json()
        assert resp.status == 200 and body["models"]["echo"]["engine"] == "echo"


async def test_readiness_is_503_when_no_engine_serves_a_required_model(tmp_path):
    faults = EchoFaults()
    config = echo_config(tmp_path, models=[{"name": "echo", "path": str(tmp_path), "engine": "echo"}],
                         engines={"preference": ["echo"]})
    async with running_app(config, faults=faults) as (client, state):
        # One inference failure: echo is benched, and torch behind it cannot load an empty directory.
        faults.fail_generate_times = 1
        resp = await client.post("/v1/completions", json={"model": "echo", "prompt": "a b"})
        assert resp.status >= 500
        resp = await client.get("/health/ready")
        body = await resp.json()
        assert resp.status == 503 and body["status"] == "unavailable", body
        assert body["models"]["echo"]["state"] == "unavailable"
        assert any(r.startswith("required model echo is unavailable") for r in body["reasons"])


async def test_a_workflow_failing_on_a_model_not_ready_answers_503_not_500(tmp_path):
    config = echo_config(tmp_path, models=[
        {"name": "echo", "path": str(tmp_path), "engine": "echo", "preload": False, "required": False}])
    async with running_app(config) as (client, state):
        resp = await client.post("/v1/workflows/chat", json={"parameters": {"prompt": "hi"}})
        error = await error_of(resp, 503)
        assert error["code"] == "model_not_ready" and resp.headers["Retry-After"] == "1"
        assert error["message"].startswith("workflow 'chat': step 'generate' failed")
        assert state.metrics.registry.get_sample_value(
            "muai_requests_total", {"model": "chat", "operation": "workflow", "status": "error"}) == 1
        assert state.admission.state.in_flight == 0


async def test_readiness_shows_degradation_after_fallback(tmp_path):
    pytest.importorskip("torch")
    faults = EchoFaults()
    config = echo_config(tmp_path, models=[{"name": "tiny", "path": "builtin:tiny-llama", "engine": "echo"}],
                         batching={"enabled": False}, kv_cache={"enabled": False})
    async with running_app(config, faults=faults) as (client, state):
        faults.fail_generate_always = True
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2,
                                                          "temperature": 0})
        assert resp.status == 200, await resp.text()
        resp = await client.get("/health/ready")
        body = await resp.json()
        assert resp.status == 200 and body["status"] == "degraded"
        assert body["models"]["tiny"]["engine"] == "torch"
        assert any("echo" in reason for reason in body["degraded"])
        value = state.metrics.registry.get_sample_value(
            "muai_engine_fallbacks_total", {"model": "tiny", "from": "echo", "to": "torch", "reason": "inference_error"})
        assert value == 1
        assert state.metrics.registry.get_sample_value("muai_model_loaded", {"model": "tiny", "engine": "torch"}) == 1


async def test_readiness_detects_a_stuck_engine(tmp_path):
    config = echo_config(
        tmp_path,
        models=[{"name": "echo", "path": str(tmp_path), "engine": "echo", "inject_delay_s": 3.0}],
        server={"stuck_after_s": 0.3},
    )
    async with running_app(config) as (client, state):
        pending = asyncio.create_task(client.post("/v1/completions", json={"model": "echo", "prompt": "x"}))

        async def stuck():
            resp = await client.get("/health/ready")
            body = await resp.json()
            return resp.status == 503 and any(r.startswith("stuck:") for r in body["reasons"]) and body
        body = await poll(stuck, what="stuck readiness")
        assert body["requests"]["running"] + body["requests"]["waiting"] == 1
        resp = await asyncio.wait_for(pending, 30)
        assert resp.status == 200

        async def recovered():
            return (await client.get("/health/ready")).status == 200
        await poll(recovered, what="readiness after the engine answered")


# ---------------------------------------------------------------------------------------------------------------
# Admin API


async def test_admin_api_is_off_without_a_token(tmp_path):
    config = echo_config(tmp_path, server={"admin_token": None})
    async with running_app(config) as (client, state):
        await error_of(await client.get("/admin/config", headers=AUTH), 404)
        await error_of(await client.patch("/admin/config", json={"batching": {"max_batch_size": 2}}, headers=AUTH), 404)


async def test_admin_config_models_and_conversations(tmp_path):
    async with running_app(echo_config(tmp_path)) as (client, state):
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": ADMIN_TOKEN}):
            resp = await client.get("/admin/config", headers=headers)
            await error_of(resp, 401)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        body = await (await client.get("/admin/config", headers=AUTH)).json()
        assert body["config"]["server"]["admin_token"] == "***"

        resp = await client.patch("/admin/config", headers=AUTH, json={
            "batching": {"max_batch_size": 4}, "server.queue_capacity": 7, "telemetry.tracing.sampling_ratio": 0.5,
            "models": {"echo": {"inject_delay_s": 0.01}}})
        body = await resp.json()
        assert resp.status == 200, body
        assert set(body["changed"]) == {"batching.max_batch_size", "server.queue_capacity",
                                        "telemetry.tracing.sampling_ratio", "models.echo.inject_delay_s"}
        assert state.admission.state.capacity == 7
        assert state.config.batching.max_batch_size == 4
        assert state.manager.batcher("echo").batch_size <= 4

        error = await error_of(await client.patch("/admin/config", headers=AUTH, json={"server": {"port": 9}}), 409)
        assert error["param"] == "server.port" and "restart" in error["message"]
        error = await error_of(await client.patch("/admin/config", headers=AUTH,
                                                  json={"batching": {"max_batch_size": "big"}}), 422)
        await error_of(await client.patch("/admin/config", headers=AUTH, json={"nope": 1}), 422)
        await error_of(await client.patch("/admin/config", headers=AUTH, data=b"{"), 400)
        assert state.config.server.port == 8000

        resp = await client.post("/admin/models/echo/unload", headers=AUTH)
        assert (await resp.json()) == {"model": "echo", "unloaded": True}
        resp = await client.get("/health/ready")
        assert resp.status == 503  # a required model is unloaded: readiness says so
        resp = await client.post("/admin/models/echo/load", headers=AUTH)
        assert resp.status == 200 and (await resp.json())["status"]["state"] == "ready"
        await error_of(await client.post("/admin/models/nope/load", headers=AUTH), 404)

        resp = await client.delete("/admin/conversations/c-1", headers=AUTH)
        assert (await resp.json()) == {"conversation_id": "c-1", "released": False}


# ---------------------------------------------------------------------------------------------------------------
# Metrics


async def test_metrics_endpoint_counts_requests_and_passes_promtool(tmp_path):
    async with running_app(echo_config(tmp_path)) as (client, state):
        for _ in range(3):
            assert (await client.post("/v1/completions", json={"model": "echo", "prompt": "a b"})).status == 200
        resp = await client.post("/v1/chat/completions", json={
            "model": "echo", "messages": [{"role": "user", "content": "x"}], "stream": True})
        await resp.text()
        await client.post("/v1/embeddings", json={"model": "echo-embed", "input": "x"})

        async def sampled():
            text = await (await client.get("/metrics")).text()
            return "muai_process_resident_memory_bytes" in text and text
        text = await poll(sampled, what="the background sample")
        assert 'muai_requests_total{model="echo",operation="text_completion",status="ok"} 3.0' in text
        assert 'muai_request_latency_seconds_count{engine="echo",model="echo"} 4.0' in text
        assert 'muai_time_to_first_token_seconds_count{engine="echo",model="echo"} 1.0' in text
        assert 'muai_model_loaded{engine="echo",model="echo"} 1.0' in text
        assert "muai_batch_execution_count_total" in text
        assert 'muai_requests_running{model="echo"} 0.0' in text
        if shutil.which("promtool"):
            out = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
            assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), (out.stdout + out.stderr).decode()


async def test_separate_metrics_port_and_a_port_that_cannot_be_bound(tmp_path):
    port = free_port()
    config = echo_config(tmp_path, telemetry={"metrics": {"port": port, "path": "/prom"}})
    async with running_app(config) as (client, state):
        assert (await client.get("/metrics")).status == 404
        async with client.session.get(f"http://127.0.0.1:{port}/prom") as resp:
            assert resp.status == 200 and "muai_rejected_requests_total" in await resp.text()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = echo_config(tmp_path, telemetry={"metrics": {"port": taken.getsockname()[1]}})
        async with running_app(config) as (client, state):
            body = await (await client.get("/health/ready")).json()
            assert body["status"] == "degraded" and any("metrics port" in d for d in body["degraded"])
            assert (await client.post("/v1/completions", json={"model": "echo", "prompt": "x"})).status == 200


async def test_metrics_disabled_serves_without_them(tmp_path):
    config = echo_config(tmp_path, telemetry={"metrics": {"enabled": False}})
    async with running_app(config) as (client, state):
        assert state.metrics is None
        await error_of(await client.get("/metrics"), 404)
        assert (await client.post("/v1/completions", json={"model": "echo", "prompt": "x"})).status == 200


async def test_every_completion_of_a_multi_prompt_request_has_its_own_request_id(tmp_path):
    """Two prompts with n=2 are four generations: four distinct ids reach the engine (they once repeated per prompt)."""
    from adapters import registry
    from adapters.echo import EchoEngine

    seen: list[str] = []

    class RecordingEcho(EchoEngine):
        def _generate_sync(self, batch):
            seen.extend(req.request_id for req in batch)
            return super()._generate_sync(batch)

    def make(name, settings):
        return RecordingEcho(settings) if name == "echo" else registry.create_engine(name, settings)

    async with running_app(echo_config(tmp_path), engine_factory=make) as (client, state):
        resp = await client.post("/v1/completions", json={"model": "echo", "prompt": ["a b", "c d"], "n": 2,
                                                          "max_tokens": 2})
        body = await resp.json()
        assert resp.status == 200, body
        assert [c["text"] for c in body["choices"]] == ["a b", "a b", "c d", "c d"]
        assert len(seen) == 4 and len(set(seen)) == 4, seen
        assert all(rid.startswith(body["id"]) for rid in seen)


@pytest.mark.parametrize("path,method", [("/admin/config", "patch"), ("/v1/completions", "post"),
                                         ("/v1/chat/completions", "post"), ("/v1/embeddings", "post")])
async def test_a_body_nested_past_the_json_decoders_limit_is_a_400(tmp_path, path, method):
    deep = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    async with running_app(echo_config(tmp_path)) as (client, state):
        resp = await getattr(client, method)(path, data=deep, headers={**AUTH, "Content-Type": "application/json"})
        error = await error_of(resp, 400)
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json"
        assert "nested deeper than 200 levels" in error["message"], error


async def test_request_bodies_in_gzip_are_inflated_bounded_and_other_encodings_refused(tmp_path):
    limit = 4096
    body = json.dumps({"model": "echo", "prompt": "a b c", "max_tokens": 2}).encode()
    async with running_app(echo_config(tmp_path, server={"max_body_bytes": limit})) as (client, state):
        gz = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        resp = await client.post("/v1/completions", data=gzip.compress(body), headers=gz)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["choices"][0]["text"] == "b c"
        error = await error_of(await client.post("/v1/completions", data=b"\x1f\x8b\x08garbage", headers=gz), 400)
        assert error["code"] == "invalid_body"
        error = await error_of(await client.post("/v1/completions", data=gzip.compress(body)[:-12], headers=gz), 400)
        assert "truncated" in error["message"]
        # A small gzip that inflates past the limit is refused without inflating it all.
        bomb = gzip.compress(b'{"model": "echo", "prompt": "' + b"a" * (limit * 50) + b'"}')
        assert len(bomb) < limit
        error = await error_of(await client.post("/v1/completions", data=bomb, headers=gz), 413)
        assert error["code"] == "request_too_large"
        for encoding in ("br", "deflate", "compress"):
            error = await error_of(await client.post("/v1/completions", data=body,
                                                     headers={**gz, "Content-Encoding": encoding}), 415)
            assert error["code"] == "unsupported_encoding" and encoding in error["message"]
        error = await error_of(await client.patch("/admin/config", data=b"\x1f\x8bnot", headers={**AUTH, **gz}), 400)
        assert error["code"] == "invalid_body"
        assert (await client.get("/health/ready")).status == 200


@pytest.mark.parametrize("field,value", [("max_tokens", 2**70), ("seed", 2**70), ("seed", -(2**64))])
async def test_integers_past_what_engines_and_spans_carry_are_a_422(tmp_path, field, value):
    """A max_tokens past 64 bits reached the span attributes, whose OTLP encoder logged a traceback for every span."""
    async with running_app(echo_config(tmp_path)) as (client, state):
        resp = await client.post("/v1/completions", json={"model": "echo", "prompt": "a", field: value})
        error = await error_of(resp, 422)
        assert error["param"] == field
