"""The ONNX Runtime engine: real dynamo export, real ORT sessions, validated against the real PyTorch model.

The converted models go to a per-session temporary cache, so the first load exercises the exporter and later
loads the cache. Greedy outputs must agree token for token with the torch engine (and DeepSpeed's), because the
only thing that differs is the forward pass.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from adapters.base import (  # noqa: E402
    GenerationRequest,
    ModelLoadError,
    ModelSpec,
    SamplingParams,
)
from adapters.fallback import FallbackChain  # noqa: E402
from adapters.onnx_engine import OnnxEngine, OnnxValidationError, cache_key, choose_providers  # noqa: E402
from adapters.torch_engine import TorchEngine  # noqa: E402

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog, and then it runs away",
    "Tell me a story about a small robot",
    "A",
]
CONFIGURED = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def _greedy(n: int = 12) -> list[GenerationRequest]:
    return [GenerationRequest(p, SamplingParams(max_new_tokens=n)) for p in PROMPTS]


def _shape(results):
    assert all(r.error is None for r in results), [r.error for r in results]
    return [(r.text, r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in results]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def ort_settings(onnx_cache):
    return {"providers": CONFIGURED, "validation_tolerance": 1e-3, "cache_dir": str(onnx_cache)}


@pytest.fixture(scope="module")
def ort_llama(tiny_llama_dir, ort_settings):
    engine = OnnxEngine(ort_settings)
    engine.load(ModelSpec("tiny-llama", str(tiny_llama_dir)))
    yield engine
    engine.close()


def test_choose_providers_keeps_the_configured_order_of_what_is_offered():
    offered = ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert choose_providers(CONFIGURED, offered) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["TensorrtExecutionProvider"], offered) == []


def test_available_names_a_missing_provider():
    assert OnnxEngine.available({"providers": CONFIGURED})
    verdict = OnnxEngine.available({"providers": ["NoSuchExecutionProvider"]})
    assert not verdict and "NoSuchExecutionProvider" in verdict.reason


def test_status_names_the_execution_provider_in_use(ort_llama):
    status = ort_llama.status()
    assert status["engine"] == "onnxruntime"
    assert status["provider"] in ort.get_available_providers()
    assert status["provider"] == choose_providers(CONFIGURED, ort.get_available_providers())[0]
    assert status["validation_max_abs_diff"] <= status["validation_tolerance"] == 1e-3
    assert status["onnx_path"].endswith("model.onnx")


def test_the_served_graph_is_the_fused_export_and_fewer_kernels(ort_llama):
    """ORT's transformer fusions are applied to the export (cached beside it), and that graph is what was
    validated and serves: fewer nodes for the same answers (greedy equality is the test below)."""
    import onnx

    status = ort_llama.status()
    assert status["fused"] is True and status["served_path"].endswith("model.fused.onnx")
    plain = onnx.load(status["onnx_path"], load_external_data=False).graph.node
    served = onnx.load(status["served_path"], load_external_data=False).graph.node
    assert len(served) < len(plain)
    assert any(n.op_type.endswith("SimplifiedLayerNormalization") for n in served)


def test_greedy_matches_torch_token_for_token(ort_llama, torch_llama):
    expected = _shape(torch_llama._generate_sync(_greedy()))
    assert _shape(ort_llama._generate_sync(_greedy())) == expected
    # Alone or in a left-padded batch: the same tokens.
    alone = [_shape(ort_llama._generate_sync([r]))[0] for r in _greedy()]
    assert alone == expected


def test_torch_onnx_and_deepspeed_agree(ort_llama, torch_llama, tiny_llama_dir):
    pytest.importorskip("deepspeed")
    from adapters.deepspeed_engine import DeepSpeedEngine

    ds = DeepSpeedEngine({"tensor_parallel_size": 1})
    ds.load(ModelSpec("tiny-llama", str(tiny_llama_dir)))
    try:
        batch = _greedy(16)
        outputs = {name: _shape(e._generate_sync(batch)) for name, e in
                   (("torch", torch_llama), ("onnxruntime", ort_llama), ("deepspeed", ds))}
    finally:
        ds.close()
    assert outputs["onnxruntime"] == outputs["torch"]
    assert outputs["deepspeed"] == outputs["torch"]


def test_seeded_sampling_matches_torch(ort_llama, torch_llama):
    batch = [GenerationRequest(p, SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7))
             for p in PROMPTS[:2]]
    assert _shape(ort_llama._generate_sync(batch)) == _shape(torch_llama._generate_sync(batch))


def test_stop_sequences_and_streaming(ort_llama):
    (full,) = ort_llama._generate_sync([GenerationRequest(PROMPTS[1], SamplingParams(max_new_tokens=12))])
    assert len(full.text) > 4
    stop = full.text[2:4]
    (cut,) = ort_llama._generate_sync([GenerationRequest(PROMPTS[1], SamplingParams(max_new_tokens=12,
                                                                                      stop=(stop,)))])
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)

    async def collect():
        return [c async for c in ort_llama.generate_stream(GenerationRequest(PROMPTS[1],
                                                                            SamplingParams(max_new_tokens=12)))]

    chunks = asyncio.run(collect())
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].finish_reason == full.finish_reason
    assert chunks[-1].completion_tokens == full.completion_tokens


def test_conversation_cache_reuses_the_ort_past(tiny_llama_dir, ort_settings):
    engine = OnnxEngine(ort_settings)
    engine.load(ModelSpec("tiny-llama", str(tiny_llama_dir), options={"kv_cache": {"budget_bytes": 8 * 2**20}}))
    try:
        turn1 = "Hello there, how are you today?"
        (r1,) = engine._generate_sync([GenerationRequest(turn1, SamplingParams(max_new_tokens=6),
                                                         conversation_id="c1")])
        turn2 = turn1 + r1.text + " I am fine, thank you."
        (r2,) = engine._generate_sync([GenerationRequest(turn2, SamplingParams(max_new_tokens=6),
                                                         conversation_id="c1")])
        (fresh,) = engine._generate_sync([GenerationRequest(turn2, SamplingParams(max_new_tokens=6))])
        assert engine.status()["cache_hit"] is True  # the conversion came from the module's cache
    finally:
        engine.close()
    assert r2.cache_hit and r2.cached_tokens > 0
    assert (r2.text, r2.completion_tokens) == (fresh.text, fresh.completion_tokens)


def test_second_load_uses_the_cached_conversion(tiny_llama_dir, ort_settings, ort_llama):
    again = OnnxEngine(ort_settings)
    again.load(ModelSpec("tiny-llama", str(tiny_llama_dir)))
    try:
        assert again.status()["cache_hit"] is True
        assert again.status()["onnx_path"] == ort_llama.status()["onnx_path"]
        assert _shape(again._generate_sync(_greedy(6))) == _shape(ort_llama._generate_sync(_greedy(6)))
    finally:
        again.close()


def test_cache_key_changes_with_the_weights(tiny_llama_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    assert cache_key(copy, task="generate", dtype="float32") == cache_key(tiny_llama_dir, task="generate",
                                                                           dtype="float32")
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert cache_key(copy, task="generate", dtype="float32") != cache_key(tiny_llama_dir, task="generate",
                                                                           dtype="float32")
    assert cache_key(tiny_llama_dir, task="embed", dtype="float32") != cache_key(tiny_llama_dir, task="generate",
                                                                                  dtype="float32")


def test_validation_gate_rejects_a_corrupted_conversion(tiny_llama_dir, ort_settings):
    engine = OnnxEngine({**ort_settings, "_corrupt_for_test": True})
    with pytest.raises(OnnxValidationError, match="exceeds validation_tolerance") as info:
        engine.load(ModelSpec("tiny-llama", str(tiny_llama_dir)))
    assert isinstance(info.value, ModelLoadError)
    assert not engine.loaded


async def test_corrupted_conversion_is_served_by_torch_through_the_chain(tiny_llama_dir, ort_settings, torch_llama):
    events = []
    chain = FallbackChain(
        ModelSpec("tiny-llama", str(tiny_llama_dir), device="cpu"),
        ["onnxruntime", "torch"],
        {"onnxruntime": {**ort_settings, "_corrupt_for_test": True}, "torch": {}},
        on_fallback=events.append,
        reprobe_after_s=3600.0,
    )
    try:
        await asyncio.to_thread(chain.load)
        assert chain.engine_name == "torch"
        assert any("onnxruntime" in r and "validation_tolerance" in r for r in chain.degraded_reasons)
        assert [(e.from_engine, e.to_engine, e.reason) for e in events] == [("onnxruntime", "torch", "load_error")]
        answered = await chain.generate(_greedy(8))
    finally:
        await asyncio.to_thread(chain.close)
    assert _shape(answered) == _shape(torch_llama._generate_sync(_greedy(8)))


def test_gpt2_converts_and_matches_torch(tiny_gpt2_dir, ort_settings):
    spec = ModelSpec("tiny-gpt2", str(tiny_gpt2_dir))
    ref, engine = TorchEngine({}), OnnxEngine(ort_settings)
    ref.load(spec)
    engine.load(spec)
    try:
        assert _shape(engine._generate_sync(_greedy(10))) == _shape(ref._generate_sync(_greedy(10)))
    finally:
        engine.close()
        ref.close()


def test_minilm_embeddings_match_torch(minilm_dir, ort_settings):
    spec = ModelSpec("minilm", str(minilm_dir), task="embed")
    ref, engine = TorchEngine({}), OnnxEngine(ort_settings)
    ref.load(spec)
    engine.load(spec)
    texts = ["hello", "A model server keeps models loaded and answers requests."]
    try:
        got, want = engine._embed_sync(texts), ref._embed_sync(texts)
        assert engine.status()["validation_max_abs_diff"] < 1e-3
    finally:
        engine.close()
        ref.close()
    for g, w in zip(got, want):
        assert len(g.vector) == 384 and g.prompt_tokens == w.prompt_tokens
        assert max(abs(a - b) for a, b in zip(g.vector, w.vector)) < 1e-4
        assert abs(sum(a * a for a in g.vector) - 1.0) < 1e-4


def test_missing_model_is_a_clear_load_error(tmp_path, ort_settings):
    engine = OnnxEngine(ort_settings)
    with pytest.raises(ModelLoadError, match="does not exist"):
        engine.load(ModelSpec("ghost", str(tmp_path / "nowhere")))
    assert not engine.loaded
