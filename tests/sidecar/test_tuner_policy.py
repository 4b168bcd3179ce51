"""The tuner's pure policy: guardrails as properties, and the loops' behaviour on hand-made readings."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.tuner.policy import (
    BATCH_TIMEOUT,
    KV_BUDGET,
    MAX_BATCH,
    MAX_QUEUE_WAIT,
    QUEUE_CAPACITY,
    ROLLBACK,
    Bounds,
    LearnedTable,
    ModelReading,
    Observation,
    Readings,
    TunerPolicy,
    load_level,
)

BOUNDS = {
    QUEUE_CAPACITY: Bounds(4, 4096, 4.0),
    MAX_BATCH: Bounds(1, 64, 2.0),
    BATCH_TIMEOUT: Bounds(0.0, 0.05, 4.0, 0.002),
    KV_BUDGET: Bounds(16 * 2**20, 8 * 2**30, 1.5),
}
START = {QUEUE_CAPACITY: 256, MAX_BATCH: 16, BATCH_TIMEOUT: 0.005, KV_BUDGET: 256 * 2**20}


def reading(*, rps=50.0, p99=0.3, p50=0.1, attainment=1.0, waiting=0, running=8, slo=1.0, tokens=10.0, **kw):
    return ModelReading("m", slo, rps, p99_s=p99, p50_s=p50, attainment=attainment, waiting=waiting,
                        running=running, mean_input_tokens=tokens, **kw)


def readings(settings, *, rejected=0.0, evictions=0.0, mem_available=None, mem_total=None, served=math.nan, **kw):
    return Readings((reading(**kw),), dict(settings), rejected_per_s=rejected, kv_evictions_per_s=evictions,
                    memory_available_bytes=mem_available, memory_total_bytes=mem_total, served_per_s=served)


def policy(**kw):
    kw.setdefault("bounds", BOUNDS)
    return TunerPolicy(**kw)


def apply(settings, decisions):
    out = dict(settings)
    for d in decisions:
        out[d.knob] = d.new
    return out


# -- properties --------------------------------------------------------------------------------------------------

model_readings = st.builds(
    lambda rps, p99, frac, att, waiting, running, tokens: ModelReading(
        "m", 1.0, rps, p99_s=p99, p50_s=p99 * frac, attainment=att, waiting=waiting, running=running,
        mean_input_tokens=tokens),
    rps=st.floats(0, 500), p99=st.floats(0.001, 20), frac=st.floats(0.05, 1), att=st.floats(0, 1),
    waiting=st.integers(0, 2000), running=st.integers(0, 128), tokens=st.floats(1, 4000),
)
ticks = st.lists(
    st.tuples(model_readings, st.floats(0, 200), st.floats(0, 50), st.floats(0.1, 10)), min_size=1, max_size=40
)


@settings(max_examples=150, deadline=None)
@given(ticks)
def test_never_outside_bounds_and_never_past_the_step_limit(sequence):
    p = policy(cooldown_s=0.0)
    current = dict(START)
    now = 0.0
    for model, rejected, evictions, dt in sequence:
        now += dt
        result = p.tick(Readings((model,), dict(current), rejected_per_s=rejected, kv_evictions_per_s=evictions,
                                 memory_available_bytes=4e9, memory_total_bytes=16e9), now)
        assert len({d.knob for d in result.decisions}) == len(result.decisions), "one decision per knob per tick"
        for d in result.decisions:
            b = BOUNDS[d.knob]
            assert b.lo <= d.new <= b.hi, d
            low, high = b.step_range(float(d.old))
            assert low - 1e-9 <= d.new <= high + 1e-9, d
            if d.knob in (QUEUE_CAPACITY, MAX_BATCH, KV_BUDGET):
                assert isinstance(d.new, int)
            assert d.old == current[d.knob]
        current = apply(current, result.decisions)


@settings(max_examples=100, deadline=None)
@given(ticks)
def test_off_means_no_decision_ever(sequence):
    p = policy(enabled=False)
    now = 0.0
    for model, rejected, evictions, dt in sequence:
        now += dt
        result = p.tick(Readings((model,), dict(START), rejected_per_s=rejected, kv_evictions_per_s=evictions), now)
        assert result.decisions == [] and result.observation is None


@settings(max_examples=100, deadline=None)
@given(p99=st.floats(0.7001, 1.0), rps=st.floats(1, 200), queue_s=st.floats(0, 0.5), n=st.integers(1, 20))
def test_no_change_inside_the_deadband(p99, rps, queue_s, n):
    """Latency between (1 - deadband) x SLO and the SLO, a queue shorter than the budget, nothing turned away: hold."""
    waiting = min(15, int(queue_s * rps))
    bounds = {k: v for k, v in BOUNDS.items() if k != BATCH_TIMEOUT}  # the timeout follows the arrival rate
    p = policy(bounds=bounds, deadband=0.3)
    for i in range(n):
        r = readings(START, p99=p99, rps=rps, waiting=waiting, running=min(32, int(rps)))
        assert p.tick(r, float(i * 2)).decisions == []


@pytest.mark.parametrize("wanted,old", [(1000.0, 10.0), (0.0, 10.0), (7.0, 10.0)])
def test_bounds_clamp_to_one_step_and_the_limits(wanted, old):
    b = Bounds(4, 100, 2.0)
    value = b.clamp(old, wanted, integer=True)
    assert 5 <= value <= 20 and value == int(value)


def test_bounds_refuse_nonsense():
    with pytest.raises(ValueError):
        Bounds(10, 1)
    with pytest.raises(ValueError):
        Bounds(1, 10, 0.5)
    with pytest.raises(ValueError, match="unknown tuner knobs"):
        TunerPolicy(bounds={"server.port": Bounds(1, 2)})


# -- the fast loop --------------------------------------------------------------------------------------------------


def test_a_long_queue_cuts_admission_to_what_can_finish_in_time():
    """Little's law: 40 req/s, SLO 1 s, share 0.7 -> 28 inside the server at most; 256 queued take 6 s."""
    p = policy()
    current = dict(START)
    seen = []
    for i in range(6):
        r = readings(current, rps=40.0, p99=3.0, p50=2.0, attainment=0.2, waiting=224, running=32, rejected=20.0)
        result = p.tick(r, float(i * 2))
        seen += result.decisions
        current = apply(current, result.decisions)
    cuts = [d for d in seen if d.knob == QUEUE_CAPACITY]
    assert cuts and cuts[0].reason == "slo_breach" and cuts[0].new == 64  # one step: 256 / 4
    assert current[QUEUE_CAPACITY] == 28
    assert all(d.knob != MAX_BATCH or d.new >= d.old for d in seen), "a long queue is no reason to shrink the batch"


