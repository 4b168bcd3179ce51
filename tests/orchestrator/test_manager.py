"""The Model Manager on real engines: the echo engine for lifecycle and batching, the tiny torch models for
plain-transformers equivalence (13.1), padding across lengths (6.5) and batched == unbatched (6.6)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters.base import GenerationRequest, InvalidRequestError, SamplingParams
from adapters.echo import EchoEngine, EchoFaults
from muai.config import MuaiConfig
from orchestrator.errors import BatcherClosedError, ModelLoadFailedError, ModelNotReadyError, MuaiError, UnknownModelError
from orchestrator.manager import ModelEvent, ModelManager

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("transformers")
    from adapters.tiny import resolve_model_path

    # The layout of MUAI_CACHE_DIR (``<dir>/models``), shared with the benchmark test: one build per session.
    return resolve_model_path("builtin:tiny-llama", cache_dir=tmp_path_factory.getbasetemp() / "muai-cache" / "models")


def echo_config(**over) -> MuaiConfig:
    doc = {
        "models": [
            {"name": "echo-a", "path": "/nonexistent-is-fine-for-echo", "engine": "echo"},
            {"name": "echo-b", "path": "/nonexistent-is-fine-for-echo", "engine": "echo"},
            {"name": "echo-emb", "path": "/nonexistent-is-fine-for-echo", "engine": "echo", "task": "embed"},
        ],
        "engines": {"preference": ["echo"]},
    }
    doc.update(over)
    return MuaiConfig(**doc)


def req(prompt: str, n: int = 4, **kw) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(max_new_tokens=n, **kw))


# -- registry and errors ------------------------------------------------------------------------------------------


async def test_unknown_model_lists_the_registered_ones():
    m = ModelManager(echo_config())
    for call in (lambda: m.get_model("nope"), lambda: m.load_model("nope"), lambda: m.infer("nope", "x")):
        with pytest.raises(UnknownModelError) as info:
            call()
        assert isinstance(info.value, KeyError) and isinstance(info.value, MuaiError)
        assert "'nope'" in str(info.value) and "echo-a, echo-b, echo-emb" in str(info.value)
    with pytest.raises(UnknownModelError, match="registered models: echo-a"):
        await m.generate("nope", req("x"))
    with pytest.raises(UnknownModelError):
        await m.embed("nope", ["x"])
    await m.aclose()


async def test_registered_but_not_loaded_is_not_ready():
    m = ModelManager(echo_config())
    assert m.models() == ["echo-a", "echo-b", "echo-emb"] and not m.is_loaded("echo-a")
    with pytest.raises(ModelNotReadyError, match="state unloaded"):
        await m.generate("echo-a", req("x"))
    st = m.status().as_dict()
    assert st["models"]["echo-a"]["state"] == "unloaded" and st["models"]["echo-a"]["engine"] is None
    assert st["engines"] == {"echo": {"available": True, "reason": None}}
    await m.aclose()


@pytest.mark.parametrize("kind", ["missing", "empty"])
async def test_bad_model_path_fails_its_load_clearly_and_disturbs_nothing_else(tmp_path: Path, tiny_llama_path, kind):
    bad = tmp_path / "no-such-model" if kind == "missing" else tmp_path
    events: list[ModelEvent] = []
    cfg = MuaiConfig(
        models=[{"name": "good", "path": tiny_llama_path}, {"name": "bad", "path": str(bad)}],
        engines={"preference": ["torch"]},
    )
    m = ModelManager(cfg, on_event=events.append)
    await m.aload_model("good")
    with pytest.raises(ModelLoadFailedError) as info:
        await m.aload_model("bad")
    assert str(bad) in str(info.value) and "'bad'" in str(info.value)
    status = m.status().as_dict()["models"]
    assert status["bad"]["state"] == "failed" and str(bad) in status["bad"]["error"]
    assert status["good"]["state"] == "ready"
    assert (await m.generate("good", req("hello there"))).completion_tokens > 0
    with pytest.raises(ModelNotReadyError, match="failed"):
        await m.generate("bad", req("x"))
    kinds = [(e.kind, e.model) for e in events]
    assert kinds == [("load_start", "good"), ("load_ok", "good"), ("load_start", "bad"), ("load_fail", "bad")]
    assert events[1].engine == "torch" and events[1].duration_s >= 0 and events[3].error
    await m.aclose()


def test_lifecycle_and_existing_contract():
    events: list[ModelEvent] = []
    m = ModelManager(echo_config(), on_event=events.append)
    loaded = m.load_model("echo-a")
    assert m.is_loaded("echo-a") and m.get_model("echo-a") is loaded and loaded.engine_name == "echo"
    assert m.load_model("echo-a") is loaded  # already loaded: nothing happens
    m.load_model("echo-b")
    assert m.infer("echo-a", "one two three", max_new_tokens=2) == "two three"
    assert m.infer("echo-a", ["a b", "c d e"], max_new_tokens=1, temperature=0.0) == ["b", "e"]
    assert m.unload_model("echo-a") and not m.unload_model("echo-a")
    assert m.unload_all() == 1 and not m.is_loaded("echo-b")
    assert [e.kind for e in events].count("unload") == 2
    m.load_model("echo-a")
    with pytest.raises(TypeError, match="bogus"):
        m.infer("echo-a", "x", bogus=1)
    m.close()


async def test_blocking_api_refuses_to_run_inside_the_event_loop():
    m = ModelManager(echo_config())
    m.load_model("echo-a")
    with pytest.raises(MuaiError, match="async API"):
        m.infer("echo-a", "x")
    await m.aclose()


# -- async serving ------------------------------------------------------------------------------------------------


async def test_concurrent_requests_are_batched_and_answered_one_to_one():
    sizes: list[tuple[str, str, int]] = []
    m = ModelManager(echo_config(batching={"max_batch_size": 8, "batch_timeout_s": 5.0, "adaptive": False}),
                     on_batch=lambda *a: sizes.append(a))
    await m.aload_model("echo-a")
    outs = await asyncio.gather(*(m.generate("echo-a", req(f"w {i}", 1)) for i in range(16)))
    assert [o.text for o in outs] == [str(i) for i in range(16)]
    assert sizes == [("echo-a", "echo", 8), ("echo-a", "echo", 8)]
    await m.aclose()


async def test_incompatible_sampling_never_shares_a_batch():
    sizes = []
    m = ModelManager(echo_config(batching={"max_batch_size": 8, "batch_timeout_s": 0.01, "adaptive": False}),
                     on_batch=lambda *a: sizes.append(a[2]))
    await m.aload_model("echo-a")
    await asyncio.gather(*(m.generate("echo-a", req(f"w {i}", 1, temperature=0.5 * (i % 2))) for i in range(6)))
    assert sorted(sizes) == [3, 3]
    await m.aclose()


async def test_one_bad_request_does_not_fail_its_neighbours():
    m = ModelManager(echo_config(batching={"max_batch_size": 3, "batch_timeout_s": 5.0, "adaptive": False}))
    await m.aload_model("echo-a")
    outs = await asyncio.gather(
        m.generate("echo-a", req("a b", 1)), m.generate("echo-a", req("c d", 0)), m.generate("echo-a", req("e f", 1)),
        return_exceptions=True,
    )
    assert outs[0].text == "b" and outs[2].text == "f"
    assert isinstance(outs[1], InvalidRequestError)
    await m.aclose()


async def test_embeddings_are_batched_across_requests_and_split_back():
    sizes = []
    m = ModelManager(echo_config(batching={"max_batch_size": 4, "batch_timeout_s": 0.05, "adaptive": False}),
                     on_batch=lambda *a: sizes.append(a[2]))
    await m.aload_model("echo-emb")
    texts = [["a"], ["b", "c"], ["d"], ["e", "f", "g"]]
    outs = await asyncio.gather(*(m.embed("echo-emb", t) for t in texts))
    assert [len(o) for o in outs] == [1, 2, 1, 3] and sizes == [4]  # four requests, seven texts, one engine call
    solo = await m.embed("echo-emb", ["c"])
    assert outs[1][1].vector == solo[0].vector
    with pytest.raises(ModelNotReadyError, match="does not generate"):
        await m.generate("echo-emb", req("x"))
    await m.aclose()


async def test_disabled_batching_runs_each_request_alone():
    sizes = []
    m = ModelManager(echo_config(batching={"enabled": False}), on_batch=lambda *a: sizes.append(a[2]))
    await m.aload_model("echo-a")
    outs = await asyncio.gather(*(m.generate("echo-a", req(f"w {i}", 1)) for i in range(5)))
    assert [o.text for o in outs] == [str(i) for i in range(5)] and sizes == [1] * 5
    assert m.batcher("echo-a") is None
    await m.aclose()


async def test_unload_fails_waiting_requests_and_stops_serving():
    m = ModelManager(echo_config(batching={"max_batch_size": 8, "batch_timeout_s": 10.0, "adaptive": False}))
    await m.aload_model("echo-a")
    waiting = [asyncio.create_task(m.generate("echo-a", req(f"w {i}", 1))) for i in range(2)]
    b = m.batcher("echo-a")
    while b.policy.pending < 2:
        await asyncio.sleep(0)
    assert await m.aunload_model("echo-a") is True
    outs = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, BatcherClosedError) for o in outs)
    assert m.status().as_dict()["models"]["echo-a"]["state"] == "unloaded"
    with pytest.raises(ModelNotReadyError):
        await m.generate("echo-a", req("x"))
    await m.aclose()


async def test_a_model_unloaded_mid_request_is_not_ready_not_a_crash():
    m = ModelManager(echo_config())
    await m.aload_model("echo-a")
    managed = m.get_model("echo-a")
    # What a request on the loop can find while an unload runs on a worker thread: it passed the readiness check,
    # then the chain went (the batcher not yet). It must be told "not ready", not hit an AttributeError.
    managed.chain = None
    assert managed.batcher is not None
    with pytest.raises(ModelNotReadyError):
        await m.generate("echo-a", req("x"))
    with pytest.raises(ModelNotReadyError):
        await m.embed("echo-a", ["x"])
    with pytest.raises(ModelNotReadyError):
        async for _ in m.generate_stream("echo-a", req("x")):
            pass
    await m.aclose()


async def test_a_loaded_model_whose_engines_all_failed_is_reported_unavailable():
    faults = EchoFaults()

    def factory(name, settings):
        if name == "echo":
            return EchoEngine({**settings, "faults": faults})
        from adapters.registry import create_engine

        return create_engine(name, settings)

    # echo, then torch behind it, which cannot load the (missing) path: once echo fails, nothing serves.
    m = ModelManager(echo_config(), engine_factory=factory)
    await m.aload_model("echo-a")
    entry = m.status().as_dict()["models"]["echo-a"]
    assert entry["state"] == "ready" and entry["servable"] is True
    faults.fail_generate_always = True
    with pytest.raises(Exception):
        await m.generate("echo-a", req("x"))
    entry = m.status().as_dict()["models"]["echo-a"]
    assert entry["state"] == "unavailable" and entry["servable"] is False
    assert m.is_loaded("echo-a")  # still registered as loaded: the chain re-probes its engines later
    await m.aclose()


@pytest.mark.parametrize("batching", [True, False])
async def test_embeddings_reach_the_engine_in_chunks_of_its_max_batch_size(batching):
    from adapters.base import Capabilities
    from adapters.echo import hash_vector

    sizes: list[int] = []

    class SmallBatchEcho(EchoEngine):
        """The echo engine declaring that it takes at most 3 texts per call, and recording each call's size."""

        capabilities = Capabilities(streaming=True, max_batch_size=3)

        async def embed(self, texts):
            sizes.append(len(texts))
            return await super().embed(texts)

    m = ModelManager(echo_config(batching={"enabled": batching}),
                     engine_factory=lambda name, settings: SmallBatchEcho(settings))
    await m.aload_model("echo-emb")
    texts = [f"text {i}" for i in range(8)]
    results = await m.embed("echo-emb", texts)
    assert [r.vector for r in results] == [hash_vector(t) for t in texts]
    assert sizes and max(sizes) <= 3 and sum(sizes) == 8
    await m.aclose()


