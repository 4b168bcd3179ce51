"""Anomaly likelihood (Ahmad et al. 2017, the post-processing of NAB's best detectors) over a robust residual.

Each value gets a *raw score* in [0, 1): how far it lies from a rolling median, in robust standard deviations
(MAD), squashed by ``1 - exp(-|z| / scale)``. A raw score alone is a poor verdict on real metrics: some series
are always a little unpredictable, and a threshold on ``|z|`` pages on them all day. So the detector learns how
its own raw scores are distributed: a Gaussian fitted to the last ``history`` raw scores. The verdict compares
the mean of the last ``short_window`` raw scores with that Gaussian; the likelihood is ``1 - Q(z)`` (Q the
normal tail) and the value is anomalous when the likelihood exceeds ``1 - epsilon``: the recent residuals are
larger than this series has shown for a long time. A noisy series raises its own bar, a calm one lowers it,
and a lasting shift, once it is in the median, stops scoring by itself.

Lifecycle: the first ``warmup`` finite values give no verdict (``None``, ``score()`` NaN): the median needs
``baseline_warmup`` of them and the raw-score history the rest. Non-finite values are ignored. Memory is
O(window + history + short_window), whatever the series' length.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from . import _validate as check
from .base import Verdict
from .errors import DetectorConfigError

__all__ = ["LikelihoodDetector"]

_MAD_TO_STD = 1.482602218505602
_MEANAD_TO_STD = 1.2533141373155003
_REL_STD_FLOOR = 0.01
_ABS_STD_FLOOR = 1e-12
# The spread of the raw-score Gaussian is floored: on a long flat stretch every raw score is 0, and without a
# floor the first small wiggle after it would be infinitely unlikely.
_MIN_HISTORY_STD = 0.02
_DIRECTIONS = ("both", "up", "down")


def _tail(z: float) -> float:
    """Q(z), the upper tail of the standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


