"""The sidecar's OpenAPI document: valid OpenAPI 3.1, the same routes as the app both ways, served at /openapi.json,
and schemathesis over every operation of a live sidecar holding real statistics, every answer checked against the
document; then every route with a body fed deep, huge and malformed bodies gets a 4xx."""

from __future__ import annotations

import asyncio

import pytest
from openapi_spec_validator import validate
from sidecar_helpers import SpanFactory, encode, quiet_config

from sidecar.app import create_app
from sidecar.openapi import OPENAPI, openapi_document
from bench._contract import narrowed
from support.contract import documented_operations, fuzz, served_operations

pytestmark = pytest.mark.timeout(300)
TOKEN = "sidecar-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PB = {"Content-Type": "application/x-protobuf"}
EXAMPLES = 40
# The model the sidecar has seen (and one it has not), so that the stats answers carry series.
KNOWN_MODEL = {("/api/v1/stats", "model"): ["m", "never-seen"]}
# The token turns PATCH /api/v1/config on; the tuner stays off so that it drives no orchestrator that happens to
# listen on the default port.
TUNER = {"enabled": False, "admin_token": TOKEN}


def test_document_is_valid_openapi_and_names_exactly_the_served_routes():
    app = create_app(quiet_config())
    document = app[OPENAPI]
    validate(document)
    assert served_operations(app) == documented_operations(document)
    windows = document["paths"]["/api/v1/stats"]["get"]["parameters"][0]["schema"]["enum"]
    assert windows == list(quiet_config().monitor.windows)


async def _with_statistics(start_sidecar, http, **config):
    server, state = await start_sidecar(quiet_config(**config))
    f = SpanFactory()
    for i in range(20):
        f.request(0.01 * (i + 1), model="m", attributes={"gen_ai.usage.input_tokens": i})
    async with http.post(server.make_url("/v1/traces"), data=encode(f.take()), headers=PB) as resp:
        assert resp.status == 200
    return server, state


async def test_the_served_document_is_the_built_one(start_sidecar, http):
    server, state = await start_sidecar()
    async with http.get(server.make_url("/openapi.json")) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        assert await resp.json() == openapi_document(windows=list(state.monitor.windows))


async def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_document(start_sidecar, http):
    server, state = await _with_statistics(start_sidecar, http, tuner=TUNER)
    async with http.get(server.make_url("/openapi.json")) as resp:
        document = await resp.json()
    base = str(server.make_url("")).rstrip("/")
    report = await asyncio.to_thread(fuzz, narrowed(document, parameters=KNOWN_MODEL), base, max_examples=EXAMPLES,
                                     headers=lambda op: AUTH if op == "patchConfig" else {})
    assert not report.failures, "\n\n".join(report.failures)
    assert all(n > 0 for n in report.cases.values()), report.cases
    assert 200 in report.statuses["getStats"] and 200 in report.statuses["exportTraces"], report.statuses
    async with http.get(server.make_url("/health")) as resp:
        assert resp.status == 200


def _bodies(limit: int) -> dict[str, bytes]:
    return {
        "deep object": b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
        "deep array": b"[" * 300 + b"]" * 300,
        "huge": b'{"resourceSpans": "' + b"x" * (limit + 10) + b'"}',
        "not json": b"\xff\xfe\x00garbage",
        "truncated": b'{"resourceSpans": [{"scopeSpans',
        "not an object": b"[1, 2, 3]",
        "wrong types": b'{"resourceSpans": 5, "detectors": [1]}',
        "empty": b"",
    }


async def test_every_route_with_a_body_answers_deep_huge_and_malformed_bodies_with_a_4xx(start_sidecar, http):
    limit = 64 * 1024
    server, state = await start_sidecar(quiet_config(tuner=TUNER,
                                                     receiver={"max_body_bytes": limit}))
    document = openapi_document(windows=list(state.monitor.windows))
    routes = [(method, path) for path, item in document["paths"].items() for method, op in item.items()
              if "requestBody" in op]
    assert sorted(routes) == [("patch", "/api/v1/config"), ("post", "/v1/traces")]
    for method, path in routes:
        for what, body in _bodies(limit).items():
            for content_type in ("application/json", "application/x-protobuf", "text/plain", None):
                headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
                async with http.request(method.upper(), server.make_url(path), data=body, headers=headers) as resp:
                    answer = await resp.read()
                    status = resp.status
                # A protobuf body can decode from almost anything (an empty export is a valid one).
                if path == "/v1/traces" and content_type == "application/x-protobuf" and status == 200:
                    continue
                assert 400 <= status < 500, (method, path, what, content_type, status, answer[:300])
                if what == "huge" and status != 415:  # a wrong media type may be refused before the size
                    assert status == 413, (path, content_type, answer[:300])
                if what.startswith("deep") and content_type == "application/json":
                    assert status == 400 and b"nested deeper than 200 levels" in answer, (path, status, answer[:300])
    async with http.get(server.make_url("/health")) as resp:
        assert resp.status == 200