async def test_stream_yields_chunks_then_finishes():
    m = ModelManager(echo_config())
    await m.aload_model("echo-a")
    chunks = [c async for c in m.generate_stream("echo-a", req("a b c d", 3))]
    assert "".join(c.text for c in chunks) == "b c d" and chunks[-1].finish_reason == "length"
    await m.aclose()


async def test_runtime_config_reaches_batcher_and_engine():
    cfg = echo_config()
    m = ModelManager(cfg)
    await m.aload_model("echo-a")
    await m.generate("echo-a", req("warm", 1))  # binds the batcher
    models = [mc.model_copy(update={"inject_delay_s": 0.25}) if mc.name == "echo-a" else mc for mc in cfg.models]
    new = cfg.model_copy(update={
        "batching": cfg.batching.model_copy(update={"max_batch_size": 4, "batch_timeout_s": 0.5, "adaptive": False}),
        "models": models,
    })
    changed = m.apply_config(new)
    assert set(changed) == {"batching.max_batch_size", "batching.batch_timeout_s", "batching.adaptive",
                            "models.echo-a.inject_delay_s"}
    b = m.batcher("echo-a")
    assert (b.batch_size, b.batch_timeout_s) == (4, 0.5)
    assert m.get_model("echo-a").engine.status()["inject_delay_s"] == 0.25
    st = m.status().as_dict()["models"]["echo-a"]
    assert st["batching"]["batch_size"] == 4 and st["batching"]["batch_timeout_s"] == 0.5
    await m.aclose()