class LikelihoodDetector:
    """Anomaly likelihood of a rolling median/MAD residual.

    Args:
        window: values in the rolling median/MAD baseline (>= 3); every value joins it, so a lasting shift
            becomes the new normal within about ``window / 2`` values.
        baseline_warmup: values that only build the median before raw scores start (2..window).
        warmup: values before the first verdict (> baseline_warmup + short_window): the rest of them fill the
            raw-score history.
        short_window: raw scores averaged for the verdict (>= 1).
        history: raw scores the Gaussian is fitted to (>= short_window + 2).
        epsilon: tail probability in (0, 0.5): the value is anomalous when the likelihood exceeds ``1 - epsilon``.
        scale: robust z-score at which the raw score is ``1 - 1/e`` (> 0).
        direction: ``"both"``, ``"up"`` (only values above the median score) or ``"down"``.
        min_std: floor of the robust standard deviation; None means 1% of |median|.
        min_z: a floor on the evidence itself (>= 0): the mean raw score of the last ``short_window`` values must
            also be at least that of a residual of ``min_z`` robust sigmas. The likelihood alone is relative to the
            series' own history, so on a long calm stretch ordinary noise becomes "unlikely"; with ``min_z`` noise
            never fires however calm the history (0: no floor).
        name: the name verdicts carry.
    """

    _kind = "likelihood"

    # Its threshold is a probability near 1: there is no fraction to raise it by (see ``Detector``).
    scalable_threshold = False

    def __init__(
        self,
        window: int = 288,
        baseline_warmup: int = 30,
        warmup: int = 200,
        short_window: int = 10,
        history: int = 2000,
        epsilon: float = 1e-4,
        scale: float = 3.0,
        direction: str = "both",
        min_std: float | None = None,
        *,
        min_history_std: float = 0.02,
        min_z: float = 0.0,
        name: str | None = None,
    ) -> None:
        self._min_z = check.real("min_z", min_z, lo=0.0)
        self._min_history_std = check.real("min_history_std", min_history_std, lo=0.0, lo_open=True)
        self._window = check.integer("window", window, lo=3, hi=1_000_000)
        self._base_warmup = check.integer("baseline_warmup", baseline_warmup, lo=2, hi=self._window)
        self._short = check.integer("short_window", short_window, lo=1, hi=100_000)
        self._history = check.integer("history", history, lo=self._short + 2, hi=1_000_000)
        self._warmup = check.integer("warmup", warmup, lo=1, hi=10_000_000)
        if self._warmup <= self._base_warmup + self._short:
            raise DetectorConfigError(
                f"warmup ({self._warmup}) must exceed baseline_warmup + short_window ({self._base_warmup + self._short})"
            )
        self._eps = check.real("epsilon", epsilon, lo=0.0, hi=0.5, lo_open=True, hi_open=True)
        self._scale = check.real("scale", scale, lo=0.0, lo_open=True)
        if direction not in _DIRECTIONS:
            raise DetectorConfigError(f"direction must be one of {', '.join(_DIRECTIONS)}, got {direction!r}")
        self._direction = direction
        self._min_raw = 1.0 - math.exp(-self._min_z / self._scale)
        self._min_std = None if min_std is None else check.real("min_std", min_std, lo=0.0)
        self.name = check.name("name", self._kind if name is None else name)
        self.reset()

    def __repr__(self) -> str:
        return (
            f"LikelihoodDetector(window={self._window}, history={self._history}, short_window={self._short}, "
            f"epsilon={self._eps:g}, warmup={self._warmup}, name={self.name!r})"
        )

    @property
    def warmup(self) -> int:
        return self._warmup

    @property
    def epsilon(self) -> float:
        return self._eps

    @property
    def threshold(self) -> float:
        """The likelihood above which a value is anomalous, ``1 - epsilon``."""
        return 1.0 - self._eps

    @property
    def warming_up(self) -> bool:
        return self._seen < self._warmup

    @property
    def baseline(self) -> float:
        """Current rolling median (NaN before the first verdict)."""
        return math.nan if self.warming_up else self._median()

    @property
    def memory(self) -> int:
        """Values held: rolling window, raw-score history and short average (bounded by the configuration)."""
        return len(self._order) + len(self._scores) + len(self._recent)

    def score(self) -> float:
        """Latest likelihood in [0, 1]; NaN while warming up."""
        return self._score

    def reset(self) -> None:
        """Forget everything and warm up again."""
        self._seen = 0
        self._score = math.nan
        self._arrival: deque[float] = deque()
        self._order: list[float] = []  # the window, sorted: median and MAD without numpy per value
        self._scores: deque[float] = deque()
        self._sum = 0.0
        self._sumsq = 0.0
        self._since_exact = 0
        self._recent: deque[float] = deque()
        self._recent_sum = 0.0

    # -- the baseline ------------------------------------------------------------------------------------

    def _median(self) -> float:
        s, n = self._order, len(self._order)
        return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])

    def _spread(self, med: float) -> float:
        s = self._order
        sd = _MAD_TO_STD * _mad_sorted(s, med)
        if sd == 0.0:
            # Most of the window is one value (a series of mostly zeros): the mean absolute deviation still sees
            # how far the rest stray.
            sd = _MEANAD_TO_STD * sum(abs(v - med) for v in s) / len(s)
        floor = max(self._min_std, _ABS_STD_FLOOR) if self._min_std is not None else max(_REL_STD_FLOOR * abs(med), _ABS_STD_FLOOR)
        return max(sd, floor)

    def _add(self, x: float) -> None:
        self._arrival.append(x)
        bisect.insort(self._order, x)
        if len(self._arrival) > self._window:
            old = self._arrival.popleft()
            del self._order[bisect.bisect_left(self._order, old)]

    # -- the raw-score Gaussian --------------------------------------------------------------------------

    def _push_average(self, avg: float) -> None:
        self._scores.append(avg)
        self._sum += avg
        self._sumsq += avg * avg
        if len(self._scores) > self._history:
            old = self._scores.popleft()
            self._sum -= old
            self._sumsq -= old * old
        self._since_exact += 1
        if self._since_exact >= self._history:
            # Running sums drift by rounding over millions of values; recompute them once per history.
            self._sum = math.fsum(self._scores)
            self._sumsq = math.fsum(v * v for v in self._scores)
            self._since_exact = 0

    def update(self, value: float, now: float) -> Verdict | None:
        x = float(value)
        if not math.isfinite(x):
            return None
        self._seen += 1
        if len(self._order) < self._base_warmup:
            self._add(x)
            return None
        med = self._median()
        sd = self._spread(med)
        z = (x - med) / sd
        signed = z if self._direction != "down" else -z
        raw = 1.0 - math.exp(-(abs(z) if self._direction == "both" else max(signed, 0.0)) / self._scale)
        self._add(x)
        self._recent.append(raw)
        self._recent_sum += raw
        if len(self._recent) > self._short:
            self._recent_sum -= self._recent.popleft()
        avg = self._recent_sum / len(self._recent)
        # Judged against the averages before this one (the newest must not vouch for itself); the Gaussian is of
        # averages, as the verdict is, so its spread is the spread of an average, not of one raw score.
        n = len(self._scores)
        mean = self._sum / n if n else 0.0
        var = max(self._sumsq / n - mean * mean, 0.0) if n else 0.0
        self._push_average(avg)
        if self._seen <= self._warmup:
            return None
        std = max(math.sqrt(var), self._min_history_std)
        zl = (avg - mean) / std
        likelihood = 1.0 - _tail(zl)
        threshold = 1.0 - self._eps
        if avg < self._min_raw:
            # Below the evidence floor the verdict is normal however unlikely: the score is held at the threshold so
            # that ``anomalous`` stays ``score > threshold``, as for every detector.
            likelihood = min(likelihood, threshold)
        self._score = likelihood
        anomalous = likelihood > threshold
        side = "above" if z >= 0 else "below"
        reason = (
            f"{self.name}: likelihood {likelihood:.6f} ({'above' if anomalous else 'within'} {threshold:.6g}); the mean "
            f"raw score of the last {len(self._recent)} values is {avg:.3f} against {mean:.3f} +- {std:.3f} over the "
            f"last {n}; value {x:.6g} is {abs(z):.2f} robust sigma {side} the median {med:.6g}"
        )
        return Verdict(anomalous=anomalous, score=likelihood, value=x, baseline=med, detector=self.name, reason=reason,
                       threshold=threshold, at=float(now))


def _mad_sorted(s: list[float], med: float) -> float:
    """Median of ``|s[i] - med|`` for sorted ``s``: the k-th smallest deviation by merging both sides of ``med``."""
    n = len(s)
    k = n // 2
    hi = bisect.bisect_left(s, med)
    lo = hi - 1
    # Walking outwards from the median, nearer side first, yields the deviations in increasing order, so the
    # median deviation is found in n/2 steps instead of a sort.
    before = d = 0.0
    for _ in range(k + 1):
        before = d
        dl = med - s[lo] if lo >= 0 else math.inf
        dh = s[hi] - med if hi < n else math.inf
        if dl <= dh:
            d = dl
            lo -= 1
        else:
            d = dh
            hi += 1
    return d if n % 2 else 0.5 * (before + d)
