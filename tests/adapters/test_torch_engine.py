"""The torch engine on the tiny models (and the real all-MiniLM-L6-v2 for embeddings)."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.waiting import apoll

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from adapters.base import (  # noqa: E402
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    InferenceError,
    InvalidRequestError,
    ModelLoadError,
    ModelSpec,
    SamplingParams,
)
from adapters.hf_decode import Detokenizer, Row, TorchForward  # noqa: E402
from adapters.hf_engine import Backend  # noqa: E402
from adapters.torch_engine import TorchEngine  # noqa: E402

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog, and then it runs away", "A"]


def load(path, name="m", **kw) -> TorchEngine:
    settings = kw.pop("settings", {})
    engine = TorchEngine(settings)
    engine.load(ModelSpec(name, str(path), device=kw.pop("device", "cpu"), **kw))
    return engine


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def engine(request, tiny_llama_dir, tiny_gpt2_dir):
    path = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    eng = load(path, name=f"tiny-{request.param}")
    yield eng
    eng.close()


def reference(engine: TorchEngine, prompt: str, n: int) -> str:
    """Plain transformers greedy generation of the same model (nothing of ours in the way)."""
    tok, model = engine.tokenizer, engine.model
    enc = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


async def test_greedy_batch_equals_plain_transformers_and_single_requests(engine):
    sp = SamplingParams(max_new_tokens=10)
    batched = await engine.generate([GenerationRequest(p, sp) for p in PROMPTS])
    for prompt, res in zip(PROMPTS, batched):
        (alone,) = await engine.generate([GenerationRequest(prompt, sp)])
        assert res.text == alone.text == reference(engine, prompt, 10)
        assert res.prompt_tokens == len(engine.tokenizer(prompt).input_ids)
        assert res.completion_tokens == 10 and res.finish_reason == "length"
        assert res.error is None and "<pad>" not in res.text


async def test_mixed_lengths_and_settings_in_one_batch(engine):
    reqs = [
        GenerationRequest(PROMPTS[0], SamplingParams(max_new_tokens=3)),
        GenerationRequest(PROMPTS[1], SamplingParams(max_new_tokens=7)),
        GenerationRequest(PROMPTS[2], SamplingParams(max_new_tokens=5, temperature=0.8, seed=3)),
    ]
    results = await engine.generate(reqs)
    assert [r.completion_tokens for r in results] == [3, 7, 5]
    assert results[0].text == reference(engine, PROMPTS[0], 3)
    assert results[1].text == reference(engine, PROMPTS[1], 7)


async def test_sampling_is_reproducible_with_a_seed(engine):
    def req(seed):
        return GenerationRequest("Tell me a story", SamplingParams(max_new_tokens=12, temperature=1.5, seed=seed))

    a, b, c = await engine.generate([req(1), req(1), req(2)])
    assert a.text == b.text
    assert a.text != c.text
    # A nucleus so small it keeps only the top token is greedy.
    (nucleus,) = await engine.generate([GenerationRequest("Tell me a story", SamplingParams(
        max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=5))])
    assert nucleus.text == reference(engine, "Tell me a story", 8)


async def test_stop_sequences_trim_and_finish_with_stop(engine):
    full = reference(engine, PROMPTS[1], 12)
    stop = full[3:6]
    assert stop.strip(), "the reference completion is long enough to pick a stop sequence from"
    (res,) = await engine.generate([GenerationRequest(PROMPTS[1], SamplingParams(max_new_tokens=12, stop=(stop,)))])
    assert res.finish_reason == "stop"
    assert res.text == full[: full.index(stop)]
    assert stop not in res.text
    assert res.completion_tokens < 12


async def test_eos_finishes_with_stop(tiny_llama_dir):
    eng = load(tiny_llama_dir)
    # Make the model always pick EOS (a forward hook on its output head): the loop must stop after one token,
    # and EOS is not in the text.
    eos = eng.tokenizer.eos_token_id

    def favour_eos(module, args, output):
        output[..., eos] += 1e4
        return output

    eng.model.get_output_embeddings().register_forward_hook(favour_eos)
    (res, kept_on) = await eng.generate([GenerationRequest("Hello", SamplingParams(max_new_tokens=8)),
                                         GenerationRequest("Hello", SamplingParams(max_new_tokens=8, ignore_eos=True))])
    eng.close()
    assert res.finish_reason == "stop" and res.completion_tokens == 1 and res.text == ""
    # vLLM's ignore_eos, honoured here too: the same row runs to its length in the same batch.
    assert kept_on.finish_reason == "length" and kept_on.completion_tokens == 8


async def test_stream_chunks_join_to_the_completion(engine):
    sp = SamplingParams(max_new_tokens=10)
    (whole,) = await engine.generate([GenerationRequest(PROMPTS[0], sp)])
    chunks = [c async for c in engine.generate_stream(GenerationRequest(PROMPTS[0], sp))]
    assert "".join(c.text for c in chunks) == whole.text
    assert len(chunks) >= 3  # per token, not one lump
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert (last.finish_reason, last.completion_tokens, last.prompt_tokens) == ("length", 10, whole.prompt_tokens)
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts)


async def test_stream_never_shows_part_of_a_stop_sequence(engine):
    full = reference(engine, PROMPTS[1], 12)
    stop = full[4:8]
    chunks = [c async for c in engine.generate_stream(
        GenerationRequest(PROMPTS[1], SamplingParams(max_new_tokens=12, stop=(stop,))))]
    text = "".join(c.text for c in chunks)
    assert text == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop"


async def test_stream_consumer_can_stop_early(engine):
    agen = engine.generate_stream(GenerationRequest(PROMPTS[0], SamplingParams(max_new_tokens=50)))
    first = await agen.__anext__()
    await agen.aclose()
    assert first.finish_reason is None
    (after,) = await engine.generate([GenerationRequest("A", SamplingParams(max_new_tokens=2))])
    assert after.completion_tokens == 2


async def test_prompt_too_long_is_invalid_and_neighbours_are_served(tiny_llama_dir):
    eng = load(tiny_llama_dir, max_model_len=32)
    long_prompt = "hello " * 40
    bad, good = await eng.generate([
        GenerationRequest(long_prompt, SamplingParams(max_new_tokens=4)),
        GenerationRequest("Hi", SamplingParams(max_new_tokens=4)),
    ])
    assert isinstance(bad.error, InvalidRequestError) and not bad.error.retryable
    assert "exceeds the context length" in str(bad.error) and bad.finish_reason == "error"
    assert good.error is None and good.completion_tokens == 4
    with pytest.raises(InvalidRequestError):
        [c async for c in eng.generate_stream(GenerationRequest(long_prompt))]
    # Bad sampling settings are the request's fault too.
    (neg,) = await eng.generate([GenerationRequest("Hi", SamplingParams(temperature=-1))])
    assert isinstance(neg.error, InvalidRequestError)
    eng.close()


def test_missing_path_and_non_model_dir_give_clear_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load(tmp_path / "nope")
    assert not info.value.retryable and info.value.engine == "torch"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no model"):
        load(tmp_path / "empty")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weights"):
        load(tmp_path / "cfg")


def test_corrupt_weights_wrap_the_cause(tmp_path, tiny_llama_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load") as info:
        load(broken)
    assert info.value.__cause__ is not None


def test_devices_and_dtypes(tiny_llama_dir):
    eng = load(tiny_llama_dir, device="auto", dtype="bfloat16", settings={"threads": torch.get_num_threads()})
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert eng.status()["device"] == expected
    assert next(eng.model.parameters()).dtype == torch.bfloat16
    assert eng._generate_sync([GenerationRequest("Hi", SamplingParams(max_new_tokens=3))])[0].completion_tokens == 3
    eng.close()
    assert not eng.loaded
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load(tiny_llama_dir, device="cuda:0")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load(tiny_llama_dir, dtype="float8")


def test_inject_delay_sleeps_before_inference(tiny_llama_dir):
    eng = load(tiny_llama_dir, options={"inject_delay_s": 0.05})
    start = time.monotonic()
    eng._generate_sync([GenerationRequest("Hi", SamplingParams(max_new_tokens=1))])
    assert time.monotonic() - start >= 0.05
    eng.reconfigure(inject_delay_s=0.0)
    assert eng.status()["inject_delay_s"] == 0.0
    eng.close()


def test_not_loaded_and_wrong_task_are_engine_errors(tiny_llama_dir):
    with pytest.raises(EngineError, match="no model loaded"):
        TorchEngine()._generate_sync([GenerationRequest("Hi")])
    eng = load(tiny_llama_dir)
    with pytest.raises(InvalidRequestError, match="does not embed"):
        eng._embed_sync(["x"])
    eng.close()


def test_available_names_the_extra():
    assert TorchEngine.available()


async def test_minilm_embeddings_are_mean_pooled_and_normalised(minilm_dir):
    eng = load(minilm_dir, name="minilm", task="embed")
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."]
    results = await eng.embed(texts)
    vecs = [r.vector for r in results]
    assert all(len(v) == 384 for v in vecs)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vecs)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b))

    # Real weights: the two sentences about eating are closer than either is to the movie one.
    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.2
    # Padding in a batch changes nothing.
    (alone,) = await eng.embed([texts[1]])
    assert max(abs(x - y) for x, y in zip(alone.vector, vecs[1])) < 1e-5
    assert results[0].prompt_tokens == len(eng.tokenizer(texts[0]).input_ids)
    with pytest.raises(InvalidRequestError, match="does not generate"):
        await eng.generate([GenerationRequest("x")])
    eng.close()


# -- regressions -----------------------------------------------------------------------------------------------------


async def test_a_stream_queued_behind_a_batch_gets_an_error_when_the_engine_closes(tiny_llama_dir):
    """close() drops work still queued for the engine's thread: a stream waiting there must end, not hang."""
    eng = load(tiny_llama_dir)
    gate, busy_running = threading.Event(), threading.Event()

    def busy():  # the batch running now
        busy_running.set()
        gate.wait(60)

    running = asyncio.ensure_future(eng._run(busy))
    await apoll(busy_running.is_set, what="the running batch")
    stream = asyncio.ensure_future(_drain(eng.generate_stream(GenerationRequest("Hi"))))
    await asyncio.sleep(0)  # the stream's work is queued behind ``busy`` on the engine's one thread
    try:
        eng.close()
        with pytest.raises(EngineUnavailableError, match="unloaded before the request finished"):
            await asyncio.wait_for(stream, 10)
    finally:
        gate.set()
    await running


