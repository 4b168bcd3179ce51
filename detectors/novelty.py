"""A new maximum: a value higher than anything the series has shown over a long history, by a robust margin.

Most of what pages an operator on a latency or load series is a level it has never reached before: the p95
after a bad deploy, a saturated disk, a runaway job. A z-band around a moving mean finds those too, but it
also pages on every daily peak, because its mean trails the cycle. This detector compares each value with
the *largest* value of a long history instead (days, so the history holds the daily peaks), and fires only
when the value exceeds that maximum by ``margin`` times the history's upper range (its maximum minus its
median). On stationary or daily-cycling noise the maximum of days of values is already far in the tail, and
beating it by a further fraction of the range almost never happens; the margin scales with the series' own
spread, so a spiky series needs a bigger excess than a calm one.

The history excludes the most recent ``recent_s`` seconds: values join it only once that old. So an
incident's own values cannot raise the bar while it is going on, and a lasting new level, once older than
``recent_s``, is the new maximum and stops paging by itself. With ``clip_anomalies`` an anomalous value joins
the history no higher than the bar it broke, so one huge spike cannot mask the next incident for the whole
history.

Lifecycle: no verdict (``None``, ``score()`` NaN) until the history holds ``warmup`` values *and*
covers ``min_history_s`` seconds (a day by default: before it has seen one daily cycle, every morning
is a new maximum). Non-finite values are ignored. The history is kept as ``buckets`` time slices of
(maximum, median), so memory is bounded by ``buckets`` plus the values of the recent span and of one slice.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from . import _validate as check
from .base import Verdict
from .errors import DetectorConfigError

__all__ = ["NoveltyDetector"]

_REL_SPREAD_FLOOR = 0.01
_ABS_SPREAD_FLOOR = 1e-12
# Values held per open slice and in the recent span before they are thinned (memory stays bounded whatever the
# rate): a slice's maximum stays exact, only its median is estimated from every other value.
_MAX_SLICE_VALUES = 4096
_MAX_RECENT_VALUES = 100_000
_MAD_TO_STD = 1.482602218505602
_SCALES = ("range", "mad")
_DIRECTIONS = ("up", "both")


class NoveltyDetector:
    """Anomalous when a value exceeds the maximum of a long history by ``margin`` x (maximum - median).

    Args:
        history_s: how far back the history reaches, in seconds of ``now`` (> 0).
        recent_s: the latest span kept out of the history (>= 0): an incident cannot raise its own bar, and a
            lasting new level becomes normal once it is this old.
        margin: the excess over the history's maximum needed, in units of its upper range (> 0).
        min_history_s: the span the history must cover before the first verdict (0 .. history_s).
        warmup: values the history must hold before the first verdict (>= 1); with ``recent_s = 0`` the first
            ``warmup`` values give no verdict.
        buckets: time slices the history is kept in (2 .. 100 000).
        direction: ``"up"``, only a new maximum; ``"both"``, also a new minimum: a value below the history's
            minimum by ``margin`` x its lower range (median - minimum).
        clip_anomalies: an anomalous value joins the history no further out than the bar it broke.
        min_spread: floor of the upper range; None means 1% of |maximum| (never below 1e-12).
        name: the name verdicts carry.
    """

    _kind = "novelty"

    def __init__(
        self,
        history_s: float = 3 * 86_400.0,
        recent_s: float = 3_600.0,
        margin: float = 0.5,
        min_history_s: float = 86_400.0,
        warmup: int = 30,
        buckets: int = 72,
        *,
        scale: str = "range",
        direction: str = "up",
        clip_anomalies: bool = True,
        min_spread: float | None = None,
        name: str | None = None,
    ) -> None:
        self._history_s = check.real("history_s", history_s, lo=0.0, lo_open=True)
        self._recent_s = check.real("recent_s", recent_s, lo=0.0)
        self._margin = check.real("margin", margin, lo=0.0, lo_open=True)
        self._min_history_s = check.real("min_history_s", min_history_s, lo=0.0, hi=self._history_s)
        self._warmup = check.integer("warmup", warmup, lo=1, hi=10_000_000)
        self._buckets = check.integer("buckets", buckets, lo=2, hi=100_000)
        self._clip = check.boolean("clip_anomalies", clip_anomalies)
        if scale not in _SCALES:
            raise DetectorConfigError(f"scale must be one of {', '.join(_SCALES)}, got {scale!r}")
        self._scale = scale
        if direction not in _DIRECTIONS:
            raise DetectorConfigError(f"direction must be one of {', '.join(_DIRECTIONS)}, got {direction!r}")
        self._direction = direction
        self._min_spread = None if min_spread is None else check.real("min_spread", min_spread, lo=0.0)
        self._width = self._history_s / self._buckets
        self.name = check.name("name", self._kind if name is None else name)
        self.reset()

    def __repr__(self) -> str:
        return (
            f"NoveltyDetector(history_s={self._history_s:g}, recent_s={self._recent_s:g}, margin={self._margin:g}, "
            f"min_history_s={self._min_history_s:g}, warmup={self._warmup}, direction={self._direction!r}, name={self.name!r})"
        )

    @property
    def warmup(self) -> int:
        return self._warmup

    @property
    def margin(self) -> float:
        return self._margin

    @property
    def direction(self) -> str:
        return self._direction

    @property
    def warming_up(self) -> bool:
        return self._count < self._warmup or not self._covered()

    @property
    def baseline(self) -> float:
        """The history's maximum (NaN while it is empty)."""
        return self._max() if self._closed or self._open_vals else math.nan

    @property
    def memory(self) -> int:
        """Values and slices held (bounded by the configuration, whatever the series' length)."""
        return len(self._recent) + len(self._closed) + len(self._open_vals)

    def score(self) -> float:
        """Latest score, the excess over the history's maximum in upper ranges; NaN while warming up."""
        return self._score

    def reset(self) -> None:
        """Forget everything and warm up again."""
        self._seen = 0
        self._score = math.nan
        self._latest = -math.inf
        self._recent: deque[tuple[float, float]] = deque()  # (now, value as it will join the history)
        # (slice index, maximum, median, values, robust sd, minimum)
        self._closed: deque[tuple[int, float, float, int, float, float]] = deque()
        self._count = 0  # values in the history
        self._open_index: int | None = None
        self._open_vals: list[float] = []
        self._open_max = -math.inf
        self._open_min = math.inf
        self._open_n = 0
        self._first: float | None = None  # when the oldest value in the history was seen
        self._medians_cache: float | None = None
        self._mad_cache = 0.0

    # -- the history -------------------------------------------------------------------------------------

    def _covered(self) -> bool:
        return self._first is not None and self._latest - self._first >= self._min_history_s

    def _close_open(self) -> None:
        if self._open_index is not None and self._open_vals:
            vals = np.asarray(self._open_vals)
            med = float(np.median(vals))
            self._closed.append((self._open_index, self._open_max, med, self._open_n,
                                 _MAD_TO_STD * float(np.median(np.abs(vals - med))), self._open_min))
            self._medians_cache = None
        self._open_index, self._open_vals, self._open_max, self._open_min, self._open_n = None, [], -math.inf, math.inf, 0

    def _enter(self, t: float, x: float) -> None:
        index = math.floor(t / self._width)
        if self._open_index is not None and index != self._open_index:
            self._close_open()
        self._open_index = index
        self._open_vals.append(x)
        self._open_n += 1
        self._count += 1
        if len(self._open_vals) > _MAX_SLICE_VALUES:
            self._open_vals = self._open_vals[::2]
        self._open_max = max(self._open_max, x)
        self._open_min = min(self._open_min, x)
        if self._first is None:
            self._first = t

    def _age(self, now: float) -> None:
        while self._recent and (self._recent[0][0] <= now - self._recent_s or len(self._recent) > _MAX_RECENT_VALUES):
            self._enter(*self._recent.popleft())
        oldest = math.floor((now - self._history_s) / self._width)
        dropped = False
        while self._closed and self._closed[0][0] < oldest:
            self._count -= self._closed.popleft()[3]
            dropped = True
        if self._open_index is not None and self._open_index < oldest:
            self._count -= self._open_n
            self._open_index, self._open_vals, self._open_max, self._open_min, self._open_n = (
                None, [], -math.inf, math.inf, 0)
            dropped = True
        if dropped:
            self._medians_cache = None
            if self._closed:
                self._first = max(self._first or -math.inf, self._closed[0][0] * self._width)
            elif self._open_index is None:
                self._first = None

    def _max(self) -> float:
        return max(max((c[1] for c in self._closed), default=-math.inf), self._open_max)

    def _min(self) -> float:
        return min(min((c[5] for c in self._closed), default=math.inf), self._open_min)

    def _median(self) -> float:
        if not self._closed:
            return float(np.median(self._open_vals))
        if self._medians_cache is None:
            self._medians_cache = float(np.median([c[2] for c in self._closed]))
            self._mad_cache = float(np.median([c[4] for c in self._closed]))
        return self._medians_cache

    def _mad(self) -> float:
        if not self._closed:
            vals = np.asarray(self._open_vals)
            return _MAD_TO_STD * float(np.median(np.abs(vals - np.median(vals))))
        self._median()
        return self._mad_cache

    # -- the verdict -------------------------------------------------------------------------------------

    def update(self, value: float, now: float) -> Verdict | None:
        x, t = float(value), float(now)
        if not math.isfinite(x):
            return None
        t = max(t, self._latest)  # time never runs backwards here either
        self._latest = t
        self._seen += 1
        self._age(t)
        # The history itself must hold warmup values: right after start-up, with the recent span held back, it
        # holds only the first few, whose maximum and median would make any ordinary value a new maximum.
        if self._count < self._warmup or not self._covered():
            self._recent.append((t, x))
            return None
        top, med = self._max(), self._median()
        up = self._judge_side(x, top, med, top - med)
        down = None
        if self._direction == "both":
            bottom = self._min()
            down = self._judge_side(-x, -bottom, -med, med - bottom)
        score, spread, bar = up
        side, edge = "above", top
        if down is not None and down[0] > score:
            score, spread, bar = down
            side, edge, bar = "below", bottom, -bar
        anomalous = score > self._margin
        joined = x
        if anomalous and self._clip:
            joined = min(x, bar) if side == "above" else max(x, bar)
        self._recent.append((t, joined))
        self._score = score
        extreme = "maximum" if side == "above" else "minimum"
        word = "upper" if side == "above" else "lower"
        rng = "maximum - median" if side == "above" else "median - minimum"
        reason = (
            f"{self.name}: value {x:.6g} is {side if anomalous else 'within'} the bar {bar:.6g}: the {extreme} "
            f"{edge:.6g} of the history ({self._history_s:g} s, the latest {self._recent_s:g} s left out) "
            f"{'plus' if side == 'above' else 'minus'} {self._margin:g} x its {word} range {spread:.6g} ({rng}, "
            f"median {med:.6g})"
        )
        return Verdict(anomalous=anomalous, score=score, value=x, baseline=edge, detector=self.name, reason=reason,
                       threshold=self._margin, at=t)

    def _judge_side(self, x: float, top: float, med: float, span: float) -> tuple[float, float, float]:
        """(score, spread, bar) of ``x`` against a new maximum ``top``; the new minimum is judged on negated values."""
        floor = max(self._min_spread, _ABS_SPREAD_FLOOR) if self._min_spread is not None else max(
            _REL_SPREAD_FLOOR * abs(top), _ABS_SPREAD_FLOOR)
        spread = max(span if self._scale == "range" else self._mad(), floor)
        return max(0.0, (x - top) / spread), spread, top + self._margin * spread