def test_admission_never_goes_below_one_batch():
    p = policy()
    current = dict(START)
    cuts = []
    for i in range(12):
        r = readings(current, rps=10.0, p99=3.0, p50=2.0, attainment=0.2, waiting=200, running=16, rejected=20.0)
        decisions = p.tick(r, float(i * 2)).decisions
        batch = next((d.new for d in decisions if d.knob == MAX_BATCH), current[MAX_BATCH])
        cuts += [(d.new, batch) for d in decisions if d.knob == QUEUE_CAPACITY and d.new < d.old]
        current = apply(current, decisions)
    assert cuts and all(new >= batch for new, batch in cuts)  # Little's target is 7; a batch is 16, then 8


def test_a_slow_batch_with_a_short_queue_is_halved_and_judged_like_any_gain():
    p = policy(bounds={MAX_BATCH: BOUNDS[MAX_BATCH]}, trial_s=12.0)
    current = {MAX_BATCH: 16}
    # 20/s x 1 s x 0.7 = 14 can be inside and finish in time: a batch of 16 is slower than the objective by itself.
    first = p.tick(readings(current, rps=20.0, p99=1.6, p50=0.8, attainment=0.5, waiting=4, running=20), 0.0)
    assert [(d.knob, d.new, d.reason) for d in first.decisions] == [(MAX_BATCH, 8, "slo_breach")]
    current = apply(current, first.decisions)
    better = p.tick(readings(current, rps=20.0, p99=0.6, p50=0.4, attainment=1.0, waiting=2, running=8), 12.0)
    assert [d for d in better.decisions if d.reason == ROLLBACK] == []


def test_a_breach_with_a_short_queue_turns_nobody_away():
    p = policy()
    r = readings(START, rps=40.0, p99=1.5, p50=0.9, attainment=0.9, waiting=2, running=16)
    assert [d for d in p.tick(r, 0.0).decisions if d.knob == QUEUE_CAPACITY] == []


def test_rejecting_with_headroom_admits_more():
    p = policy()
    current = {**START, QUEUE_CAPACITY: 24}
    result = p.tick(readings(current, rps=30.0, p99=0.2, p50=0.1, waiting=4, running=16, rejected=5.0), 0.0)
    [d] = [d for d in result.decisions if d.knob == QUEUE_CAPACITY]
    assert d.reason == "headroom" and d.new == 36


def test_full_batches_with_headroom_grow_the_batch():
    p = policy()
    result = p.tick(readings(START, rps=100.0, p99=0.3, waiting=40, running=32), 0.0)
    [d] = [d for d in result.decisions if d.knob == MAX_BATCH]
    assert (d.old, d.new, d.reason, d.source) == (16, 32, "headroom", "tuned")