async def test_fallback_is_forwarded_and_degradation_shown(tiny_llama_path):
    faults = EchoFaults(fail_generate_times=1)
    fallbacks, events = [], []

    def factory(name, settings):
        if name == "echo":
            return EchoEngine({**settings, "faults": faults})
        from adapters.registry import create_engine

        return create_engine(name, settings)

    cfg = MuaiConfig(models=[{"name": "m", "path": tiny_llama_path}], engines={"preference": ["echo", "torch"]})
    m = ModelManager(cfg, engine_factory=factory, on_fallback=fallbacks.append, on_event=events.append)
    await m.aload_model("m")
    assert m.status().as_dict()["models"]["m"]["engine"] == "echo"
    out = await m.generate("m", req("hello there", 3))
    assert out.completion_tokens > 0
    assert [(f.from_engine, f.to_engine) for f in fallbacks] == [("echo", "torch")]
    assert any(e.kind == "fallback" and e.engine == "torch" for e in events)
    st = m.status().as_dict()["models"]["m"]
    assert st["engine"] == "torch" and st["degraded"] and any("echo" in r for r in st["degraded_reasons"])
    assert m.status().as_dict()["engines"]["echo"]["available"] is True
    await m.aclose()


# -- nothing enabled means nothing changed (13.1) and padding (6.5, 6.6) --------------------------------------------

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog and more", "a", "Tell me a story about a robot"]


