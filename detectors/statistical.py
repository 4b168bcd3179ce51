"""Detectors that learn their own baseline: EWMA z-score band, rolling median/MAD, two-sided CUSUM.

All three share one lifecycle:

* **Warm-up.** The first ``warmup`` finite values only build the baseline; ``update`` returns
  ``None`` and ``score()`` is NaN.
* **Verdicts.** Every later value gets a :class:`~detectors.base.Verdict`; it is anomalous when
  its score exceeds the detector's threshold.
* **Keeping anomalies out.** With ``exclude_anomalies=True`` (default) an anomalous value does
  not move the baseline, so a burst cannot teach the detector that the burst is normal.
* **Re-learning.** A lasting level shift would then stay anomalous for ever. ``adapt_after=N``
  accepts it: after N anomalous values in a row the detector starts a new warm-up seeded with
  those N values (so with ``N >= warmup`` it re-baselines at once). ``None`` (default) never does.
  ``clip_anomalies=True`` (EWMA and MAD) is the gentler way: an anomalous value joins the baseline clipped
  to the band's edge (winsorised), so a spike hardly moves it while a lasting shift is absorbed gradually.
* **Spread floor.** A constant series has zero spread; dividing by it would make any change
  infinitely anomalous. The spread used is at least ``min_std`` or, when ``min_std`` is None,
  1% of the baseline's magnitude (and never below 1e-12).
* Non-finite values are ignored (``None``, no state change). ``now`` is only stamped on verdicts:
  warm-up and windows count values, so feed one value per tick.

Memory is O(1) for EWMA and CUSUM and O(window) for MAD.

Why one module of about 500 lines: the three detectors share the lifecycle above (warm-up, keeping anomalies out,
re-learning, the spread floor) through one base, so each differs only in its baseline and score.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from . import _validate as check
from .base import Verdict
from .errors import DetectorConfigError

__all__ = ["CusumDetector", "EwmaDetector", "MadDetector"]

_REL_STD_FLOOR = 0.01
_ABS_STD_FLOOR = 1e-12
# Scales the MAD to the standard deviation of a normal distribution.
_MAD_TO_STD = 1.482602218505602
# Scales the mean absolute deviation to the standard deviation of a normal distribution (sqrt(pi / 2)).
_MEANAD_TO_STD = 1.2533141373155003
# A spread estimated from ~1/alpha values has heavy tails (a z-score against it is t-distributed
# with few degrees of freedom), which multiplies false alarms; the spread changes more slowly than
# the level, so it is smoothed five times more slowly by default.
_VAR_ALPHA_RATIO = 0.2
# Headroom above h for the CUSUM sums (see CusumDetector).
_CUSUM_CAP = 1.25


class _Learner:
    """Shared lifecycle: warm-up, verdicts, anomaly exclusion, re-learning."""

    _kind = "detector"

    def __init__(
        self,
        *,
        name: str | None,
        warmup: int,
        exclude_anomalies: bool,
        min_std: float | None,
        adapt_after: int | None,
        clip_anomalies: bool = False,
        min_warmup: int = 2,
    ) -> None:
        self._clip = check.boolean("clip_anomalies", clip_anomalies)
        self._spread = 0.0  # the spread the latest verdict divided by (EWMA and MAD set it in _judge)
        self._signed = math.nan  # the latest signed z-score (EWMA and MAD)
        self.name = check.name("name", self._kind if name is None else name)
        self._warmup = check.integer("warmup", warmup, lo=min_warmup, hi=10_000_000)
        self._exclude = check.boolean("exclude_anomalies", exclude_anomalies)
        self._min_std = None if min_std is None else check.real("min_std", min_std, lo=0.0)
        self._adapt_after = (
            None if adapt_after is None else check.integer("adapt_after", adapt_after, lo=1, hi=10_000_000)
        )
        self._recent: deque[float] = deque(maxlen=self._adapt_after or 1)
        self._restart()

    @property
    def warmup(self) -> int:
        return self._warmup

    @property
    def exclude_anomalies(self) -> bool:
        return self._exclude

    @property
    def warming_up(self) -> bool:
        return self._seen < self._warmup

    def score(self) -> float:
        """Latest score; NaN while warming up."""
        return self._score

    def reset(self) -> None:
        """Forget the baseline and warm up again."""
        self._restart()

    def _restart(self) -> None:
        self._seen = 0
        self._streak = 0
        self._recent.clear()
        self._score = math.nan
        self._reset_baseline()

    def _floor(self, baseline: float) -> float:
        if self._min_std is not None:
            return max(self._min_std, _ABS_STD_FLOOR)
        return max(_REL_STD_FLOOR * abs(baseline), _ABS_STD_FLOOR)

    def update(self, value: float, now: float) -> Verdict | None:
        x = float(value)
        if not math.isfinite(x):
            return None
        if self._seen < self._warmup:
            self._learn(x)
            self._seen += 1
            if self._seen == self._warmup:
                self._finish_warmup()
            return None
        score, baseline, threshold, detail = self._judge(x)
        anomalous = score > threshold
        self._score = score
        if anomalous:
            self._streak += 1
            self._recent.append(x)
        else:
            self._streak = 0
            self._recent.clear()
        if not (anomalous and self._exclude):
            self._absorb(x)
        elif self._clip and self._spread > 0.0:
            # Winsorised: the value joins the baseline at the band's edge, so a burst barely moves it but a
            # lasting shift pulls it along, one band width at a time, until the shift is the new normal.
            edge = self._z * self._spread
            self._absorb(min(max(x, baseline - edge), baseline + edge))
        verdict = Verdict(
            anomalous=anomalous,
            score=score,
            value=x,
            baseline=baseline,
            detector=self.name,
            reason=f"{self.name}: {detail}",
            threshold=threshold,
            at=float(now),
        )
        if anomalous and self._adapt_after is not None and self._streak >= self._adapt_after:
            seed = list(self._recent)
            self._restart()
            for v in seed[-self._warmup :]:
                self._learn(v)
                self._seen += 1
            if self._seen == self._warmup:
                self._finish_warmup()
        return verdict

    # Subclass hooks.
    def _reset_baseline(self) -> None:
        raise NotImplementedError

    def _learn(self, x: float) -> None:
        raise NotImplementedError

    def _finish_warmup(self) -> None:
        pass

    def _judge(self, x: float) -> tuple[float, float, float, str]:
        raise NotImplementedError

    def _absorb(self, x: float) -> None:
        raise NotImplementedError


def _describe(x: float, z: float, baseline: float, what: str, limit: float) -> str:
    side = "above" if z >= 0 else "below"
    verdict = "outside" if abs(z) > limit else "within"
    return (
        f"value {x:.6g} is {abs(z):.2f} sigma {side} {what} {baseline:.6g} "
        f"({verdict} the {limit:g} sigma band)"
    )


class _Welford:
    """Running mean and variance (Welford), exact for a constant series."""

    __slots__ = ("n", "mean", "m2")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def var(self) -> float:
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0


class EwmaDetector(_Learner):
    """Exponentially weighted mean and variance with a z-score band.

    A value is anomalous when ``|x - mean| / std > z_threshold``. The baseline starts as the
    plain mean and variance of the warm-up values, then follows ``mean += alpha * d`` and
    ``var += var_alpha * (d**2 - var)`` with ``d = x - mean``: the mean forgets with a half-life of
    about ``ln 2 / alpha`` values, the spread (a steadier property) five times more slowly.

    Args:
        alpha: smoothing factor in (0, 1]; smaller remembers longer.
        z_threshold: band half-width in standard deviations (> 0).
        warmup: values that only build the baseline (>= 2).
        exclude_anomalies: keep anomalous values out of the baseline.
        min_std: floor of the standard deviation; None means 1% of |mean|.
        var_alpha: smoothing factor of the variance in (0, 1]; None means ``alpha / 5``.
        adapt_after: re-learn after this many anomalous values in a row; None never.
        clip_anomalies: with ``exclude_anomalies``, let an anomalous value in clipped to the band's edge.
        smoothing: ``lambda`` in (0, 1] of an EWMA control chart: the value judged is
            ``s = lambda * x + (1 - lambda) * s`` against a band narrowed by ``sqrt(lambda / (2 - lambda))``,
            which finds small lasting shifts and keeps a spike's verdict for a few values; 1 judges each
            value alone.
        name: the name verdicts carry.
    """

    _kind = "ewma"

    def __init__(
        self,
        alpha: float = 0.1,
        z_threshold: float = 4.0,
        warmup: int = 30,
        exclude_anomalies: bool = True,
        min_std: float | None = None,
        *,
        var_alpha: float | None = None,
        adapt_after: int | None = None,
        clip_anomalies: bool = False,
        smoothing: float = 1.0,
        name: str | None = None,
    ) -> None:
        self._alpha = check.real("alpha", alpha, lo=0.0, hi=1.0, lo_open=True)
        self._lambda = check.real("smoothing", smoothing, lo=0.0, hi=1.0, lo_open=True)
        # The smoothed statistic's standard deviation relative to one value's (Roberts 1959).
        self._shrink = math.sqrt(self._lambda / (2.0 - self._lambda))
        self._z = check.real("z_threshold", z_threshold, lo=0.0, lo_open=True)
        self._var_alpha = (
            self._alpha * _VAR_ALPHA_RATIO
            if var_alpha is None
            else check.real("var_alpha", var_alpha, lo=0.0, hi=1.0, lo_open=True)
        )
        super().__init__(
            name=name, warmup=warmup, exclude_anomalies=exclude_anomalies, min_std=min_std, adapt_after=adapt_after,
            clip_anomalies=clip_anomalies,
        )

    def __repr__(self) -> str:
        return (
            f"EwmaDetector(alpha={self._alpha:g}, z_threshold={self._z:g}, "
            f"warmup={self._warmup}, name={self.name!r})"
        )

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def z_threshold(self) -> float:
        return self._z

    @property
    def baseline(self) -> float:
        """Current mean (NaN while warming up)."""
        return math.nan if self.warming_up else self._mean

    def _reset_baseline(self) -> None:
        self._acc = _Welford()
        self._mean = 0.0
        self._var = 0.0
        self._smoothed = 0.0

    def _learn(self, x: float) -> None:
        self._acc.add(x)

    def _finish_warmup(self) -> None:
        self._mean = self._acc.mean
        self._var = self._acc.var
        self._smoothed = self._mean

    def _judge(self, x: float) -> tuple[float, float, float, str]:
        m = self._mean
        self._spread = max(math.sqrt(self._var), self._floor(m))
        self._smoothed += self._lambda * (x - self._smoothed)
        z = (self._smoothed - m) / (self._spread * self._shrink)
        self._signed = z
        if self._lambda < 1.0:
            detail = _describe(self._smoothed, z, m, "the EWMA mean", self._z)
            return abs(z), m, self._z, f"smoothed {detail} (latest value {x:.6g})"
        return abs(z), m, self._z, _describe(x, z, m, "the EWMA mean", self._z)

    def _absorb(self, x: float) -> None:
        d = x - self._mean
        self._mean += self._alpha * d
        # An EWMA of the squared one-step-ahead error: exactly the spread a z-score of d needs.
        self._var += self._var_alpha * (d * d - self._var)


class MadDetector(_Learner):
    """Robust z-score against the median and MAD of the last ``window`` baseline values.

    ``z = (x - median) / (1.4826 * MAD)``; anomalous when ``|z| > z_threshold``. The median and
    MAD ignore up to half the window being outliers, so a noisy baseline does not blind it.

    Args:
        window: baseline values kept (>= 3); memory is O(window).
        z_threshold: band half-width in robust standard deviations (> 0).
        warmup: values before the first verdict (2..window).
        exclude_anomalies: keep anomalous values out of the window.
        min_std: floor of the robust standard deviation; None means 1% of |median|.
        adapt_after: re-learn after this many anomalous values in a row; None never.
        clip_anomalies: with ``exclude_anomalies``, let an anomalous value in clipped to the band's edge.
        name: the name verdicts carry.
    """

    _kind = "mad"

    def __init__(
        self,
        window: int = 120,
        z_threshold: float = 5.0,
        warmup: int = 30,
        exclude_anomalies: bool = True,
        min_std: float | None = None,
        *,
        adapt_after: int | None = None,
        clip_anomalies: bool = False,
        name: str | None = None,
    ) -> None:
        self._window = check.integer("window", window, lo=3, hi=1_000_000)
        self._z = check.real("z_threshold", z_threshold, lo=0.0, lo_open=True)
        w = check.integer("warmup", warmup, lo=2)
        if w > self._window:
            raise DetectorConfigError(f"warmup ({w}) must not exceed window ({self._window})")
        super().__init__(
            name=name, warmup=warmup, exclude_anomalies=exclude_anomalies, min_std=min_std, adapt_after=adapt_after,
            clip_anomalies=clip_anomalies,
        )

    def __repr__(self) -> str:
        return (
            f"MadDetector(window={self._window}, z_threshold={self._z:g}, "
            f"warmup={self._warmup}, name={self.name!r})"
        )

    @property
    def window(self) -> int:
        return self._window

    @property
    def z_threshold(self) -> float:
        return self._z

    @property
    def baseline(self) -> float:
        """Current median (NaN while warming up)."""
        return math.nan if self.warming_up else float(np.median(self._buf))

    def _reset_baseline(self) -> None:
        self._buf: deque[float] = deque(maxlen=self._window)

    def _learn(self, x: float) -> None:
        self._buf.append(x)

    def _judge(self, x: float) -> tuple[float, float, float, str]:
        arr = np.fromiter(self._buf, dtype=float, count=len(self._buf))
        med = float(np.median(arr))
        dev = np.abs(arr - med)
        sd = _MAD_TO_STD * float(np.median(dev))
        if sd == 0.0:
            # More than half the window is one value (a series that is mostly zeros): the MAD is 0 and any other
            # value would be infinitely unusual. The mean absolute deviation still sees how far the rest stray.
            sd = _MEANAD_TO_STD * float(dev.mean())
        self._spread = max(sd, self._floor(med))
        z = (x - med) / self._spread
        self._signed = z
        return abs(z), med, self._z, _describe(x, z, med, "the median", self._z)

    def _absorb(self, x: float) -> None:
        self._buf.append(x)


class CusumDetector(_Learner):
    """Two-sided standardised CUSUM (Page, 1954) for slow shifts of the mean.

    Each value is standardised against the warm-up baseline, ``z = (x - mu) / sigma``, and
    accumulated as ``S+ = max(0, S+ + z - k)`` and ``S- = max(0, S- - z - k)``. The score is
    ``max(S+, S-)``; anomalous when it exceeds ``h``. ``k`` is half the shift (in sigmas) it is
    tuned to catch; ``h`` sets the false-alarm rate (``k=0.5, h=8``: about one false alarm per
    5 000 values of Gaussian noise, and a one-sigma shift found after about 15 values).

    The sums are capped at ``1.25 * h``: a lasting shift keeps the alarm on without flapping, a
    long one cannot pile up a sum that takes ages to drain, and once the shift ends the alarm clears
    within about ``0.25 * h / k`` values.

    The reference ``mu, sigma`` starts as the warm-up's mean and standard deviation. With
    ``baseline_alpha = 0`` (default) it keeps learning from every later value as a cumulative mean
    and variance (a self-starting CUSUM, Hawkins 1987): estimates from a short warm-up are too
    rough to standardise against for long, and a cumulative estimate sharpens without ever
    drifting. With ``baseline_alpha > 0`` it follows an EWMA with that factor instead, forgetting
    old data. ``exclude_anomalies`` keeps anomalous values out of either.

    Args:
        k: allowance in sigmas (>= 0).
        h: decision threshold in sigmas (> 0).
        warmup: values that estimate ``mu`` and ``sigma`` (>= 2).
        exclude_anomalies: keep anomalous values out of an adapting baseline.
        baseline_alpha: EWMA factor for the reference in [0, 1); 0 learns it cumulatively.
        min_std: floor of sigma; None means 1% of |mu|.
        adapt_after: re-learn after this many anomalous values in a row; None never.
        name: the name verdicts carry.
    """

    _kind = "cusum"

    def __init__(
        self,
        k: float = 0.5,
        h: float = 8.0,
        warmup: int = 30,
        exclude_anomalies: bool = True,
        min_std: float | None = None,
        *,
        baseline_alpha: float = 0.0,
        adapt_after: int | None = None,
        name: str | None = None,
    ) -> None:
        self._k = check.real("k", k, lo=0.0)
        self._h = check.real("h", h, lo=0.0, lo_open=True)
        self._beta = check.real("baseline_alpha", baseline_alpha, lo=0.0, hi=1.0, hi_open=True)
        super().__init__(
            name=name, warmup=warmup, exclude_anomalies=exclude_anomalies, min_std=min_std, adapt_after=adapt_after
        )

    def __repr__(self) -> str:
        return f"CusumDetector(k={self._k:g}, h={self._h:g}, warmup={self._warmup}, name={self.name!r})"

    @property
    def k(self) -> float:
        return self._k

    @property
    def h(self) -> float:
        return self._h

    @property
    def baseline(self) -> float:
        """Reference mean (NaN while warming up)."""
        return math.nan if self.warming_up else self._mu

    @property
    def sums(self) -> tuple[float, float]:
        """``(S+, S-)`` after the latest value."""
        return self._sp, self._sn

    def _reset_baseline(self) -> None:
        self._acc = _Welford()
        self._mu = 0.0
        self._var = 0.0
        self._sp = 0.0
        self._sn = 0.0

    def _learn(self, x: float) -> None:
        self._acc.add(x)

    def _finish_warmup(self) -> None:
        self._mu = self._acc.mean
        self._var = self._acc.var

    def _judge(self, x: float) -> tuple[float, float, float, str]:
        mu, h = self._mu, self._h
        z = (x - mu) / max(math.sqrt(self._var), self._floor(mu))
        sp = max(0.0, self._sp + z - self._k)
        sn = max(0.0, self._sn - z - self._k)
        score = max(sp, sn)
        side = "upward" if sp >= sn else "downward"
        cap = _CUSUM_CAP * h
        self._sp, self._sn = min(sp, cap), min(sn, cap)
        state = "above" if score > h else "within"
        detail = (
            f"cumulative {side} drift {score:.2f} sigma vs baseline {mu:.6g} "
            f"({state} h={h:g}); value {x:.6g}"
        )
        return score, mu, h, detail

    def _absorb(self, x: float) -> None:
        if self._beta > 0.0:
            d = x - self._mu
            self._mu += self._beta * d
            self._var += self._beta * (d * d - self._var)
        else:
            self._acc.add(x)
            self._mu = self._acc.mean
            self._var = self._acc.var