def test_the_batch_timeout_is_half_a_batch_of_arrivals_capped_by_the_slo():
    bounds = {BATCH_TIMEOUT: BOUNDS[BATCH_TIMEOUT]}
    # 100 req/s, batch 16: 7 more requests take 70 ms, capped at 5% of the 1 s SLO; one step (x4) from 5 ms.
    up = policy(bounds=bounds).tick(readings({MAX_BATCH: 16, BATCH_TIMEOUT: 0.005}, rps=100.0), 0.0).decisions
    assert [(d.knob, round(d.new, 4), d.reason) for d in up] == [(BATCH_TIMEOUT, 0.02, "batch_window")]
    # 10 req/s and a 0.2 s SLO: capped at 10 ms, reached in one step down from 40 ms.
    down = policy(bounds=bounds).tick(
        readings({MAX_BATCH: 16, BATCH_TIMEOUT: 0.04}, rps=10.0, p99=0.1, slo=0.2), 0.0).decisions
    assert [(d.knob, round(d.new, 4)) for d in down] == [(BATCH_TIMEOUT, 0.01)]
    # Close to where it should be: hysteresis keeps it.
    hold = policy(bounds=bounds).tick(readings({MAX_BATCH: 16, BATCH_TIMEOUT: 0.045}, rps=100.0), 0.0).decisions
    assert hold == []


def test_kv_budget_grows_on_evictions_and_shrinks_under_memory_pressure():
    bounds = {KV_BUDGET: BOUNDS[KV_BUDGET]}
    grow = policy(bounds=bounds).tick(readings(START, evictions=3.0, mem_available=8e9, mem_total=16e9), 0.0).decisions
    assert [(d.reason, d.new) for d in grow] == [("cache_evictions", 384 * 2**20)]
    shrink = policy(bounds=bounds).tick(readings(START, evictions=3.0, mem_available=1e9, mem_total=16e9), 0.0).decisions
    assert [d.reason for d in shrink] == ["memory_pressure"]
    assert START[KV_BUDGET] / 1.5 <= shrink[0].new < START[KV_BUDGET]
    calm = policy(bounds=bounds).tick(readings(START, evictions=0.0, mem_available=8e9, mem_total=16e9), 0.0).decisions
    assert calm == []


# -- guardrails over time ---------------------------------------------------------------------------------------------


def test_a_change_that_lowered_goodput_is_rolled_back_and_not_tried_again():
    p = policy(bounds={MAX_BATCH: BOUNDS[MAX_BATCH]}, trial_s=8.0, cooldown_s=0.0)
    current = {MAX_BATCH: 16}
    first = p.tick(readings(current, rps=100.0, p99=0.3, waiting=40, running=32), 0.0).decisions
    assert [(d.knob, d.new) for d in first] == [(MAX_BATCH, 32)]
    current = apply(current, first)
    during = p.tick(readings(current, rps=100.0, p99=0.3, waiting=40, running=32), 4.0).decisions
    assert during == [], "one experiment at a time"
    # The trial ends: same load level, but only 60% of what was offered met the SLO (it was 100%).
    worse = p.tick(readings(current, rps=100.0, p99=0.9, attainment=0.6, waiting=40, running=32), 8.0).decisions
    assert [(d.knob, d.old, d.new, d.reason, d.source) for d in worse] == [(MAX_BATCH, 32, 16, ROLLBACK, ROLLBACK)]
    current = apply(current, worse)
    for t in (10.0, 20.0, 30.0):
        again = p.tick(readings(current, rps=100.0, p99=0.3, waiting=40, running=32), t).decisions
        assert [d for d in again if d.knob == MAX_BATCH and d.new > d.old] == [], "the move is barred at this level"


def test_a_change_that_held_goodput_stays():
    p = policy(bounds={MAX_BATCH: BOUNDS[MAX_BATCH]}, trial_s=8.0)
    current = apply({MAX_BATCH: 16}, p.tick(readings({MAX_BATCH: 16}, rps=100.0, waiting=40, running=32), 0.0).decisions)
    assert p.tick(readings(current, rps=100.0, p99=0.3, waiting=0, running=20), 8.0).decisions == []
    assert current[MAX_BATCH] == 32 and p.sources[MAX_BATCH] == "tuned"


def test_cooldown_spaces_changes_made_to_gain():
    p = policy(bounds={MAX_BATCH: BOUNDS[MAX_BATCH]}, trial_s=0.0, cooldown_s=10.0)
    current = {MAX_BATCH: 4}
    times = []
    for t in range(0, 30, 2):
        decisions = p.tick(readings(current, rps=100.0, p99=0.2, waiting=100, running=8), float(t)).decisions
        current = apply(current, decisions)
        times += [t for d in decisions if d.knob == MAX_BATCH]
    assert times == [0, 10, 20]


# -- the slow loop ------------------------------------------------------------------------------------------------


def test_learned_table_prefers_goodput_among_settings_that_met_the_target():
    table = LearnedTable(min_samples=2, attainment_target=0.99)
    for goodput, attainment, batch in [(50, 1.0, 16), (52, 1.0, 16), (70, 0.9, 64), (70, 0.9, 64), (60, 1.0, 32),
                                       (61, 1.0, 32), (90, 1.0, 8)]:
        table.observe(Observation(0.0, "L", {MAX_BATCH: batch}, goodput, attainment, 100.0))
    best, goodput, attainment = table.best("L")
    assert best == {MAX_BATCH: 32} and goodput == pytest.approx(60.5) and attainment == 1.0  # batch 8: one sample
    assert table.best("other") is None