async def _drain(agen):
    return [c async for c in agen]


async def test_a_generate_queued_behind_a_batch_gets_an_error_when_the_engine_closes(tiny_llama_dir):
    eng = load(tiny_llama_dir)
    gate, busy_running = threading.Event(), threading.Event()

    def busy():
        busy_running.set()
        gate.wait(60)

    running = asyncio.ensure_future(eng._run(busy))
    await apoll(busy_running.is_set, what="the running batch")
    queued = asyncio.ensure_future(eng.generate([GenerationRequest("Hi")]))
    await asyncio.sleep(0)
    try:
        eng.close()
        with pytest.raises(EngineUnavailableError):
            await asyncio.wait_for(queued, 10)  # an answer, not a CancelledError in a task nobody cancelled
    finally:
        gate.set()
    await running


class _OomOnLongInputs(TorchForward):
    """The real forward pass, but more than 8 positions at once make the real allocator fail, as a too-large batch
    does."""

    def __call__(self, input_ids, attention_mask, position_ids, state):
        if input_ids.shape[1] > 8:
            torch.empty(2**62, dtype=torch.uint8)
        return super().__call__(input_ids, attention_mask, position_ids, state)


class _OomOnLongPrompts(TorchEngine):
    def _backend(self, parts, spec):
        return Backend(forward=_OomOnLongInputs(parts.model), model=parts.model)


