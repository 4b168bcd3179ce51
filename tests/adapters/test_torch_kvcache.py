"""Multi-turn KV-cache reuse in the torch engine: outputs identical to recomputing, exact bytes, LRU, release."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from adapters.base import GenerationRequest, ModelSpec, SamplingParams  # noqa: E402
from adapters.kvcache import tensor_bytes  # noqa: E402
from adapters.torch_engine import TorchEngine  # noqa: E402

SP = SamplingParams(max_new_tokens=8)
USER_TURNS = [
    "User: Tell me a story about a small robot.\nAssistant:",
    "\nUser: What is the weather like today?\nAssistant:",
    "\nUser: Numbers one two three four five.\nAssistant:",
    "\nUser: Hello there, how are you today?\nAssistant:",
]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def load(path, *, budget=64 * 1024**2, ttl=None, clock=None, options=None) -> TorchEngine:
    engine = TorchEngine({}, clock=clock or Clock())
    kv = {"enabled": True, "budget_bytes": budget, "idle_ttl_s": ttl}
    engine.load(ModelSpec("tiny", str(path), device="cpu", options={"kv_cache": kv, **(options or {})}))
    return engine


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tiny_llama_dir, tiny_gpt2_dir):
    return tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir


async def run_conversation(engine: TorchEngine, cid: str | None, turns=USER_TURNS, sp=SP):
    history, results = "", []
    for user in turns:
        history += user
        (res,) = await engine.generate([GenerationRequest(history, sp, conversation_id=cid)])
        assert res.error is None
        results.append(res)
        history += res.text
    return results


async def test_reuse_gives_the_same_greedy_outputs_as_recomputing(model_dir):
    engine = load(model_dir)
    reused = await run_conversation(engine, "c1")
    recomputed = await run_conversation(engine, None)
    assert [r.text for r in reused] == [r.text for r in recomputed]
    assert [r.prompt_tokens for r in reused] == [r.prompt_tokens for r in recomputed]
    assert [r.cache_hit for r in reused] == [False, True, True, True]
    assert all(r.cached_tokens > 0 for r in reused[1:])
    # Each later turn reuses at least the previous turn's whole prompt.
    for prev, cur in zip(reused, reused[1:]):
        assert cur.cached_tokens >= prev.prompt_tokens
    st = engine.cache_stats()
    assert (st.hits, st.misses, st.entries) == (3, 1, 1)
    assert st.hit_rate == 0.75
    stats = engine.stats()
    assert stats["kv_cache_hits"] == 3.0 and stats["kv_cache_bytes_held"] == st.bytes_held > 0
    engine.close()


async def test_reuse_with_sampling_and_a_seed_matches_recompute(tiny_llama_dir):
    engine = load(tiny_llama_dir)
    sp = SamplingParams(max_new_tokens=6, temperature=0.9, seed=11)
    reused = await run_conversation(engine, "s", sp=sp)
    recomputed = await run_conversation(engine, None, sp=sp)
    assert [r.text for r in reused] == [r.text for r in recomputed]
    engine.close()


async def test_bytes_held_are_counted_exactly_from_the_tensors(tiny_llama_dir):
    engine = load(tiny_llama_dir)
    await run_conversation(engine, "a", USER_TURNS[:2])
    entry = engine.conversations.peek("a")
    ids, kv = entry.payload
    # The cached state covers exactly the token ids stored with it.
    assert kv.get_seq_length() == len(ids)
    cfg = engine.model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    # What is held is the preallocated buffers, filled or not: room for the next turn is memory in use too.
    capacity = {layer.capacity() for layer in kv.layers}
    assert len(capacity) == 1
    (capacity,) = capacity
    assert capacity > len(ids)
    exact = per_token * capacity
    assert entry.nbytes == exact == tensor_bytes(kv) == engine.cache_stats().bytes_held
    filled = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                 for layer in kv.layers)
    assert filled == per_token * len(ids) < exact
    engine.close()


async def test_a_next_turn_writes_into_the_buffers_it_finds(tiny_llama_dir):
    """A short next turn fits the room reserved by the last one: no reallocation (a copy of the whole history)
    before its first token, and its answer is what recomputing gives."""
    engine = load(tiny_llama_dir)
    replies = await run_conversation(engine, "r", USER_TURNS[:2])
    _, kv = engine.conversations.peek("r").payload
    buffers = [layer._kbuf.data_ptr() for layer in kv.layers]
    history = USER_TURNS[0] + replies[0].text + USER_TURNS[1] + replies[1].text + " Thanks."
    (res,) = await engine.generate([GenerationRequest(history, SP, conversation_id="r")])
    (ref,) = await engine.generate([GenerationRequest(history, SP)])
    assert res.cache_hit and res.text == ref.text
    _, kv = engine.conversations.peek("r").payload
    assert [layer._kbuf.data_ptr() for layer in kv.layers] == buffers
    engine.close()


async def test_a_rewritten_history_is_a_miss_and_replaces_the_entry(tiny_llama_dir):
    engine = load(tiny_llama_dir)
    await run_conversation(engine, "c", USER_TURNS[:2])
    other = "Colours red green blue yellow. Tell me about them."
    (res,) = await engine.generate([GenerationRequest(other, SP, conversation_id="c")])
    (ref,) = await engine.generate([GenerationRequest(other, SP)])
    assert not res.cache_hit and res.cached_tokens == 0 and res.text == ref.text
    ids, _ = engine.conversations.peek("c").payload
    assert list(ids[: res.prompt_tokens]) == engine.tokenizer(other).input_ids
    st = engine.cache_stats()
    assert (st.hits, st.misses, st.entries) == (1, 2, 1)
    engine.close()


async def test_a_partly_shared_history_reuses_the_common_prefix(tiny_llama_dir):
    engine = load(tiny_llama_dir)
    first = "User: Tell me a story about a small robot who learned to count the stars.\nAssistant:"
    await engine.generate([GenerationRequest(first, SP, conversation_id="p")])
    edited = "User: Tell me a story about a small robot who learned to sing.\nAssistant:"
    (res,) = await engine.generate([GenerationRequest(edited, SP, conversation_id="p")])
    (ref,) = await engine.generate([GenerationRequest(edited, SP)])
    assert res.cache_hit and 1 < res.cached_tokens < res.prompt_tokens
    assert res.text == ref.text
    # The same prompt again: everything but the last token comes from the cache.
    (again,) = await engine.generate([GenerationRequest(edited, SP, conversation_id="p")])
    assert again.cached_tokens == again.prompt_tokens - 1 and again.text == ref.text
    engine.close()


async def test_end_conversation_releases_its_memory_at_once(tiny_llama_dir):
    engine = load(tiny_llama_dir)
    await run_conversation(engine, "x", USER_TURNS[:2])
    await run_conversation(engine, "y", USER_TURNS[:1])
    held = engine.cache_stats().bytes_held
    y_bytes = engine.conversations.peek("y").nbytes
    assert engine.end_conversation("x") is True
    assert engine.cache_stats().bytes_held == y_bytes < held
    assert engine.end_conversation("x") is False
    (res,) = await engine.generate([GenerationRequest(USER_TURNS[0], SP, conversation_id="x")])
    assert not res.cache_hit
    engine.close()


async def test_lru_eviction_keeps_bytes_within_the_budget(tiny_llama_dir):
    probe = load(tiny_llama_dir)
    await run_conversation(probe, "one", USER_TURNS[:1])
    one = probe.cache_stats().bytes_held
    probe.close()
    engine = load(tiny_llama_dir, budget=int(one * 2.5))
    for cid in ("a", "b", "c"):
        await run_conversation(engine, cid, USER_TURNS[:1])
        assert engine.cache_stats().bytes_held <= engine.cache_stats().budget_bytes
    st = engine.cache_stats()
    assert st.evictions == 1 and st.entries == 2
    assert engine.conversations.ids() == ["b", "c"]
    (res,) = await engine.generate([GenerationRequest(USER_TURNS[0] + "x", SP, conversation_id="a")])
    assert not res.cache_hit  # evicted
    # Shrinking the budget at runtime evicts down at once.
    engine.reconfigure(kv_cache_budget_bytes=int(one * 1.5))
    st = engine.cache_stats()
    assert st.entries == 1 and st.bytes_held <= int(one * 1.5)
    engine.reconfigure(kv_cache_budget_bytes=0)
    assert engine.cache_stats().bytes_held == 0
    engine.close()


async def test_idle_conversations_expire(tiny_llama_dir):
    clock = Clock()
    engine = load(tiny_llama_dir, ttl=30.0, clock=clock)
    await run_conversation(engine, "idle", USER_TURNS[:1])
    clock.t += 31
    st = engine.cache_stats()
    assert st.entries == 0 and st.bytes_held == 0 and st.expirations == 1
    engine.close()


async def test_streaming_a_cached_conversation(tiny_llama_dir):
    engine = load(tiny_llama_dir)
    plain = await run_conversation(engine, None, USER_TURNS[:2])
    history = USER_TURNS[0]
    chunks = [c async for c in engine.generate_stream(GenerationRequest(history, SP, conversation_id="s"))]
    first = "".join(c.text for c in chunks)
    assert first == plain[0].text
    history += first + USER_TURNS[1]
    chunks = [c async for c in engine.generate_stream(GenerationRequest(history, SP, conversation_id="s"))]
    assert "".join(c.text for c in chunks) == plain[1].text
    assert engine.cache_stats().hits == 1
    engine.close()


async def test_conversations_mixed_into_a_batch(tiny_llama_dir):
    engine = load(tiny_llama_dir)
    await run_conversation(engine, "m", USER_TURNS[:1])
    (turn1,) = await engine.generate([GenerationRequest(USER_TURNS[0], SP)])
    follow = USER_TURNS[0] + turn1.text + USER_TURNS[1]
    batch = [GenerationRequest("Hello world", SP), GenerationRequest(follow, SP, conversation_id="m"),
             GenerationRequest("A", SP)]
    results = await engine.generate(batch)
    refs = [(await engine.generate([GenerationRequest(r.prompt, SP)]))[0] for r in batch]
    assert [r.text for r in results] == [r.text for r in refs]
    assert [r.cache_hit for r in results] == [False, True, False]
    engine.close()


async def test_without_the_cache_option_conversation_ids_just_recompute(tiny_llama_dir):
    engine = TorchEngine({})
    engine.load(ModelSpec("tiny", str(tiny_llama_dir), device="cpu"))
    assert not engine.capabilities.conversation_cache
    results = await run_conversation(engine, "z", USER_TURNS[:2])
    assert not any(r.cache_hit for r in results)
    assert engine.stats() == {} and engine.end_conversation("z") is False
    # A budget change at runtime does not grow a private cache per engine: the cache is one object its owner
    # passes in (one budget for all models), so an engine started without one stays without.
    engine.reconfigure(kv_cache_budget_bytes=1024**2, kv_cache_idle_ttl_s=60.0)
    assert not engine.capabilities.conversation_cache and engine.cache_stats() is None
    results = await run_conversation(engine, "z", USER_TURNS[:2])
    assert not any(r.cache_hit for r in results) and engine.stats() == {}
    engine.close()


async def test_one_cache_shared_by_two_models_keeps_one_budget(tiny_llama_dir, tiny_gpt2_dir):
    from adapters.kvcache import ConversationCache

    probe = load(tiny_gpt2_dir)
    await run_conversation(probe, "p", USER_TURNS[:1])
    gpt2_bytes = probe.cache_stats().bytes_held
    probe.close()
    shared = ConversationCache(budget_bytes=int(gpt2_bytes * 1.2))  # not room for both
    llama, gpt2 = TorchEngine({}), TorchEngine({})
    llama.load(ModelSpec("llama", str(tiny_llama_dir), device="cpu", options={"kv_cache": shared}))
    gpt2.load(ModelSpec("gpt2", str(tiny_gpt2_dir), device="cpu", options={"kv_cache": shared}))
    await run_conversation(llama, "same-id", USER_TURNS[:1])
    await run_conversation(gpt2, "same-id", USER_TURNS[:1])  # same id, other model: its own entry
    assert shared.bytes_held <= shared.budget_bytes
    assert llama.cache_stats().evictions == 1 and llama.cache_stats().entries == 0
    assert gpt2.cache_stats().entries == 1 and gpt2.cache_stats().bytes_held == shared.bytes_held
    assert gpt2.end_conversation("same-id") and shared.bytes_held == 0
    llama.close()
    gpt2.close()


def test_kv_cache_benchmark_runs_and_reports(tmp_path, tiny_llama_dir, capsys):
    import json

    from bench import kv_cache

    rc = kv_cache.main(["--model", str(tiny_llama_dir), "--repeats", "1", "--history-tokens", "60",
                        "--new-tokens", "2", "--results-dir", str(tmp_path)])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and line == json.loads((tmp_path / "kv_cache.json").read_text())
    assert "| kv_cache | reuse_speedup |" in (tmp_path / "SUMMARY.md").read_text()
    assert line["bench"] == "kv_cache" and line["goals"] == {"reuse_speedup": ">= 10"}
    assert line["figures"]["outputs_identical"] is True
    assert line["ratios"]["reuse_speedup"] > 0
    assert line["figures"]["threads"] == torch.get_num_threads()


def test_a_preallocated_layer_holds_what_a_dynamic_layer_holds():
    """Writes in place, crops, outgrows its reservation (one reallocation, the past kept), selects rows: the keys
    and values always equal transformers' own DynamicLayer fed the same way."""
    from transformers.cache_utils import DynamicLayer

    from adapters.hf_decode import preallocated_layer

    gen = torch.Generator().manual_seed(0)
    ours, theirs = preallocated_layer()(), DynamicLayer()
    ours.reserve(8)

    def feed(n):
        k, v = torch.randn(2, 3, n, 4, generator=gen), torch.randn(2, 3, n, 5, generator=gen)
        got, want = ours.update(k, v), theirs.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    feed(5)
    assert ours.capacity() == 8 and ours.get_seq_length() == 5
    first = ours._kbuf.data_ptr()
    feed(2)
    assert ours._kbuf.data_ptr() == first  # fitted: written in place
    ours.crop(-3), theirs.crop(-3)
    assert ours.get_seq_length() == theirs.get_seq_length() == 4
    feed(6)  # outgrows the 8 reserved
    assert ours.capacity() == 10 and ours._kbuf.data_ptr() != first
    assert ours.held_bytes() == 2 * 3 * 10 * (4 + 5) * 4
    ours.batch_select_indices(torch.tensor([1])), theirs.batch_select_indices(torch.tensor([1]))
    assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    feed_one = torch.randn(1, 3, 1, 4, generator=gen), torch.randn(1, 3, 1, 5, generator=gen)
    got, want = ours.update(*feed_one), theirs.update(*feed_one)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_packed_linear_computes_linear_and_each_row_alike_for_any_row_count():
    from adapters import cpu_linear

    if not cpu_linear.packing_available():
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.Linear(80, 64, bias=False))
    x = torch.randn(1, 130, 96)
    with torch.no_grad():
        want = model(x)
        assert cpu_linear.pack_linears(model, min_weights=0) == 2
        got = model(x)
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # What reuse relies on: the last rows alone compute what they compute inside the whole prompt.
        for rows in (1, 2, 15, 16, 100):
            assert torch.equal(model(x[:, -rows:].contiguous()), got[:, -rows:])