def test_load_levels_bucket_rate_and_prompt_length():
    quiet = load_level(readings(START, rps=0.0, tokens=math.nan))
    assert quiet == "rps2^idle/tok2^-"
    assert load_level(readings(START, rps=64.0, tokens=10)) == load_level(readings(START, rps=70.0, tokens=11))
    assert load_level(readings(START, rps=64.0, tokens=10)) != load_level(readings(START, rps=64.0, tokens=300))
    assert load_level(readings(START, rps=32.0)) != load_level(readings(START, rps=64.0))


def test_a_warm_table_moves_straight_to_what_worked_at_this_level():
    # What is seen now falls short of the target, so the table's entry stays the best one at this level.
    level_readings = dict(rps=100.0, p99=0.5, attainment=0.95, waiting=3, running=16)
    table = LearnedTable(min_samples=3)
    level = load_level(readings(START, **level_readings))
    good = {**START, QUEUE_CAPACITY: 48, MAX_BATCH: 32}
    for _ in range(5):
        table.observe(Observation(0.0, level, good, 98.0, 1.0, 100.0))
    p = policy(learned=table, learn_confirm_ticks=2)
    current = dict(START)
    first = p.tick(readings(current, **level_readings), 0.0).decisions
    assert [d for d in first if d.source == "learned"] == [], "a level is confirmed over two ticks"
    current = apply(current, first)
    decisions = []
    for t in (2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0):
        out = p.tick(readings(current, **level_readings), t).decisions
        decisions += out
        current = apply(current, out)
    learned = [d for d in decisions if d.source == "learned"]
    assert learned and {d.reason for d in learned} == {"learned"}
    assert current[QUEUE_CAPACITY] == 48 and current[MAX_BATCH] == 32


def test_observations_credit_settings_only_once_they_have_been_in_place():
    p = policy(bounds={MAX_BATCH: BOUNDS[MAX_BATCH]}, trial_s=8.0)
    first = p.tick(readings({MAX_BATCH: 16}, rps=100.0, waiting=40, running=32), 0.0)
    assert first.observation is not None and first.decisions
    current = apply({MAX_BATCH: 16}, first.decisions)
    assert p.tick(readings(current, rps=100.0, waiting=0, running=20), 2.0).observation is None
    assert p.tick(readings(current, rps=100.0, waiting=0, running=20), 9.0).observation is not None


def test_a_full_gpu_is_memory_pressure_too():
    p = policy(bounds={KV_BUDGET: BOUNDS[KV_BUDGET]})
    full = Readings((reading(),), dict(START), gpu_memory_used_ratio=0.95)
    assert [d.reason for d in p.tick(full, 0.0).decisions] == ["memory_pressure"]
    roomy = Readings((reading(),), dict(START), kv_evictions_per_s=2.0, gpu_memory_used_ratio=0.5)
    assert [d.reason for d in policy(bounds={KV_BUDGET: BOUNDS[KV_BUDGET]}).tick(roomy, 0.0).decisions] == [
        "cache_evictions"]


def test_a_smaller_batch_that_cured_nothing_is_rolled_back_and_the_batch_cannot_walk_down_to_one():
    """A breach with another cause (a starved CPU): halving the batch does not bring p99 down, so it is undone."""
    p = policy(bounds={MAX_BATCH: BOUNDS[MAX_BATCH]}, trial_s=12.0, cooldown_s=0.0)
    current = {MAX_BATCH: 16}
    seen = []
    for t in range(0, 200, 2):
        r = readings(current, rps=20.0, p99=2.0, p50=1.2, attainment=0.4, waiting=2, running=2 * current[MAX_BATCH])
        decisions = p.tick(r, float(t)).decisions
        seen += decisions
        current = apply(current, decisions)
    assert [d.reason for d in seen][:2] == ["slo_breach", ROLLBACK]
    assert min(d.new for d in seen) == 8 and current[MAX_BATCH] == 16


def test_no_shrink_while_batches_are_not_full():
    p = policy(bounds={MAX_BATCH: BOUNDS[MAX_BATCH]})
    r = readings({MAX_BATCH: 16}, rps=5.0, p99=2.0, p50=1.5, attainment=0.3, waiting=0, running=3)
    assert p.tick(r, 0.0).decisions == []


# -- fresh readings: the windows lag behind the server ------------------------------------------------------------


def test_admission_is_cut_to_what_the_server_serves_now_not_to_the_lagging_window():
    """A burst began: the window still averages the quiet seconds before it (85/s), the orchestrator's own count says
    the saturated server now finishes 140/s. Little's law on that: 140 x 1 s x 0.7 = 98, not 85 x 0.7 = 59."""
    p = policy(bounds={QUEUE_CAPACITY: BOUNDS[QUEUE_CAPACITY]})
    r = readings({QUEUE_CAPACITY: 256}, rps=85.0, p99=0.3, waiting=180, running=32, served=140.0)
    [d] = p.tick(r, 0.0).decisions
    assert (d.knob, d.new, d.reason) == (QUEUE_CAPACITY, 98, "queue_wait")
    # Without the fresh count the window's rate is all there is.
    [d] = policy(bounds={QUEUE_CAPACITY: BOUNDS[QUEUE_CAPACITY]}).tick(
        readings({QUEUE_CAPACITY: 256}, rps=85.0, p99=0.3, waiting=180, running=32), 0.0).decisions
    assert d.new == 64  # one step (x4) towards 59


