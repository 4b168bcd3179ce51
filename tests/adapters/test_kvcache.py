"""ConversationCache: exact byte accounting, LRU eviction, idle TTL, release, runtime budget (pure, no torch)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.kvcache import CacheStats, ConversationCache, KvCacheError, tensor_bytes


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeTensor:
    """Our own stand-in with the two methods tensor_bytes reads (numel, element_size)."""

    def __init__(self, numel: int, element_size: int = 4) -> None:
        self._n, self._e = numel, element_size

    def numel(self) -> int:
        return self._n

    def element_size(self) -> int:
        return self._e


class Layer:
    def __init__(self, k, v) -> None:
        self.keys, self.values = k, v


class Layered:
    def __init__(self, *layers) -> None:
        self.layers = list(layers)


def test_tensor_bytes_counts_every_layer_key_and_value():
    cache = Layered(Layer(FakeTensor(10), FakeTensor(10)), Layer(FakeTensor(6, 2), FakeTensor(6, 2)))
    assert tensor_bytes(cache) == 10 * 4 * 2 + 6 * 2 * 2
    assert tensor_bytes(((FakeTensor(3), FakeTensor(3)),)) == 24
    assert tensor_bytes((("ids",), Layered(Layer(FakeTensor(1), None)))) == 4
    assert tensor_bytes(None) == 0


def test_tensor_bytes_on_a_real_dynamic_cache():
    torch = pytest.importorskip("torch")
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.zeros(1, 2, 5, 8, dtype=torch.bfloat16)
    v = torch.ones(1, 2, 5, 8, dtype=torch.bfloat16)
    cache.update(k, v, 0)
    cache.update(k, v, 1)
    assert tensor_bytes(cache) == 2 * 2 * 80 * 2  # 2 layers x (keys + values) x 80 elements x 2 bytes
    cache.update(k[:, :, :1], v[:, :, :1], 0)
    assert tensor_bytes(cache) == (2 * 96 + 2 * 80) * 2


def test_put_take_and_hit_rate():
    c = ConversationCache(budget_bytes=100, clock=Clock())
    assert c.take("a") is None
    c.record(False)
    assert c.put("a", "state-a", 40)
    assert "a" in c and len(c) == 1 and c.bytes_held == 40
    assert c.take("a") == "state-a"
    assert "a" not in c and c.bytes_held == 0
    c.record(True)
    st = c.stats()
    assert (st.hits, st.misses, st.entries, st.bytes_held) == (1, 1, 0, 0)
    assert st.hit_rate == 0.5
    assert st.as_dict()["hit_rate"] == 0.5
    assert CacheStats(0, 0, 0, 0, 0).hit_rate == 0.0


def test_lru_evicts_least_recently_used_first():
    clock = Clock()
    c = ConversationCache(budget_bytes=100, clock=clock)
    c.put("a", 1, 40)
    c.put("b", 2, 40)
    c.get("a")  # a is now more recent than b
    c.put("c", 3, 40)
    assert c.conversations() == ["a", "c"]
    assert c.stats().evictions == 1
    assert c.bytes_held == 80


def test_replacing_an_entry_does_not_double_count():
    c = ConversationCache(budget_bytes=100)
    c.put("a", 1, 60)
    c.put("a", 2, 70)
    assert c.bytes_held == 70 and len(c) == 1 and c.stats().evictions == 0


def test_state_larger_than_budget_is_rejected_and_old_state_dropped():
    c = ConversationCache(budget_bytes=50)
    c.put("a", 1, 30)
    assert not c.put("a", 2, 80)
    assert "a" not in c and c.bytes_held == 0
    assert c.stats().rejected == 1


def test_release_frees_at_once():
    c = ConversationCache(budget_bytes=100)
    c.put("a", 1, 30)
    c.put("b", 1, 30)
    assert c.release("a") is True
    assert c.release("a") is False
    assert c.bytes_held == 30 and "a" not in c
    assert c.stats().releases == 1


def test_idle_ttl_expires_with_the_clock():
    clock = Clock()
    c = ConversationCache(budget_bytes=100, idle_ttl_s=10, clock=clock)
    c.put("a", 1, 10)
    clock.t += 5
    c.put("b", 2, 10)
    clock.t += 6  # a idle 11 s, b idle 6 s
    assert c.expire() == ["a"]
    assert c.conversations() == ["b"]
    clock.t += 4.5
    assert c.get("b") is None  # idle 10.5 s
    st = c.stats()
    assert st.expirations == 2 and st.evictions == 0 and st.bytes_held == 0


def test_budget_change_at_runtime_evicts_down_at_once():
    c = ConversationCache(budget_bytes=100)
    for cid in "abcd":
        c.put(cid, cid, 25)
    assert c.set_budget(50) == ["a", "b"]
    assert c.bytes_held == 50 and c.budget_bytes == 50
    assert c.set_budget(0) == ["c", "d"]
    assert c.bytes_held == 0
    assert not c.put("e", 1, 1)


def test_from_options_accepts_the_config_section_shape():
    c = ConversationCache.from_options({"enabled": True, "budget_bytes": 1024, "idle_ttl_s": 60.0})
    assert c is not None and c.budget_bytes == 1024 and c.idle_ttl_s == 60.0
    assert ConversationCache.from_options({"enabled": False, "budget_bytes": 1}) is None
    assert ConversationCache.from_options(None) is None
    with pytest.raises(KvCacheError, match="unknown kv_cache option"):
        ConversationCache.from_options({"budget": 1})


@pytest.mark.parametrize("kwargs", [{"budget_bytes": -1}, {"budget_bytes": 1.5}, {"budget_bytes": 1, "idle_ttl_s": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(KvCacheError) as info:
        ConversationCache(**kwargs)
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------------ properties
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from("abcdef"), st.integers(0, 120)),
        st.tuples(st.just("take"), st.sampled_from("abcdef"), st.just(0)),
        st.tuples(st.just("get"), st.sampled_from("abcdef"), st.just(0)),
        st.tuples(st.just("release"), st.sampled_from("abcdef"), st.just(0)),
        st.tuples(st.just("budget"), st.just(""), st.integers(0, 200)),
        st.tuples(st.just("tick"), st.just(""), st.integers(0, 20)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(0, 200), ttl=st.one_of(st.none(), st.integers(1, 30)), script=ops)
def test_bytes_held_never_exceed_budget_and_released_hold_nothing(budget, ttl, script):
    clock = Clock()
    c = ConversationCache(budget_bytes=budget, idle_ttl_s=ttl, clock=clock)
    released: set[str] = set()
    for op, cid, n in script:
        if op == "put":
            c.put(cid, object(), n)
            released.discard(cid)
        elif op == "take":
            c.take(cid)
        elif op == "get":
            c.get(cid)
        elif op == "release":
            c.release(cid)
            released.add(cid)
        elif op == "budget":
            c.set_budget(n)
        else:
            clock.t += n
        held = [c.peek(x) for x in c.conversations()]
        assert c.bytes_held <= c.budget_bytes
        assert c.bytes_held == sum(e.nbytes for e in held)
        assert c.stats().entries == len(held)
        for cid_released in released:
            assert cid_released not in c


def test_shared_cache_keeps_per_namespace_counts_under_one_budget():
    c = ConversationCache(budget_bytes=100)
    c.record(False, namespace="llama")
    c.put("llama/a", 1, 60, namespace="llama")
    c.record(True, namespace="gpt2")
    c.put("gpt2/a", 2, 60, namespace="gpt2")  # evicts llama's conversation: one budget for both
    llama, gpt2, total = c.stats("llama"), c.stats("gpt2"), c.stats()
    assert (llama.misses, llama.evictions, llama.entries, llama.bytes_held) == (1, 1, 0, 0)
    assert (gpt2.hits, gpt2.evictions, gpt2.entries, gpt2.bytes_held) == (1, 0, 1, 60)
    assert (total.hits, total.misses, total.evictions, total.bytes_held) == (1, 1, 1, 60)
    assert c.stats("other") == CacheStats(0, 0, 0, 0, 0, budget_bytes=100)
    c.put("llama/b", 3, 20, namespace="llama")
    assert c.conversations("llama") == ["llama/b"]
    assert c.clear(namespace="gpt2") == 1
    assert c.conversations() == ["llama/b"] and c.bytes_held == 20


def test_eviction_hook_failures_do_not_break_accounting():
    seen = []

    def hook(cid, why):
        seen.append((cid, why))
        raise RuntimeError("boom")

    c = ConversationCache(budget_bytes=10, on_evict=hook)
    c.put("a", 1, 10)
    c.put("b", 1, 10)
    assert seen == [("a", "evicted")] and c.bytes_held == 10 and c.conversations() == ["b"]
