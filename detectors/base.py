"""The detector contract: ``update(value, now) -> Verdict | None`` and ``score()``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Detector", "Verdict"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a detector concluded about one value.

    Attributes:
        anomalous: whether ``score`` exceeded ``threshold``.
        score: non-negative, in the detector's own units (``|z|`` for EWMA and MAD, the larger
            CUSUM sum for CUSUM); larger means more unusual.
        value: the value judged.
        baseline: what the detector expected (EWMA mean, window median, CUSUM reference mean).
        detector: the detector's ``name``.
        reason: one human-readable line, fit for an alert annotation.
        threshold: the score above which a value is anomalous.
        at: the ``now`` the value was judged at.
    """

    anomalous: bool
    score: float
    value: float
    baseline: float
    detector: str
    reason: str
    threshold: float = math.nan
    at: float = math.nan


@runtime_checkable
class Detector(Protocol):
    """A streaming anomaly detector over one series.

    ``update`` returns ``None`` while the detector is warming up (and for non-finite values,
    which it ignores), otherwise a :class:`Verdict`. ``score`` is the latest score, NaN during
    warm-up. Implementations keep bounded memory and do no I/O.

    A detector whose threshold is not a score that a fraction can raise (a probability) says so with a class
    attribute ``scalable_threshold = False``; the sidecar then never raises it for a series that keeps paging.
    """

    name: str

    def update(self, value: float, now: float) -> Verdict | None: ...

    def score(self) -> float: ...
