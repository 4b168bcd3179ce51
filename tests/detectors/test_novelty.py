"""The new-maximum detector: its contract, the recent span kept out of the history, the time-based warm-up."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors import Detector, DetectorConfigError, NoveltyDetector, Verdict


def quick(**kw) -> NoveltyDetector:
    # One value per second: a 400 s history in 8 slices, nothing held back unless a test says so.
    args = {"history_s": 400.0, "recent_s": 0.0, "margin": 0.5, "min_history_s": 0.0, "warmup": 100, "buckets": 8}
    return NoveltyDetector(**{**args, **kw})


def noisy(seed: int, n: int = 2000, level: float = 10.0, sd: float = 1.0) -> np.ndarray:
    return level + np.random.default_rng(seed).normal(0.0, sd, size=n)


def run(det, series, start: float = 0.0, step: float = 1.0):
    return [det.update(float(x), start + step * i) for i, x in enumerate(series)]


def fired(verdicts) -> list[int]:
    return [i for i, v in enumerate(verdicts) if v is not None and v.anomalous]


def test_satisfies_the_protocol():
    det = NoveltyDetector()
    assert isinstance(det, Detector) and det.name == "novelty"


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(min_value=-1e9, max_value=1e9), min_size=1, max_size=120))
def test_no_verdict_during_warmup_then_a_consistent_verdict(values):
    det = quick()
    for i, v in enumerate(values[: det.warmup]):
        assert det.update(v, float(i)) is None and math.isnan(det.score())
    if len(values) > det.warmup:
        v = det.update(values[det.warmup], float(det.warmup))
        assert isinstance(v, Verdict) and v.detector == det.name and v.reason
        assert v.score >= 0.0 and v.score == det.score()
        assert v.anomalous == (v.score > v.threshold)
        assert v.baseline == max(values[: det.warmup])  # the history's maximum


@pytest.mark.parametrize("level", [0.0, 0.1, -3.5, 1e-6, 2.5e9])
def test_constant_input_is_never_anomalous(level):
    verdicts = [v for v in run(quick(), [level] * 600) if v is not None]
    assert verdicts and not any(v.anomalous for v in verdicts)
    assert all(v.score == 0.0 and v.baseline == pytest.approx(level) for v in verdicts)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_an_upward_step_and_spike_are_found_a_drop_is_not(seed):
    step = noisy(seed, 800)
    step[500:] += 8.0
    verdicts = run(quick(), step)
    assert fired(verdicts[:500]) == [] and 500 in fired(verdicts)
    spike = noisy(seed, 800)
    spike[500] += 12.0
    assert fired(run(quick(), spike)) == [500]
    drop = noisy(seed, 800)
    drop[500:] -= 8.0
    assert fired(run(quick(), drop)) == []


def test_never_fires_on_in_control_noise_even_with_a_short_history():
    # The maximum of 400 Gaussian values is about 3 sigma out; beating it by half the upper range again is about a
    # 4.5-sigma event. A longer history puts the bar further out (here only the most extreme of the 50 000
    # values, 4.9 sigma, beats it).
    assert len(fired(run(quick(), noisy(10, n=50_000)))) <= 5
    assert len(fired(run(quick(history_s=5000.0, buckets=50, warmup=1000), noisy(11, n=50_000)))) <= 1


@pytest.mark.parametrize("clip", [False, True])
def test_the_recent_span_cannot_raise_its_own_bar_and_a_lasting_level_becomes_normal(clip):
    det = quick(recent_s=60.0, clip_anomalies=clip)
    series = noisy(4, 1000)
    series[500:] += 8.0
    hits = fired(run(det, series))
    # Anomalous from the step until its values are older than recent_s and in the history (clipped: until the
    # bar, raised by each clipped value, has climbed to the new level): then normal.
    assert hits[0] == 500 and len(hits) >= 40
    assert (540 <= hits[-1] < 561) if not clip else (561 <= hits[-1] < 800)
    assert not any(v.anomalous for v in run(det, noisy(5, 300) + 8.0, start=1000.0))


def test_clipped_anomalies_keep_one_huge_spike_from_masking_the_next_incident():
    series = noisy(6, 900)
    series[400] += 1000.0
    series[600:] += 10.0
    assert 600 in fired(run(quick(clip_anomalies=True), series))
    assert 600 not in fired(run(quick(clip_anomalies=False), series))


def test_no_verdict_until_the_history_covers_min_history_s():
    det = quick(history_s=7200.0, min_history_s=3600.0, buckets=24)
    verdicts = run(det, noisy(7, 800), step=10.0)  # one value per 10 s: an hour is 360 values
    first = next(i for i, v in enumerate(verdicts) if v is not None)
    assert 359 <= first <= 361 and det.warming_up is False


def test_memory_is_bounded():
    det = quick()
    series = noisy(7, n=20_000)
    run(det, series[:1000])
    early = len(pickle.dumps(det))
    run(det, series[1000:], start=1000.0)
    assert len(pickle.dumps(det)) <= early + 64
    assert det.memory <= 8 + 50 + 1


def test_non_finite_values_are_ignored_and_reset_warms_up_again():
    det = quick()
    run(det, noisy(8, n=det.warmup + 5))
    score = det.score()
    for bad in (math.nan, math.inf, -math.inf):
        assert det.update(bad, 1e6) is None
    assert det.score() == score
    det.reset()
    assert math.isnan(det.score()) and det.update(10.0, 0.0) is None


def test_time_never_runs_backwards():
    det = quick()
    run(det, noisy(9, 100))
    v = det.update(10.0, -5.0)
    assert v is not None and v.at == 99.0


@pytest.mark.parametrize("kw", [{"history_s": 0.0}, {"recent_s": -1.0}, {"margin": 0.0}, {"warmup": 0},
                                {"buckets": 1}, {"min_history_s": 500.0}, {"clip_anomalies": 1}, {"min_spread": -1.0}])
def test_bad_arguments_are_refused(kw):
    with pytest.raises(DetectorConfigError):
        quick(**kw)


def test_the_margin_can_be_in_robust_sigmas_instead_of_the_range():
    # With scale="mad" the unit is the slices' robust spread (about 1 here), not maximum - median (about 3).
    series = noisy(12, 800)
    series[600] = series[:600].max() + 2.0
    assert 600 in fired(run(quick(scale="mad", margin=1.5), series))
    assert 600 not in fired(run(quick(scale="range", margin=1.5), series))
    with pytest.raises(DetectorConfigError):
        quick(scale="iqr")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_both_directions_also_find_a_new_minimum(seed):
    drop = noisy(seed, 800)
    drop[500:] -= 8.0
    verdicts = run(quick(direction="both"), drop)
    assert fired(verdicts[:500]) == [] and 500 in fired(verdicts)
    v = verdicts[500]
    assert v.value < v.baseline and "below" in v.reason and "minimum" in v.reason
    assert v.baseline == pytest.approx(min(drop[:500]))  # the history's minimum (nothing held back here)
    dip = noisy(seed, 800)
    dip[500] -= 12.0
    assert fired(run(quick(direction="both"), dip)) == [500]
    # Rises are judged exactly as with direction "up".
    step = noisy(seed, 800)
    step[500:] += 8.0
    up, both = run(quick(), step), run(quick(direction="both"), step)
    assert fired(up) == fired(both) and 500 in fired(both)


def test_a_new_minimum_joins_the_history_clipped_to_its_bar():
    series = noisy(4, 800)
    series[500] -= 1e6
    det = quick(direction="both", history_s=10_000.0, buckets=10)
    verdicts = run(det, series)
    assert fired(verdicts) == [500]
    # The huge dip joined no lower than its bar, so the history's minimum stays near the series' own.
    assert det._min() > series[500] / 1000


def test_two_sided_never_fires_on_in_control_noise():
    assert len(fired(run(quick(direction="both"), noisy(10, n=50_000)))) <= 10
    assert len(fired(run(quick(direction="both", history_s=5000.0, buckets=50, warmup=1000), noisy(11, n=50_000)))) <= 2


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=101, max_size=160))
def test_two_sided_verdicts_name_the_extreme_they_beat(values):
    verdicts = run(quick(direction="both"), values)
    for i, v in enumerate(verdicts):
        if v is None:
            continue
        assert v.score >= 0.0 and v.anomalous == (v.score > v.threshold)
        if v.anomalous:
            assert (v.value > v.baseline) == ("above" in v.reason)


def test_direction_is_validated():
    with pytest.raises(DetectorConfigError):
        NoveltyDetector(direction="down-ish")
    assert NoveltyDetector(direction="both").direction == "both"