def test_a_growing_queue_is_cut_before_its_wait_reaches_the_budget():
    """40 waiting at 100/s is 0.4 s of queue, inside the 0.7 s budget; but it grew by 35 in one tick, so by the next
    it is past it. The cut comes now, while p99 is still fine, not after the window shows the breach."""
    p = policy(bounds={QUEUE_CAPACITY: BOUNDS[QUEUE_CAPACITY]})
    current = {QUEUE_CAPACITY: 256}
    assert p.tick(readings(current, rps=100.0, p99=0.3, waiting=5, running=32, served=100.0), 0.0).decisions == []
    [d] = p.tick(readings(current, rps=100.0, p99=0.3, waiting=40, running=32, served=100.0), 2.0).decisions
    assert (d.knob, d.reason, d.new) == (QUEUE_CAPACITY, "queue_wait", 70)
    # The same queue, not growing, is left alone.
    steady = policy(bounds={QUEUE_CAPACITY: BOUNDS[QUEUE_CAPACITY]})
    for t in (0.0, 2.0, 4.0):
        assert steady.tick(readings(current, rps=100.0, p99=0.3, waiting=40, running=32, served=100.0), t).decisions == []


def test_batch_timeout_moves_open_no_trial_and_block_no_gain():
    """The timeout follows the arrival rate: a derived value, like Little's law admission. A batch that fills from
    the queue can grow on the next tick instead of waiting out a trial of the timeout."""
    p = policy(bounds={MAX_BATCH: BOUNDS[MAX_BATCH], BATCH_TIMEOUT: BOUNDS[BATCH_TIMEOUT]}, trial_s=12.0)
    current = {MAX_BATCH: 16, BATCH_TIMEOUT: 0.005}
    first = p.tick(readings(current, rps=100.0, p99=0.3, waiting=0, running=10), 0.0).decisions
    assert [d.knob for d in first] == [BATCH_TIMEOUT]
    current = apply(current, first)
    second = p.tick(readings(current, rps=100.0, p99=0.3, waiting=40, running=32), 2.0).decisions
    assert [(d.knob, d.new) for d in second] == [(MAX_BATCH, 32)]


def test_no_smaller_batch_for_a_breach_the_window_still_holds_from_a_cut_queue():
    """Admission was cut and the queue is short now, but the window's latencies are those of requests that sat in
    the long queue. The batch itself fits Little's law (40/s x 1 s x 0.7 = 28 >= 16): a smaller one would cure
    nothing and cost throughput, so it stays, however long the breach shows."""
    p = policy(bounds={MAX_BATCH: BOUNDS[MAX_BATCH]}, trial_s=12.0, cooldown_s=0.0)
    current = {MAX_BATCH: 16}
    p.tick(readings(current, rps=40.0, p99=3.0, p50=2.0, attainment=0.3, waiting=200, running=32, served=40.0), 0.0)
    for t in (2.0, 6.0, 10.0, 14.0, 30.0):
        r = readings(current, rps=40.0, p99=3.0, p50=2.0, attainment=0.3, waiting=0, running=20, served=40.0)
        assert [d for d in p.tick(r, t).decisions if d.knob == MAX_BATCH] == []


def test_a_batch_larger_than_littles_law_admits_is_halved_before_the_breach_shows():
    """Prompts grew longer: the saturated server now finishes 40/s, so 28 can be inside and finish within 1 s, yet
    a batch is 32. The windows still show short prompts' latencies; the fresh count is enough to act on."""
    p = policy(bounds={MAX_BATCH: BOUNDS[MAX_BATCH]})
    r = readings({MAX_BATCH: 32}, rps=85.0, p99=0.3, p50=0.1, waiting=20, running=64, served=40.0)
    [d] = p.tick(r, 0.0).decisions
    assert (d.knob, d.new) == (MAX_BATCH, 16)


def test_the_batch_grows_only_while_the_doubled_batch_fits_littles_law():
    p = policy(bounds={MAX_BATCH: BOUNDS[MAX_BATCH]})
    # 50/s x 1 s x 0.7 = 35 inside at once: a batch of 32 fits, one of 64 does not.
    grow = p.tick(readings({MAX_BATCH: 16}, rps=50.0, p99=0.3, waiting=40, running=32), 0.0).decisions
    assert [(d.knob, d.new) for d in grow] == [(MAX_BATCH, 32)]
    hold = policy(bounds={MAX_BATCH: BOUNDS[MAX_BATCH]}).tick(
        readings({MAX_BATCH: 32}, rps=50.0, p99=0.3, waiting=40, running=64), 0.0).decisions
    assert hold == []