def test_pack_linears_leaves_small_other_dtype_and_tied_layers_alone():
    from adapters import cpu_linear

    if not cpu_linear.packing_available():
        pytest.skip("this torch build has no oneDNN")
    side = 512  # 512 x 512 = MIN_WEIGHTS
    assert side * side == cpu_linear.MIN_WEIGHTS
    model = torch.nn.Module()
    model.big = torch.nn.Linear(side, side)
    model.small = torch.nn.Linear(side, side - 1)
    model.float64 = torch.nn.Linear(side, side).double()
    model.embed = torch.nn.Embedding(side, side)
    model.head = torch.nn.Linear(side, side, bias=False)
    model.head.weight = model.embed.weight
    assert cpu_linear.pack_linears(model) == 1
    assert not isinstance(model.big, torch.nn.Linear)
    assert all(type(getattr(model, name)) is torch.nn.Linear for name in ("small", "float64", "head"))


async def test_a_packed_model_reuses_turns_as_recomputing_and_the_setting_turns_packing_off(
        tiny_llama_dir, monkeypatch):
    from adapters import cpu_linear

    if not cpu_linear.packing_available():
        pytest.skip("this torch build has no oneDNN")
    plain = load(tiny_llama_dir)
    assert any(type(m) is torch.nn.Linear for m in plain._backend_.model.modules())  # tiny: below MIN_WEIGHTS
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHTS", 0)
    engine = load(tiny_llama_dir)
    assert not any(type(m) is torch.nn.Linear for m in engine._backend_.model.modules())
    reused = await run_conversation(engine, "p")
    recomputed = await run_conversation(engine, None)
    assert [r.text for r in reused] == [r.text for r in recomputed]
    assert all(r.cache_hit for r in reused[1:])
    off = TorchEngine({"packed_linear": False}, clock=Clock())
    off.load(ModelSpec("tiny", str(tiny_llama_dir), device="cpu"))
    assert any(type(m) is torch.nn.Linear for m in off._backend_.model.modules())
    for e in (plain, engine, off):
        e.close()
