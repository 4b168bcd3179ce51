"""What each statistical detector does beyond the shared contract."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detectors import CusumDetector, DetectorConfigError, EwmaDetector, MadDetector, Verdict


def noisy(seed: int, n: int, level: float = 10.0, sd: float = 1.0) -> np.ndarray:
    return level + np.random.default_rng(seed).normal(0.0, sd, size=n)


def feed(det, series, start: int = 0) -> list[Verdict | None]:
    return [det.update(float(x), float(start + i)) for i, x in enumerate(series)]


def first_alarm(verdicts, offset: int = 0) -> int | None:
    for i, v in enumerate(verdicts[offset:]):
        if v is not None and v.anomalous:
            return i
    return None


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_cusum_finds_a_one_sigma_shift_that_a_z_band_misses(seed):
    series = noisy(seed, 400)
    series[200:] += 1.0
    cusum = feed(CusumDetector(), series)
    ewma = feed(EwmaDetector(), series)
    delay = first_alarm(cusum, 200)
    assert delay is not None and delay <= 60
    assert first_alarm(ewma, 200) is None or first_alarm(ewma, 200) > delay
    # The alarm lasts while the shift does.
    assert sum(v.anomalous for v in cusum[200 + delay + 5 :]) / len(cusum[200 + delay + 5 :]) > 0.8


def test_cusum_alarm_ends_soon_after_the_shift_does():
    series = noisy(5, 500)
    series[200:260] += 2.0
    verdicts = feed(CusumDetector(), series)
    assert any(v.anomalous for v in verdicts[200:260])
    assert not any(v.anomalous for v in verdicts[270:] if v is not None)


def test_cusum_sums_are_bounded_during_a_long_shift():
    det = CusumDetector(h=8.0)
    feed(det, noisy(6, 100))
    feed(det, noisy(7, 5_000, level=15.0), start=100)
    assert max(det.sums) <= 1.25 * det.h


@pytest.mark.parametrize("make", [EwmaDetector, MadDetector, CusumDetector])
def test_excluded_anomalies_leave_the_baseline_alone(make):
    det = make()
    feed(det, noisy(8, 60))
    before = det.baseline
    verdict = det.update(1_000.0, 60.0)
    assert verdict is not None and verdict.anomalous
    assert det.baseline == before


def test_included_anomalies_move_the_baseline():
    det = EwmaDetector(exclude_anomalies=False)
    feed(det, noisy(8, 60))
    before = det.baseline
    assert det.update(1_000.0, 60.0).anomalous
    assert det.baseline > before + 50


@pytest.mark.parametrize("make", [EwmaDetector, MadDetector, CusumDetector])
def test_without_adapt_after_a_lasting_shift_stays_anomalous(make):
    det = make()
    feed(det, noisy(9, 100))
    verdicts = feed(det, noisy(10, 300, level=30.0), start=100)
    assert all(v.anomalous for v in verdicts)


@pytest.mark.parametrize("make", [EwmaDetector, MadDetector, CusumDetector])
def test_adapt_after_accepts_a_new_level(make):
    det = make(adapt_after=40)  # >= warmup (30): re-baselines on the anomalous values at once
    feed(det, noisy(9, 100))
    verdicts = feed(det, noisy(10, 300, level=30.0), start=100)
    assert all(v is not None for v in verdicts)
    assert all(v.anomalous for v in verdicts[:40])
    assert sum(v.anomalous for v in verdicts[45:]) <= 3
    assert det.baseline == pytest.approx(30.0, abs=1.0)


def test_short_adapt_after_warms_up_again():
    det = EwmaDetector(warmup=30, adapt_after=10)
    feed(det, noisy(11, 100))
    verdicts = feed(det, noisy(12, 100, level=30.0), start=100)
    assert all(v.anomalous for v in verdicts[:10])
    assert all(v is None for v in verdicts[10:30])  # 20 more values finish the new warm-up
    assert not any(v.anomalous for v in verdicts[30:])


def test_mad_shrugs_off_outliers_in_its_baseline():
    series = noisy(13, 200)
    series[::10] = 500.0  # every tenth value is wild, also during warm-up
    det = MadDetector(exclude_anomalies=False)
    verdicts = feed(det, series)
    assert det.baseline == pytest.approx(10.0, abs=0.5)
    wild = [v for i, v in enumerate(verdicts) if v is not None and i % 10 == 0]
    tame = [v for i, v in enumerate(verdicts) if v is not None and i % 10 != 0]
    assert all(v.anomalous for v in wild)
    assert sum(v.anomalous for v in tame) <= 1


def test_spread_floor_is_relative_unless_given():
    # A constant series: a 2% change is within 4 sigma of a 1%-of-level floor, a 10% change is not.
    det = EwmaDetector()
    feed(det, [100.0] * 40)
    assert not det.update(102.0, 40.0).anomalous
    assert det.update(110.0, 41.0).anomalous
    strict = EwmaDetector(min_std=1e-6)
    feed(strict, [100.0] * 40)
    assert strict.update(100.001, 40.0).anomalous


def test_verdict_reads_well():
    det = EwmaDetector(name="p95_latency_ewma")
    feed(det, noisy(14, 40))
    v = det.update(50.0, 40.0)
    assert v.detector == "p95_latency_ewma"
    assert v.reason.startswith("p95_latency_ewma: ") and "above" in v.reason and "outside" in v.reason
    assert v.threshold == det.z_threshold == 4.0
    low = det.update(-50.0, 41.0)
    assert "below" in low.reason
    with pytest.raises(AttributeError):
        v.score = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (EwmaDetector, {"alpha": 0}),
        (EwmaDetector, {"alpha": 1.5}),
        (EwmaDetector, {"alpha": math.nan}),
        (EwmaDetector, {"z_threshold": 0}),
        (EwmaDetector, {"z_threshold": -1}),
        (EwmaDetector, {"warmup": 1}),
        (EwmaDetector, {"warmup": 10.5}),
        (EwmaDetector, {"exclude_anomalies": "yes"}),
        (EwmaDetector, {"min_std": -1}),
        (EwmaDetector, {"var_alpha": 0}),
        (EwmaDetector, {"adapt_after": 0}),
        (EwmaDetector, {"name": ""}),
        (MadDetector, {"window": 2}),
        (MadDetector, {"window": 20, "warmup": 30}),
        (MadDetector, {"z_threshold": 0}),
        (CusumDetector, {"k": -0.1}),
        (CusumDetector, {"h": 0}),
        (CusumDetector, {"baseline_alpha": 1.0}),
        (CusumDetector, {"warmup": 0}),
    ],
)
def test_constructors_validate(make, kwargs):
    with pytest.raises(DetectorConfigError) as info:
        make(**kwargs)
    assert isinstance(info.value, ValueError)


def test_adapt_after_counts_only_an_unbroken_run():
    det = EwmaDetector(adapt_after=5)
    feed(det, noisy(15, 40))
    for i in range(20):  # anomalies interleaved with normal values never make a run of 5
        det.update(100.0 if i % 2 else 10.0, 40.0 + i)
    assert not det.warming_up
    assert det.baseline == pytest.approx(10.0, abs=1.0)


def test_mad_on_a_series_that_is_mostly_zeros_is_not_alarmed_by_every_other_value():
    # Before: more than half the window at 0 made the MAD 0, so every non-zero value was anomalous.
    rng = np.random.default_rng(21)
    series = np.where(rng.random(600) < 0.7, 0.0, rng.uniform(1.0, 5.0, 600))
    det = MadDetector(window=120, z_threshold=5.0, min_std=1e-9)
    verdicts = [v for v in feed(det, series) if v is not None]
    assert sum(v.anomalous for v in verdicts) <= 0.02 * len(verdicts)
    assert det.update(500.0, 600.0).anomalous


@pytest.mark.parametrize("make", [lambda: EwmaDetector(clip_anomalies=True), lambda: MadDetector(clip_anomalies=True)])
def test_clipped_anomalies_barely_move_the_baseline_but_a_lasting_shift_is_absorbed(make):
    det = make()
    feed(det, noisy(22, 200))
    before = det.baseline
    det.update(1000.0, 200.0)  # one wild spike enters at the band's edge only
    assert abs(det.baseline - before) < 1.0
    verdicts = feed(det, noisy(23, 600, level=20.0), start=201)
    assert verdicts[0].anomalous
    assert not any(v.anomalous for v in verdicts[-100:])  # the new level became normal
    assert det.baseline == pytest.approx(20.0, abs=1.5)


def test_without_clipping_an_excluded_shift_stays_anomalous():
    det = EwmaDetector()
    feed(det, noisy(22, 200))
    verdicts = feed(det, noisy(23, 600, level=20.0), start=200)
    assert all(v.anomalous for v in verdicts)


def test_clip_anomalies_is_validated():
    with pytest.raises(DetectorConfigError):
        EwmaDetector(clip_anomalies="yes")


def test_a_smoothed_ewma_finds_a_small_lasting_shift_that_the_plain_band_mostly_misses():
    def delays(smoothing):
        out = []
        for seed in range(10):
            det = EwmaDetector(alpha=0.01, z_threshold=3.5, warmup=100, smoothing=smoothing)
            verdicts = feed(det, np.r_[noisy(seed, 300), noisy(seed + 100, 300, level=11.0)])  # a one-sigma rise
            if smoothing < 1.0:
                assert first_alarm(verdicts[:300]) is None  # the narrower band raises no false alarm before it
            out.append(first_alarm(verdicts, 300))
        return out

    chart, plain = delays(0.05), delays(1.0)
    assert all(d is not None and d <= 50 for d in chart), chart
    assert sum(d is None for d in plain) >= 5, plain


def test_smoothing_is_validated():
    for bad in (0.0, 1.5):
        with pytest.raises(DetectorConfigError):
            EwmaDetector(smoothing=bad)