def test_an_overload_late_in_the_queue_trials_a_bigger_batch_and_one_late_in_the_engine_does_not():
    """1.5 times capacity under a wait bound: the requests finishing now are near the objective, but they spent it
    waiting; the engine layer's share is 32 running at 260/s = 0.12 s, doubled 0.25 s, inside the 0.3 deadband."""
    bounds = {MAX_BATCH: BOUNDS[MAX_BATCH], MAX_QUEUE_WAIT: WAIT_BOUNDS[MAX_QUEUE_WAIT]}
    settings = {MAX_BATCH: 16, MAX_QUEUE_WAIT: 0.4}
    overload = dict(rps=260.0, p99=0.6, waiting=100, running=32, rejected=130.0, served=260.0, fresh_requests=500.0,
                    fresh_p99_s=0.8, fresh_attainment=1.0, fresh_queue_p99_s=0.45)
    [d] = [d for d in policy(bounds=bounds).tick(readings(settings, **overload), 0.0).decisions if d.knob == MAX_BATCH]
    assert (d.old, d.new, d.reason) == (16, 32, "queue_wait")
    # The time went past the queue (long prompts: 32 running at 60/s is 0.53 s of the engine's own): no bigger batch.
    engine_bound = {**overload, "rps": 60.0, "served": 60.0, "fresh_queue_p99_s": 0.3}
    assert all(d.knob != MAX_BATCH for d in policy(bounds=bounds).tick(readings(settings, **engine_bound), 0.0).decisions)
    # Nobody turned away: not an overload, and the fresh tail past the deadband still bars the experiment.
    calm = {**overload, "rejected": 0.0}
    assert all(d.knob != MAX_BATCH for d in policy(bounds=bounds).tick(readings(settings, **calm), 0.0).decisions)


def test_the_tick_that_bounds_a_slow_queue_also_trials_a_bigger_batch_and_only_the_batch_is_rolled_back():
    bounds = {MAX_BATCH: BOUNDS[MAX_BATCH], MAX_QUEUE_WAIT: WAIT_BOUNDS[MAX_QUEUE_WAIT],
              QUEUE_CAPACITY: BOUNDS[QUEUE_CAPACITY]}
    p = policy(bounds=bounds, trial_s=12.0)
    settings = {QUEUE_CAPACITY: 256, MAX_BATCH: 16, MAX_QUEUE_WAIT: None}
    # Nobody turned away yet, but 300 waiting at 260/s is 1.15 s of queue: the burst has begun.
    burst = dict(rps=260.0, p99=0.5, waiting=300, running=32, served=260.0, fresh_requests=500.0, fresh_p99_s=0.9,
                 fresh_attainment=1.0, fresh_queue_p99_s=0.6)
    decisions = p.tick(readings(settings, **burst), 0.0).decisions
    assert {(d.knob, d.reason) for d in decisions} == {(MAX_QUEUE_WAIT, "queue_wait"), (MAX_BATCH, "queue_wait")}
    settings = apply(settings, decisions)
    assert settings[MAX_BATCH] == 32
    # Twelve seconds on, at the same load, attainment fell: the batch goes back, the bound stays.
    worse = p.tick(readings(settings, **{**burst, "attainment": 0.5}), 12.0).decisions
    assert [(d.knob, d.new, d.reason) for d in worse] == [(MAX_BATCH, 16, "rollback")]


def test_admission_grows_only_with_room_inside_the_server_now():
    """Turned away with latency to spare in the window, but what is inside already takes 2 s to serve (Little): the
    window is stale, so no more is let in."""
    p = policy(bounds={QUEUE_CAPACITY: BOUNDS[QUEUE_CAPACITY]})
    full = readings({QUEUE_CAPACITY: 24}, rps=12.0, p99=0.2, p50=0.1, waiting=8, running=16, rejected=5.0)
    assert p.tick(full, 0.0).decisions == []
    roomy = readings({QUEUE_CAPACITY: 24}, rps=60.0, p99=0.2, p50=0.1, waiting=4, running=16, rejected=5.0)
    assert [d.reason for d in policy(bounds={QUEUE_CAPACITY: BOUNDS[QUEUE_CAPACITY]}).tick(roomy, 0.0).decisions] == [
        "headroom"]


def test_learned_settings_never_open_admission_past_littles_law():
    """A queue of 256 met the objective at 100/s because no burst came; going back to it would let the next one in."""
    level_readings = dict(rps=100.0, p99=0.3, waiting=0, running=12)
    level = load_level(readings(START, **level_readings))
    table = LearnedTable(min_samples=3)
    for _ in range(5):
        table.observe(Observation(0.0, level, {QUEUE_CAPACITY: 256}, 100.0, 1.0, 100.0))
    p = policy(bounds={QUEUE_CAPACITY: BOUNDS[QUEUE_CAPACITY]}, learned=table)
    current = {QUEUE_CAPACITY: 48}
    seen = []
    for t in (0.0, 2.0, 4.0, 6.0):
        out = p.tick(readings(current, **level_readings), t).decisions
        seen += out
        current = apply(current, out)
    assert [d.source for d in seen] == ["learned"] and current[QUEUE_CAPACITY] == 70  # 100 x 1 s x 0.7


# -- admission by waiting time (server.max_queue_wait_s) ------------------------------------------------------------