async def test_out_of_memory_is_the_batchs_failure_not_the_engines(tiny_llama_dir):
    eng = _OomOnLongPrompts({})
    eng.load(ModelSpec("m", str(tiny_llama_dir), device="cpu"))
    long = GenerationRequest(PROMPTS[1], SamplingParams(max_new_tokens=2))
    with pytest.raises(InferenceError, match="generation failed") as info:
        eng._generate_sync([long])
    assert not info.value.retryable  # the fallback chain gives it to the caller and keeps the model here
    with pytest.raises(InferenceError, match="streaming failed") as info:
        [c async for c in eng.generate_stream(long)]
    assert not info.value.retryable
    (ok,) = await eng.generate([GenerationRequest("Hi", SamplingParams(max_new_tokens=2))])
    assert ok.error is None and ok.completion_tokens == 2
    eng.close()


def test_other_inference_failures_stay_retryable(tiny_llama_dir):
    class BrokenForward(TorchForward):
        def __call__(self, *args):
            raise RuntimeError("device-side assert triggered")

    class Broken(TorchEngine):
        def _backend(self, parts, spec):
            return Backend(forward=BrokenForward(parts.model), model=parts.model)

    eng = Broken({})
    eng.load(ModelSpec("m", str(tiny_llama_dir), device="cpu"))
    with pytest.raises(InferenceError) as info:
        eng._generate_sync([GenerationRequest("Hi")])
    assert info.value.retryable
    eng.close()


async def test_streaming_decodes_a_small_window_per_token_not_the_whole_completion(tiny_llama_dir):
    eng = load(tiny_llama_dir)
    eng.decoded_lengths = []
    decode = eng.tokenizer.decode

    def counting(tokens, **kw):  # the real tokenizer's decode, counted
        eng.decoded_lengths.append(len(tokens))
        return decode(tokens, **kw)

    eng.tokenizer.decode = counting
    sp = SamplingParams(max_new_tokens=60, stop=("never-generated-stop",))
    (whole,) = await eng.generate([GenerationRequest(PROMPTS[0], sp)])
    eng.decoded_lengths.clear()
    chunks = [c async for c in eng.generate_stream(GenerationRequest(PROMPTS[0], sp))]
    n = chunks[-1].completion_tokens
    assert "".join(c.text for c in chunks) == whole.text and n > 40
    # Per token: two short windows; once at the end: the whole completion (the exact final text).
    per_step = eng.decoded_lengths[:-1]
    assert len(per_step) <= 2 * n and max(per_step) <= 8
    eng.close()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_incremental_detokenisation_equals_a_full_decode_after_every_token(engine, data):
    """Any token sequence (partial UTF-8 bytes, special tokens included): the incrementally decoded completion is
    exactly ``decode(tokens)`` after each token."""
    vocab = len(engine.tokenizer)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=30))
    detok = Detokenizer(engine.tokenizer)
    row = Row(SamplingParams(), 0)
    for token in ids:
        row.tokens.append(token)
        assert detok.so_far(row) == detok.full(row.tokens)