def _plain_transformers(path: str, prompts: list[str], n: int) -> list[str]:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def test_everything_disabled_equals_plain_transformers(tiny_llama_path):
    cfg = MuaiConfig(
        models=[{"name": "llama", "path": tiny_llama_path}],
        engines={"preference": ["torch"]},
        batching={"enabled": False},
        kv_cache={"enabled": False},
    )
    m = ModelManager(cfg)
    m.load_model("llama")
    assert m.status().as_dict()["models"]["llama"]["engine"] == "torch"
    ours = [m.infer("llama", p, max_new_tokens=8) for p in PROMPTS]
    assert ours == _plain_transformers(tiny_llama_path, PROMPTS, 8)
    m.close()


async def test_batched_equals_unbatched_across_prompt_lengths(tiny_llama_path):
    """Left padding and attention masks: prompts of different lengths in one batch give their solo outputs."""
    outputs = {}
    for enabled in (True, False):
        sizes = []
        cfg = MuaiConfig(
            models=[{"name": "llama", "path": tiny_llama_path}],
            engines={"preference": ["torch"]},
            batching={"enabled": enabled, "max_batch_size": len(PROMPTS), "batch_timeout_s": 5.0, "adaptive": False},
            kv_cache={"enabled": False},
        )
        m = ModelManager(cfg, on_batch=lambda *a: sizes.append(a[2]))
        await m.aload_model("llama")
        outs = await asyncio.gather(*(m.generate("llama", req(p, 8)) for p in PROMPTS))
        outputs[enabled] = [(o.text, o.prompt_tokens, o.completion_tokens) for o in outs]
        assert sizes == ([len(PROMPTS)] if enabled else [1] * len(PROMPTS))
        await m.aclose()
    assert outputs[True] == outputs[False]
    assert "<pad>" not in "".join(t for t, _, _ in outputs[True])