WAIT_BOUNDS = {**BOUNDS, MAX_QUEUE_WAIT: Bounds(0.01, 60.0, 2.0, 0.01)}
WAIT_START = {**START, MAX_QUEUE_WAIT: None}

fresh_model_readings = st.builds(
    lambda rps, p99, att, waiting, running, n, fresh_p99, fresh_att: ModelReading(
        "m", 1.0, rps, p99_s=p99, p50_s=p99 / 2, attainment=att, waiting=waiting, running=running,
        mean_input_tokens=10.0, fresh_requests=n, fresh_p99_s=fresh_p99, fresh_attainment=fresh_att),
    rps=st.floats(0, 500), p99=st.floats(0.001, 20), att=st.floats(0, 1), waiting=st.integers(0, 2000),
    running=st.integers(0, 128), n=st.floats(0, 1000), fresh_p99=st.floats(0.001, 20), fresh_att=st.floats(0, 1),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(fresh_model_readings, st.floats(0, 200), st.floats(0.1, 10)), min_size=1, max_size=40),
       st.sampled_from([None, 0.05, 0.7, 5.0]))
def test_the_wait_bound_stays_inside_its_bounds_and_its_step_limit(sequence, start):
    p = policy(bounds=WAIT_BOUNDS, cooldown_s=0.0)
    current = {**WAIT_START, MAX_QUEUE_WAIT: start}
    now = 0.0
    for model, rejected, dt in sequence:
        now += dt
        result = p.tick(Readings((model,), dict(current), rejected_per_s=rejected), now)
        for d in result.decisions:
            b = WAIT_BOUNDS[d.knob]
            assert b.lo <= d.new <= b.hi and d.old == current[d.knob], d
            if d.old is not None:
                low, high = b.step_range(float(d.old))
                assert low - 1e-9 <= d.new <= high + 1e-9, d
        current = apply(current, result.decisions)
    off = policy(bounds=WAIT_BOUNDS, enabled=False)
    assert all(off.tick(Readings((m,), dict(WAIT_START), rejected_per_s=r), float(i)).decisions == []
               for i, (m, r, _) in enumerate(sequence))


def test_a_slow_queue_sets_the_wait_bound_to_what_the_engine_leaves_of_the_share_and_cuts_no_capacity():
    """Share 0.7 x SLO 1 s, less the engine layer's time by Little's law: 8 running at 40 req/s is 0.2 s."""
    p = policy(bounds=WAIT_BOUNDS)
    r = readings(WAIT_START, rps=40.0, p99=3.0, p50=2.0, attainment=0.2, waiting=224, running=8, rejected=20.0)
    decisions = p.tick(r, 0.0).decisions
    [bound] = [d for d in decisions if d.knob == MAX_QUEUE_WAIT]
    assert (bound.old, bound.reason) == (None, "slo_breach") and bound.new == pytest.approx(0.5)
    assert all(d.knob != QUEUE_CAPACITY for d in decisions)
    quiet = policy(bounds=WAIT_BOUNDS)
    assert all(d.knob != MAX_QUEUE_WAIT for d in quiet.tick(readings(WAIT_START, rps=40.0, p99=0.2), 0.0).decisions)


def test_late_requests_finishing_now_tighten_the_bound_in_proportion_while_requests_wait():
    p = policy(bounds=WAIT_BOUNDS, cooldown_s=4.0)
    current = {**WAIT_START, MAX_QUEUE_WAIT: 0.7}
    late = dict(rps=100.0, p99=0.5, waiting=40, running=10, fresh_requests=200.0, fresh_p99_s=1.25,
                fresh_attainment=0.9)
    [d] = [d for d in p.tick(readings(current, **late), 0.0).decisions if d.knob == MAX_QUEUE_WAIT]
    # The window still looks fine: fresh says late, by 0.25 s, which comes off the bound.
    assert d.reason == "slo_breach" and d.new == pytest.approx(0.7 - 0.25)
    current = apply(current, [d])
    assert all(x.knob != MAX_QUEUE_WAIT for x in p.tick(readings(current, **late), 2.0).decisions), "cooldown"
    worse = {**late, "fresh_p99_s": 4.0}
    [d] = [d for d in p.tick(readings(current, **worse), 4.0).decisions if d.knob == MAX_QUEUE_WAIT]
    assert d.new == pytest.approx(0.45 * 0.5)  # never more than half at once
    # A tail a few percent over: a tenth comes off, not the overshoot alone (the bound must still move).
    near = policy(bounds=WAIT_BOUNDS)
    [d] = [d for d in near.tick(readings({**WAIT_START, MAX_QUEUE_WAIT: 0.5}, **{**late, "fresh_p99_s": 1.03}),
                                0.0).decisions if d.knob == MAX_QUEUE_WAIT]
    assert d.new == pytest.approx(0.45)
    # Late with no queue and nobody turned away: the engine's own time, not admission's.
    idle = policy(bounds=WAIT_BOUNDS)
    assert all(x.knob != MAX_QUEUE_WAIT
               for x in idle.tick(readings(current, **{**late, "waiting": 0}), 0.0).decisions)
    # Late, but the queue waited far less than the bound: the time went elsewhere (a starved CPU).
    elsewhere = policy(bounds=WAIT_BOUNDS)
    assert all(x.knob != MAX_QUEUE_WAIT
               for x in elsewhere.tick(readings(current, **{**late, "fresh_queue_p99_s": 0.1}), 0.0).decisions)
    binding = policy(bounds=WAIT_BOUNDS)
    assert any(x.knob == MAX_QUEUE_WAIT
               for x in binding.tick(readings(current, **{**late, "fresh_queue_p99_s": 0.5}), 0.0).decisions)
    # Too few requests since the last tick to say anything.
    few = policy(bounds=WAIT_BOUNDS)
    assert all(x.knob != MAX_QUEUE_WAIT
               for x in few.tick(readings(current, **{**late, "fresh_requests": 5.0}), 0.0).decisions)


