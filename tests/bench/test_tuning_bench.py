"""bench/tuning.py's arithmetic: the trace, the per-phase summary and the recovery time, on hand-made results."""

from __future__ import annotations

import pytest

from bench.tuning import Phase, arrivals, summarise, trace


def test_arrivals_follow_each_phases_rate_and_repeat_with_the_seed():
    phases = [Phase("a", 100.0, 0.1), Phase("b", 100.0, 0.5, long_prompts=True)]
    plan = arrivals(phases, 100.0, seed=3)
    assert plan == arrivals(phases, 100.0, seed=3)
    a = [p for p in plan if p[1] == "a"]
    b = [p for p in plan if p[1] == "b"]
    assert len(a) == pytest.approx(1000, rel=0.1) and len(b) == pytest.approx(5000, rel=0.1)
    assert all(0 <= t < 100 and not long for t, _, long in a) and all(100 <= t < 200 and long for t, _, long in b)
    assert [p.name for p in trace(1.0)] == ["quiet", "steady", "step", "down", "long"]


def test_goodput_attainment_and_recovery_per_phase():
    phases = [Phase("steady", 10.0, 0.5), Phase("step", 10.0, 1.5), Phase("long", 10.0, 0.6, long_prompts=True)]
    results = [(float(i), "steady", 200, 0.2) for i in range(10)]
    # The step: late answers until 4 s in, then all in time; 429s count as sent, not as answered.
    results += [(10.0 + i, "step", 200, 2.0 if i < 4 else 0.3) for i in range(10)]
    results += [(10.5 + i, "step", 429, 0.001) for i in range(5)]
    results += [(20.0 + i, "long", 200, 1.5 if i % 2 else 0.5) for i in range(10)]
    s = summarise(results, phases, slo_s=1.0)
    step = s["phases"]["step"]
    assert step["sent"] == 15 and step["rejected"] == 5 and step["goodput_rps"] == 0.6
    assert step["attainment"] == 0.6 and step["recovery_s"] == 4.0
    assert s["goodput_rps"] == pytest.approx((10 + 6 + 5) / 30, abs=1e-3)
    assert s["attainment_outside_overload"] == 0.75  # steady 10/10 and long 5/10
    assert s["attainment_short_outside_overload"] == 1.0  # without the long-prompt phase