async def test_length_bucketing_splits_very_different_lengths(tiny_llama_path):
    sizes = []
    cfg = MuaiConfig(
        models=[{"name": "llama", "path": tiny_llama_path}],
        engines={"preference": ["torch"]},
        batching={"max_batch_size": 8, "batch_timeout_s": 0.05, "adaptive": False, "length_bucketing": True},
        kv_cache={"enabled": False},
    )
    m = ModelManager(cfg, on_batch=lambda *a: sizes.append(a[2]))
    await m.aload_model("llama")
    await asyncio.gather(*(m.generate("llama", req(p, 2)) for p in ["ab", "cd", "x" * 100, "y" * 120]))
    assert sorted(sizes) == [2, 2]
    await m.aclose()


async def test_end_conversation_releases_cached_state(tiny_llama_path):
    cfg = MuaiConfig(models=[{"name": "llama", "path": tiny_llama_path}], engines={"preference": ["torch"]})
    m = ModelManager(cfg)
    await m.aload_model("llama")
    await m.generate("llama", GenerationRequest("Hello there", SamplingParams(max_new_tokens=4), conversation_id="c1"))
    assert m.end_conversation("c1") is True
    assert m.end_conversation("c1") is False
    await m.aclose()


async def test_all_models_share_one_kv_cache_budget(tiny_llama_path):
    # A conversation's state holds its preallocated buffers (room for the next turn, at least 64 positions: about
    # 130 KiB on the tiny model), so a budget for a few of them, not for twelve.
    budget = 512 * 1024
    cfg = MuaiConfig(
        models=[{"name": "llama-a", "path": tiny_llama_path}, {"name": "llama-b", "path": tiny_llama_path}],
        engines={"preference": ["torch"]},
        kv_cache={"budget_bytes": budget},
    )
    m = ModelManager(cfg)
    await m.aload_model("llama-a")
    await m.aload_model("llama-b")
    for i in range(6):
        for name in ("llama-a", "llama-b"):
            await m.generate(name, GenerationRequest(f"turn {i} of a conversation", SamplingParams(max_new_tokens=8),
                                                     conversation_id=f"{name}-c{i}"))
    cache = m._kv_cache
    assert cache is not None
    assert 0 < cache.stats().bytes_held <= budget
    assert cache.stats().evictions > 0  # twelve conversations do not fit one small budget
    m.apply_config(MuaiConfig(**{**cfg.model_dump(), "kv_cache": {"budget_bytes": 0}}))
    assert cache.stats().bytes_held == 0
    await m.aclose()


async def test_resident_budget_unloads_the_least_recently_used_on_demand_model(tiny_llama_path):
    from orchestrator.managed import weights_bytes as _weights_bytes

    size = _weights_bytes(tiny_llama_path)
    assert size > 0
    on_demand = {"path": tiny_llama_path, "preload": False, "required": False}
    cfg = MuaiConfig(
        models=[{"name": "a", **on_demand}, {"name": "b", **on_demand}, {"name": "c", **on_demand}],
        engines={"preference": ["torch"], "resident_budget_bytes": int(size * 2.5)},
    )
    m = ModelManager(cfg)
    await m.aload_model("a")
    await m.aload_model("b")
    await m.generate("a", req("a is used last"))
    await m.aload_model("c")  # two fit: b, the least recently used, makes room
    assert [m.is_loaded(n) for n in "abc"] == [True, False, True]
    assert m.status().as_dict()["models"]["b"]["evicted"] is True
    result = await m.generate("b", req("b comes back on demand"))  # loads b again, evicting a
    assert result.completion_tokens == 4
    assert [m.is_loaded(n) for n in "abc"] == [False, True, True]
    await m.aclose()