def test_a_bound_that_turns_requests_away_with_latency_to_spare_loosens_up_to_the_share_and_opens_no_trial():
    p = policy(bounds=WAIT_BOUNDS, cooldown_s=0.0)
    current = {**WAIT_START, MAX_QUEUE_WAIT: 0.4}
    spare = dict(rps=100.0, p99=0.3, waiting=10, running=16, rejected=30.0, fresh_requests=200.0,
                 fresh_p99_s=0.4, fresh_attainment=1.0)
    values = []
    for i in range(8):
        decisions = p.tick(readings(current, **spare), float(i * 2)).decisions
        values += [d.new for d in decisions if d.knob == MAX_QUEUE_WAIT]
        current = apply(current, decisions)
    assert values == [pytest.approx(0.5), pytest.approx(0.625), pytest.approx(0.7)]  # a quarter a tick, to the share
    assert current[MAX_QUEUE_WAIT] == pytest.approx(0.7)
    # While the bound is what turns requests away, the capacity (far from full) does not grow.
    assert current[QUEUE_CAPACITY] == START[QUEUE_CAPACITY]


def test_late_while_the_engine_holds_requests_longer_cuts_the_bound_to_what_is_left_at_once():
    p = policy(bounds=WAIT_BOUNDS)
    current = {**WAIT_START, MAX_QUEUE_WAIT: 0.6}
    # A bigger batch: 40 inside the engine layer at 100 req/s is 0.4 s of the 0.7 s share, and the tail is a little
    # late: the cut goes to the 0.3 s left, not just the fifth the overshoot alone would take.
    grown = dict(rps=100.0, p99=0.5, waiting=30, running=40, fresh_requests=200.0, fresh_p99_s=1.05,
                 fresh_attainment=0.97)
    [d] = [d for d in p.tick(readings(current, **grown), 0.0).decisions if d.knob == MAX_QUEUE_WAIT]
    assert d.reason == "slo_breach" and d.new == pytest.approx(0.3)
    # In time, the same share leaves the bound alone: a bound that binds only when it must.
    calm = policy(bounds=WAIT_BOUNDS)
    assert all(x.knob != MAX_QUEUE_WAIT for x in calm.tick(
        readings(current, **{**grown, "fresh_p99_s": 0.6, "fresh_attainment": 1.0}), 0.0).decisions)


def test_a_warm_table_sets_the_wait_bound_that_worked_here_even_while_it_is_off():
    level_readings = dict(rps=100.0, p99=0.5, attainment=0.95, waiting=3, running=16)
    table = LearnedTable(min_samples=3)
    level = load_level(readings(WAIT_START, **level_readings))
    for _ in range(5):
        table.observe(Observation(0.0, level, {**WAIT_START, MAX_QUEUE_WAIT: 0.4}, 98.0, 1.0, 100.0))
    p = policy(bounds=WAIT_BOUNDS, learned=table, learn_confirm_ticks=2)
    current = dict(WAIT_START)
    decisions = []
    for t in (0.0, 2.0, 4.0):
        out = p.tick(readings(current, **level_readings), t).decisions
        decisions += out
        current = apply(current, out)
    [d] = [d for d in decisions if d.knob == MAX_QUEUE_WAIT]
    assert (d.old, d.new, d.source) == (None, 0.4, "learned")


def test_no_experiment_while_the_requests_finishing_now_are_late_whatever_the_window_says():
    """Full batches from the queue and requests turned away would try a bigger batch, unless the fresh tail is late."""
    setting = {**START, MAX_BATCH: 16}
    saturated = dict(rps=200.0, p99=0.3, waiting=64, running=32, rejected=50.0)
    grows = policy().tick(readings(setting, **saturated), 0.0).decisions
    assert any(d.knob == MAX_BATCH and d.new == 32 for d in grows)
    late = policy().tick(readings(setting, **saturated, fresh_requests=300.0, fresh_p99_s=0.95,
                                  fresh_attainment=0.99), 0.0).decisions
    assert all(d.knob != MAX_BATCH for d in late) and all(d.knob != QUEUE_CAPACITY or d.new < d.old for d in late)
