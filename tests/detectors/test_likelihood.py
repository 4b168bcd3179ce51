"""The anomaly-likelihood detector: warm-up, verdicts that follow the series' own residuals, bounded memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors import Detector, DetectorConfigError, LikelihoodDetector, Verdict


def noisy(seed: int, n: int, level: float = 10.0, sd: float = 1.0) -> np.ndarray:
    return level + np.random.default_rng(seed).normal(0.0, sd, size=n)


def feed(det, series, start: int = 0) -> list[Verdict | None]:
    return [det.update(float(x), float(start + i)) for i, x in enumerate(series)]


def alarms(verdicts) -> list[int]:
    return [i for i, v in enumerate(verdicts) if v is not None and v.anomalous]


def small(**kw) -> LikelihoodDetector:
    return LikelihoodDetector(**{"window": 100, "warmup": 150, "history": 500, **kw})


def test_satisfies_the_protocol():
    det = LikelihoodDetector()
    assert isinstance(det, Detector)
    assert det.name == "likelihood"


def test_no_verdict_during_warmup_then_one_per_value():
    det = small()
    verdicts = feed(det, noisy(0, 400))
    assert all(v is None for v in verdicts[: det.warmup])
    assert all(isinstance(v, Verdict) for v in verdicts[det.warmup :])
    first = verdicts[det.warmup]
    assert first.at == float(det.warmup) and first.detector == "likelihood" and first.reason
    assert 0.0 <= first.score <= 1.0 and first.threshold == pytest.approx(1 - det.epsilon)
    assert first.score == pytest.approx(feed(small(), noisy(0, 400))[det.warmup].score)


def test_score_is_nan_while_warming_up():
    det = small()
    feed(det, noisy(1, det.warmup - 1))
    assert math.isnan(det.score()) and det.warming_up


def test_non_finite_values_are_ignored():
    det = small()
    feed(det, noisy(2, 200))
    before = det.score()
    assert det.update(math.nan, 1e6) is None and det.update(math.inf, 1e6) is None
    assert det.score() == before


@pytest.mark.parametrize("level", [0.0, 1.0, -3.5, 2.5e9])
def test_constant_input_is_never_anomalous(level):
    verdicts = [v for v in feed(small(), [level] * 800) if v is not None]
    assert verdicts and not any(v.anomalous for v in verdicts)
    assert all(v.baseline == pytest.approx(level) for v in verdicts)


@pytest.mark.parametrize("seed", range(4))
def test_quiet_on_stationary_noise(seed):
    verdicts = feed(small(), noisy(seed, 5000))
    judged = [v for v in verdicts if v is not None]
    assert sum(v.anomalous for v in judged) / len(judged) < 0.002


@pytest.mark.parametrize("seed", range(4))
def test_a_lasting_rise_is_found_within_a_few_values(seed):
    series = noisy(seed, 1200)
    series[1000:] += 4.0
    hits = [i for i in alarms(feed(small(), series)) if i >= 1000]
    assert hits and hits[0] - 1000 <= 5


def test_a_single_spike_moves_the_average_too_little():
    series = noisy(5, 1200)
    series[1000] += 6.0
    assert not [i for i in alarms(feed(small(), series)) if i >= 1000]


def test_a_lasting_shift_stops_scoring_once_it_is_the_median():
    series = noisy(6, 1600)
    series[1000:] += 4.0
    hits = [i for i in alarms(feed(small(), series)) if i >= 1000]
    assert hits and max(hits) < 1000 + 100  # gone within one median window


def test_a_series_that_is_always_noisy_raises_its_own_bar():
    # Heavy-tailed noise: a fixed z band would page all day, the likelihood learns that such residuals are usual.
    rng = np.random.default_rng(7)
    series = 10.0 + rng.standard_t(2, size=6000)
    judged = [v for v in feed(small(), series) if v is not None]
    assert sum(v.anomalous for v in judged) / len(judged) < 0.005


def test_direction_up_ignores_drops():
    series = noisy(8, 1200)
    series[1000:1050] -= 6.0
    assert not alarms(feed(small(direction="up"), series))
    assert [i for i in alarms(feed(small(direction="both"), series)) if 1000 <= i < 1050]


def test_memory_is_bounded_by_the_configuration():
    det = small()
    feed(det, noisy(9, 20_000))
    assert det.memory <= 100 + 500 + 10


def test_reset_warms_up_again():
    det = small()
    feed(det, noisy(10, 400))
    det.reset()
    assert det.update(10.0, 0.0) is None and math.isnan(det.score())


@pytest.mark.parametrize(
    "kw",
    [{"window": 2}, {"epsilon": 0.0}, {"epsilon": 0.5}, {"scale": 0.0}, {"direction": "sideways"},
     {"warmup": 35, "baseline_warmup": 30, "short_window": 10}, {"history": 5, "short_window": 10},
     {"baseline_warmup": 300, "window": 100}],
)
def test_rejects_bad_settings(kw):
    with pytest.raises(DetectorConfigError):
        LikelihoodDetector(**kw)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=0, max_size=400))
def test_any_series_gives_likelihoods_in_range_and_bounded_memory(values):
    det = LikelihoodDetector(window=20, baseline_warmup=5, warmup=20, short_window=4, history=30)
    for i, v in enumerate(values):
        verdict = det.update(v, float(i))
        if verdict is not None:
            assert 0.0 <= verdict.score <= 1.0
            assert verdict.anomalous == (verdict.score > verdict.threshold)
            assert verdict.score == det.score()
        assert det.memory <= 20 + 30 + 4
