"""The orchestrator's OpenAPI document: valid OpenAPI 3.1, the same routes as the server both ways, served at
/openapi.json, and schemathesis over every operation of a live server (echo engines) with every answer held
against the document; then every route with a body fed deep, huge and malformed bodies gets a 4xx."""

from __future__ import annotations

import asyncio

import pytest
from openapi_spec_validator import validate
from test_server_support import ADMIN_TOKEN, echo_config, running_app

from orchestrator.http.openapi import OPENAPI, openapi_document
from orchestrator.server import create_app
from bench._contract import narrowed
from bench.fuzz import SERVED_MODELS, SERVED_NAMES
from support.contract import documented_operations, fuzz, served_operations

pytestmark = pytest.mark.timeout(300)
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Enough to reach every branch of the request models (unions, optional parts, streaming) in a few seconds an
# operation; `muai bench fuzz` runs the long version.
EXAMPLES = 40


@pytest.mark.parametrize("admin", [True, False])
@pytest.mark.parametrize("metrics_port", [None, 9999])
def test_document_is_valid_openapi_and_names_exactly_the_served_routes(tmp_path, admin, metrics_port):
    config = echo_config(tmp_path, server={"admin_token": ADMIN_TOKEN if admin else None},
                         telemetry={"metrics": {"port": metrics_port}})
    app = create_app(config)
    document = app[OPENAPI]
    validate(document)
    assert served_operations(app) == documented_operations(document)
    assert any(path.startswith("/admin") for _, path in documented_operations(document)) == admin
    assert (("get", "/metrics") in documented_operations(document)) == (metrics_port is None)


def test_every_operation_documents_the_error_shape_and_retry_after():
    document = openapi_document(metrics_path="/metrics", admin=True)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, answer in operation["responses"].items():
                if status in ("429", "503"):
                    assert "Retry-After" in answer["headers"], (method, path, status)
            if "requestBody" in operation:
                assert {"400", "413", "422"} <= set(operation["responses"]), (method, path)


async def test_the_served_document_is_the_built_one(tmp_path):
    async with running_app(echo_config(tmp_path)) as (client, state):
        resp = await client.get("/openapi.json")
        assert resp.status == 200 and resp.content_type == "application/json"
        served = await resp.json()
    assert served == openapi_document(metrics_path="/metrics", admin=True)


async def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_document(tmp_path):
    async with running_app(echo_config(tmp_path)) as (client, state):
        document = await (await client.get("/openapi.json")).json()
        base = str(client.make_url("")).rstrip("/")
        report = await asyncio.to_thread(
            fuzz, narrowed(document, models=SERVED_MODELS, parameters=SERVED_NAMES), base, max_examples=EXAMPLES,
            headers=lambda op: AUTH if op in _ADMIN_OPERATIONS else {},
            # Unloading under fuzz would make the rest of the run a test of 503s.
            skip=frozenset({"unloadModel"}))
        assert not report.failures, "\n\n".join(report.failures)
        # Not vacuous: every operation ran, and the inference routes got past validation to a real answer.
        assert all(n > 0 for n in report.cases.values()), report.cases
        # (runWorkflow is not here: its parameters are free-form in the document, so random ones are a 422.)
        for op in ("createCompletion", "createChatCompletion", "createEmbedding", "loadModel"):
            assert 200 in report.statuses[op], (op, report.statuses[op])
        resp = await client.get("/health/ready")
        assert resp.status == 200, await resp.text()


from bench.fuzz import ADMIN_OPERATIONS as _ADMIN_OPERATIONS  # noqa: E402


def _bodies(limit: int) -> dict[str, bytes]:
    return {
        "deep object": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        "deep array": b"[" * 300 + b"]" * 300,
        "huge": b'{"model": "echo", "prompt": "' + b"x" * (limit + 10) + b'"}',
        "not json": b"\xff\xfe\x00garbage",
        "truncated": b'{"model": "echo", "prompt": "ab',
        "not an object": b"[1, 2, 3]",
        "wrong types": b'{"model": 5, "prompt": {"a": 1}, "messages": "x", "input": [[1]], "parameters": 3}',
        "empty": b"",
        "nul bytes": b'{"model": "echo\x00", "prompt": "\x00"}',
    }


async def test_every_route_with_a_body_answers_deep_huge_and_malformed_bodies_with_a_4xx(tmp_path):
    limit = 64 * 1024
    async with running_app(echo_config(tmp_path, server={"max_body_bytes": limit})) as (client, state):
        document = await (await client.get("/openapi.json")).json()
        device = state.devices.devices(0.0)[0].id
        routes = [(method, path.replace("{name}", "chat").replace("{model}", "echo")
                   .replace("/devices/{id}", f"/devices/{device}").replace("{id}", "c1"), op["requestBody"]["required"])
                  for path, item in document["paths"].items() for method, op in item.items() if "requestBody" in op]
        assert len(routes) >= 6, routes
        for method, path, required in routes:
            for what, body in _bodies(limit).items():
                if what == "empty" and not required:
                    continue
                for content_type in ("application/json", "text/plain", None):
                    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
                    resp = await client.request(method.upper(), path, data=body, headers=headers)
                    answer = await resp.json()
                    assert 400 <= resp.status < 500, (method, path, what, resp.status, answer)
                    assert set(answer) == {"error"}, answer
                    if what == "huge":
                        assert resp.status == 413, (path, answer)
                    if what.startswith("deep"):
                        assert resp.status == 400, (path, answer)
        assert (await client.get("/health/ready")).status == 200
