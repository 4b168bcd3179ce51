"""Fuzzing both HTTP APIs for real (issue 15; requirements 8, 14): the long version of the contract tests.

A real orchestrator (``python -m muai serve``, echo engines, admin API on) and a real sidecar (``python -m muai
sidecar``, ``PATCH /api/v1/config`` on, tuner off) on 127.0.0.1, then, against each:

1. **schemathesis** over every operation of the server's own ``/openapi.json``, ``--examples`` cases per operation,
   generated to follow the document and (``--negative``, on by default) to break it: no answer may be a 5xx (a 503
   with ``Retry-After`` is load shedding, not a failure), and every answer's status, media type, headers and body
   must be what the document says;
2. **random bodies**, ``--requests`` of them spread over every route that takes a body: valid bodies mutated
   (fields dropped, retyped, nested deep, made huge), random bytes, truncated and nested-too-deep JSON, wrong
   content types and encodings (gzip that is not), and wrong, missing or huge bearer tokens on the admin APIs.
   Every answer must be a 2xx or 4xx (or 503 with ``Retry-After``).

Then both processes must still answer their health checks. Figures: cases and failures per server and mode,
the status histogram of the random bodies, ``server_errors`` (goal 0), ``tracebacks_logged`` by either process
(goal 0: bad input is answered, not logged as a crash) and ``alive_after``.

Prints one JSON line and writes ``bench/results/fuzz.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench._contract import fuzz, narrowed
from bench._report import add_output_args, finish
from bench._serving import free_port, start, stop, wait_ready

TOKEN = "bench-fuzz-admin-token-0123456789"
MAX_BODY = 256 * 1024
JSON_TYPE = "application/json"
# What the generated requests name, so that they reach the engines and workflows (random names are 404s).
SERVED_MODELS = {"CompletionRequest": ["echo"], "ChatCompletionRequest": ["echo"], "EmbeddingRequest": ["echo-embed"]}
SERVED_NAMES = {("/v1/models/{model}", "model"): ["echo", "echo-embed", "nope"],
                ("/v1/workflows/{name}", "name"): ["chat", "embed_then_generate", "nope"],
                ("/admin/models/{name}/load", "name"): ["echo", "nope"],
                # The CPU on a machine without GPUs (what CI and this benchmark run on), and one that is not there.
                ("/admin/devices/{id}/cordon", "id"): ["cpu", "nope"],
                ("/admin/devices/{id}/uncordon", "id"): ["cpu", "nope"]}
ADMIN_OPERATIONS = {"getConfig", "patchConfig", "loadModel", "unloadModel", "endConversation", "listDevices",
                    "cordonDevice", "uncordonDevice"}
PROTOBUF = "application/x-protobuf"


def _configs(work: Path, server_port: int, sidecar_port: int) -> Path:
    model_dir = work / "echo-model"
    model_dir.mkdir()
    config = {
        "models": [
            {"name": "echo", "path": str(model_dir), "task": "generate", "engine": "echo"},
            {"name": "echo-embed", "path": str(model_dir), "task": "embed", "engine": "echo"},
        ],
        "server": {"port": server_port, "admin_token": TOKEN, "max_body_bytes": MAX_BODY},
        "telemetry": {"tracing": {"enabled": True, "endpoint": f"http://127.0.0.1:{sidecar_port}/v1/traces"}},
        "sidecar": {
            "port": sidecar_port, "otlp_grpc_port": None,
            "receiver": {"max_body_bytes": MAX_BODY},
            "tuner": {"enabled": False, "admin_token": TOKEN},
            "collectors": {"orchestrator": {"url": f"http://127.0.0.1:{server_port}"}},
            "alerting": {"sinks": {"log": {"enabled": False}}},
        },
    }
    path = work / "muai.json"
    path.write_text(json.dumps(config))
    return path


def _otlp_body() -> bytes:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add()
    for i in range(5):
        span = spans.spans.add(trace_id=bytes([i + 1]) * 16, span_id=bytes([i + 1]) * 8, name="fuzz", kind=2,
                               start_time_unix_nano=1_000_000_000, end_time_unix_nano=1_000_000_000 + i * 1_000_000)
        span.attributes.add(key="gen_ai.operation.name").value.string_value = "chat"
        span.attributes.add(key="gen_ai.request.model").value.string_value = "fuzz"
    return request.SerializeToString()


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**63, -(2**70), 1e308, -0.0, 3.5])
    if kind == 3:
        return rng.choice(["", "x" * rng.randrange(1, 2000), "\u0000", "\ud7ff\u2028", "<|user|>", "null"])
    if kind == 4:
        return rng.choice([[], {}, [[]], {"": None}])
    if kind in (5, 6):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["a", "model", "role", "content", "type", "n", ""]): _random_json(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def _mutate(rng: random.Random, body: dict[str, Any]) -> Any:
    doc = json.loads(json.dumps(body))
    choice = rng.randrange(6)
    keys = list(doc)
    if choice == 0 and keys:
        del doc[rng.choice(keys)]
    elif choice == 1 and keys:
        doc[rng.choice(keys)] = _random_json(rng)
    elif choice == 2:
        doc[rng.choice(["extra", "stream", "n", "max_tokens", "temperature", "stop", "conversation_id"])] = _random_json(rng)
    elif choice == 3:
        value: Any = 1
        for _ in range(rng.randrange(150, 260)):
            value = [value] if rng.random() < 0.5 else {"k": value}
        doc[rng.choice(keys or ["x"])] = value
    elif choice == 4:
        return [doc]
    else:
        doc[rng.choice(keys or ["x"])] = "y" * rng.randrange(MAX_BODY // 2, MAX_BODY * 2)
    return doc


def _cases(rng: random.Random, n: int, server: str, sidecar: str) -> list[tuple[str, str, bytes, dict[str, str]]]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    valid: list[tuple[str, str, dict[str, Any], dict[str, str]]] = [
        ("POST", f"{server}/v1/completions", {"model": "echo", "prompt": "a b c", "max_tokens": 3}, {}),
        ("POST", f"{server}/v1/chat/completions",
         {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, {}),
        ("POST", f"{server}/v1/embeddings", {"model": "echo-embed", "input": ["x", "y"]}, {}),
        ("POST", f"{server}/v1/workflows/chat", {"parameters": {"model": "echo", "message": "hi"}}, {}),
        ("PATCH", f"{server}/admin/config", {"server": {"queue_capacity": 256}}, auth),
        ("PATCH", f"{sidecar}/api/v1/config", {"detectors": {"statistical": {"for_s": 10}}}, auth),
    ]
    otlp = _otlp_body()
    out = []
    for _ in range(n):
        method, url, body, headers = rng.choice(valid)
        headers = {**headers, "Content-Type": JSON_TYPE}
        kind = rng.randrange(10)
        if kind < 5:
            data = json.dumps(_mutate(rng, body)).encode()
        elif kind == 5:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 3000)))
        elif kind == 6:
            raw = json.dumps(body).encode()
            data = raw[: rng.randrange(len(raw))]
        elif kind == 7:
            depth = rng.randrange(250, 20_000)
            data = b"[" * depth + b"]" * depth
        elif kind == 8:
            data = json.dumps(body).encode()
            headers["Content-Type"] = rng.choice(["text/plain", PROTOBUF, "multipart/form-data", "", "application/json; charset=latin-1"])
            if rng.random() < 0.5:
                headers["Content-Encoding"] = rng.choice(["gzip", "br", "deflate"])
        else:
            method, url = rng.choice([("GET", f"{server}/admin/config"), ("PATCH", f"{server}/admin/config"),
                                      ("POST", f"{server}/admin/models/echo/load"),
                                      ("DELETE", f"{server}/admin/conversations/c1"),
                                      ("PATCH", f"{sidecar}/api/v1/config")])
            data = json.dumps(valid[4][2]).encode()
            headers["Authorization"] = rng.choice(["", "Bearer", "Bearer wrong", "Basic abc", "bearer " + TOKEN[:-1],
                                                   "Bearer " + "x" * 4000])
        out.append((method, url, data, headers))
    # The OTLP receiver: protobuf and OTLP/JSON, damaged, gzip that is and is not.
    for _ in range(max(1, n // 8)):
        kind = rng.randrange(5)
        headers = {"Content-Type": PROTOBUF}
        if kind == 0:
            data = otlp[: rng.randrange(1, len(otlp))]
        elif kind == 1:
            data = bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.05 else b for b in otlp)
        elif kind == 2:
            data, headers = gzip.compress(otlp)[: rng.randrange(5, 40)], {**headers, "Content-Encoding": "gzip"}
        elif kind == 3:
            data, headers = json.dumps(_mutate(rng, {"resourceSpans": [{"scopeSpans": [{"spans": []}]}]})).encode(), {
                "Content-Type": JSON_TYPE}
        else:
            data, headers = gzip.compress(b"\0" * (MAX_BODY * 8)), {**headers, "Content-Encoding": "gzip"}
        out.append(("POST", f"{sidecar}/v1/traces", data, headers))
    rng.shuffle(out)
    return out


async def _random_bodies(cases: list[tuple[str, str, bytes, dict[str, str]]]) -> tuple[Counter, list[str], list[str]]:
    import aiohttp

    statuses: Counter = Counter()
    errors: list[str] = []
    resets: list[str] = []
    # Decompression is the receiver's job (bounded there); the client must send exactly these bytes.
    # A connection of its own per request: a server may close one after refusing a body it did not read (a 413),
    # and a reused connection would blame the next request for it.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        for method, url, data, headers in cases:
            what = f"{method} {url} ({len(data)} bytes, {headers.get('Content-Type')!r})"
            try:
                async with session.request(method, url, data=data, headers=headers,
                                           skip_auto_headers=["Content-Type"]) as resp:
                    text = await resp.read()
            except aiohttp.ClientError as exc:
                statuses[f"connection: {type(exc).__name__}"] += 1
                resets.append(f"{what}: {exc}")
                continue
            statuses[str(resp.status)] += 1
            if resp.status >= 500 and not (resp.status == 503 and "Retry-After" in resp.headers):
                errors.append(f"{resp.status} {what}: {text[:200]!r}")
    return statuses, errors, resets


async def _health(server: str, sidecar: str) -> bool:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(f"{server}/health/ready") as a, session.get(f"{sidecar}/health") as b:
                return a.status == 200 and b.status == 200
        except aiohttp.ClientError:
            return False


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    work = Path(tempfile.mkdtemp(prefix="muai-bench-fuzz-"))
    server_port, sidecar_port = free_port(), free_port()
    path = _configs(work, server_port, sidecar_port)
    server, sidecar = f"http://127.0.0.1:{server_port}", f"http://127.0.0.1:{sidecar_port}"
    procs: list[subprocess.Popen] = []
    figures: dict[str, Any] = {}
    try:
        for command in ("sidecar", "serve"):
            procs.append(start([sys.executable, "-m", "muai", "--log-level", "warning", command, "--config", str(path)],
                               work / f"{command}.log"))
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, f"{sidecar}/health", procs)
            await wait_ready(session, f"{server}/health/ready", procs)
            async with session.get(f"{server}/openapi.json") as resp:
                server_doc = await resp.json()
            async with session.get(f"{sidecar}/openapi.json") as resp:
                sidecar_doc = await resp.json()
        server_doc = narrowed(server_doc, models=SERVED_MODELS, parameters=SERVED_NAMES)
        started = time.monotonic()
        modes = (False, True) if args.negative else (False,)
        for name, doc, base, skip in (("orchestrator", server_doc, server, frozenset({"unloadModel"})),
                                      ("sidecar", sidecar_doc, sidecar, frozenset())):
            for negative in modes:
                mode = "negative" if negative else "positive"
                print(f"# fuzz: schemathesis {mode} on the {name} ({len(doc['paths'])} paths)", file=sys.stderr, flush=True)
                report = await asyncio.to_thread(fuzz, doc, base, max_examples=args.examples, skip=skip,
                                                 negative=negative,
                                                 headers=lambda op: {"Authorization": f"Bearer {TOKEN}"} if op in ADMIN_OPERATIONS else {})
                figures[f"{name}_{mode}"] = {
                    "operations": len(report.cases), "cases": sum(report.cases.values()),
                    "failures": len(report.failures), "failed": report.failures[:5],
                    "statuses": {op: sorted(s) for op, s in report.statuses.items()},
                }
        figures["schemathesis_s"] = round(time.monotonic() - started, 1)
        cases = _cases(random.Random(args.seed), args.requests, server, sidecar)
        print(f"# fuzz: {len(cases)} random bodies", file=sys.stderr, flush=True)
        started = time.monotonic()
        statuses, errors, resets = await _random_bodies(cases)
        figures["random_bodies"] = {"requests": len(cases), "statuses": dict(sorted(statuses.items())),
                                    "server_errors": len(errors), "examples": errors[:5],
                                    "connections_dropped": len(resets), "dropped": resets[:5],
                                    "seconds": round(time.monotonic() - started, 1)}
        figures["alive_after"] = await _health(server, sidecar) and all(p.poll() is None for p in procs)
    finally:
        stop(procs, 30)
    # A client's bad input is answered, not logged as a crash: a traceback per bad request is a log an attacker
    # can fill.
    figures["tracebacks_logged"] = {command: (work / f"{command}.log").read_text(errors="replace").count("Traceback")
                                    for command in ("serve", "sidecar")}
    tracebacks = sum(figures["tracebacks_logged"].values())
    schemathesis_failures = sum(v["failures"] for k, v in figures.items() if isinstance(v, dict) and "failures" in v)
    server_errors = figures["random_bodies"]["server_errors"]
    return {
        "bench": "fuzz",
        "figures": figures,
        "ratios": {},
        "goals": {
            "schemathesis_failures": {"goal": "== 0", "value": schemathesis_failures, "met": schemathesis_failures == 0},
            "server_errors": {"goal": "== 0", "value": server_errors, "met": server_errors == 0},
            "tracebacks_logged": {"goal": "== 0", "value": tracebacks, "met": tracebacks == 0},
            "alive_after": {"goal": "true", "value": figures["alive_after"], "met": bool(figures["alive_after"])},
        },
        "setup": {"examples_per_operation": args.examples, "negative": args.negative, "random_bodies": args.requests,
                  "seed": args.seed, "engine": "echo engine", "max_body_bytes": MAX_BODY, "logs": str(work)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muai bench fuzz", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200, help="schemathesis cases per operation and mode (default 200)")
    parser.add_argument("--requests", type=int, default=4000, help="random bodies (default 4000)")
    parser.add_argument("--no-negative", dest="negative", action="store_false",
                        help="schemathesis follows the document only (default: also breaks it)")
    parser.add_argument("--seed", type=int, default=15, help="seed of the random bodies")
    add_output_args(parser)
    args = parser.parse_args(argv)
    return finish(asyncio.run(_run(args)), args)


if __name__ == "__main__":
    sys.exit(main())
