"""One traced request through a vLLM engine started with an OTLP endpoint; started by ``test_vllm_engine``.

    python tests/adapters/dist/vllm_trace.py --model DIR --endpoint http://127.0.0.1:PORT/v1/traces --out ids.json
    python tests/adapters/dist/vllm_trace.py --model DIR --endpoint http://127.0.0.1:PORT --protocol grpc --out ids.json

A process of its own because vLLM, started with an endpoint, installs the process's global tracer provider. The
caller's span comes from a local SDK tracer (exporting nowhere); the script writes its trace and span ids as JSON,
so the test can find vLLM's ``llm_request`` spans in that trace at its OTLP receiver. One request goes through the
async API and one through the blocking one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--protocol", choices=("http/protobuf", "grpc"), default="http/protobuf",
                        help="grpc: vLLM's own default (the variable left unset, as an operator would)")
    args = parser.parse_args(argv)
    if args.protocol == "grpc":
        os.environ.pop("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", None)
    else:
        os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")

    from opentelemetry.sdk.trace import TracerProvider

    from adapters.base import GenerationRequest, ModelSpec, SamplingParams
    from adapters.vllm_engine import VllmEngine

    tracer = TracerProvider().get_tracer("muai-test")
    engine = VllmEngine({"kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True,
                         "otlp_traces_endpoint": args.endpoint})
    engine.load(ModelSpec("tiny", args.model, max_model_len=256))
    request = [GenerationRequest("Hello world", SamplingParams(max_new_tokens=3))]
    ids = []
    try:
        with tracer.start_as_current_span("async request") as span:
            asyncio.run(engine.generate(request))
        ids.append(span.get_span_context())
        with tracer.start_as_current_span("blocking request") as span:
            engine._generate_sync(request)
        ids.append(span.get_span_context())
    finally:
        engine.close()
    Path(args.out).write_text(json.dumps([{"trace_id": f"{c.trace_id:032x}", "span_id": f"{c.span_id:016x}"}
                                          for c in ids]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