async def test_concurrent_requests_to_an_evicted_model_share_one_reload(tiny_llama_path):
    from orchestrator.managed import weights_bytes as _weights_bytes

    on_demand = {"path": tiny_llama_path, "preload": False, "required": False}
    cfg = MuaiConfig(
        models=[{"name": "a", **on_demand}, {"name": "b", **on_demand}],
        engines={"preference": ["torch"], "resident_budget_bytes": int(_weights_bytes(tiny_llama_path) * 1.5)},
    )
    events: list[ModelEvent] = []
    m = ModelManager(cfg, on_event=events.append)
    await m.aload_model("a")
    await m.aload_model("b")  # evicts a
    assert not m.is_loaded("a")
    results = await asyncio.gather(*(m.generate("a", req(f"request {i}")) for i in range(4)))
    assert [r.completion_tokens for r in results] == [4, 4, 4, 4]
    assert [e.kind for e in events if e.model == "a"].count("load_ok") == 2  # the first load and one reload
    await m.aclose()


async def test_resident_budget_never_unloads_preloaded_or_required_models(tiny_llama_path):
    cfg = MuaiConfig(
        models=[{"name": "pinned", "path": tiny_llama_path}, {"name": "extra", "path": tiny_llama_path, "preload": False}],
        engines={"preference": ["torch"], "resident_budget_bytes": 1024},
    )
    m = ModelManager(cfg)
    with pytest.raises(ModelLoadFailedError, match="resident_budget_bytes"):
        await m.aload_model("pinned")
    cfg = MuaiConfig(
        models=cfg.model_dump()["models"],
        engines={"preference": ["torch"], "resident_budget_bytes": int(1.5 * _size(tiny_llama_path))},
    )
    m2 = ModelManager(cfg)
    await m2.aload_model("pinned")
    with pytest.raises(ModelLoadFailedError, match="may not be unloaded hold") as err:
        await m2.aload_model("extra")
    assert "pinned" in str(err.value)
    assert m2.is_loaded("pinned")
    await m.aclose()
    await m2.aclose()


def _size(path):
    from orchestrator.managed import weights_bytes as _weights_bytes

    return _weights_bytes(path)


def test_engine_preference_per_call(tiny_llama_path):
    cfg = MuaiConfig(models=[{"name": "llama", "path": tiny_llama_path, "engine": "echo"}])
    m = ModelManager(cfg)
    m.load_model("llama")
    assert m.get_model("llama").engine_name == "echo"
    assert m.infer("llama", "one two three", max_new_tokens=1) == "three"
    via_torch = m.infer("llama", "one two three", max_new_tokens=4, engine_preference=["torch"])
    assert via_torch != "three" and isinstance(via_torch, str)
    m.close()


def test_public_surface():
    import orchestrator.batcher as batcher
    import orchestrator.batching as batching
    import orchestrator.errors as errors
    import orchestrator.manager as manager
    import orchestrator.workflows as workflows

    assert set(manager.__all__) == {"ManagedModel", "ModelConfigError", "ModelEvent", "ModelManager", "ModelState"}
    assert set(batcher.__all__) == {"BatchResultMismatchError", "Batcher", "BatcherStats", "Submission"}
    assert set(batching.__all__) == {"Batch", "BatchingConfigError", "BatchingPolicy", "DispatchReason",
                                     "PolicyStats", "Ticket", "length_bucket"}
    assert {"MuaiError", "UnknownModelError", "ModelNotReadyError", "WorkflowValidationError"} <= set(errors.__all__)
    assert {"Workflow", "WorkflowResult", "default_workflows", "ChatWorkflow", "EmbedThenGenerateWorkflow"} <= set(
        workflows.__all__)
    for mod in (batcher, batching, errors, manager, workflows):
        for name in mod.__all__:
            assert hasattr(mod, name), (mod.__name__, name)
