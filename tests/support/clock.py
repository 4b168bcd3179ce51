"""A clock the test moves by hand, for pure cores that take ``now`` (windows, detectors, rate limits)."""

from __future__ import annotations


class ManualClock:
    """A monotonic clock that moves only when told to, with a matching wall clock (epoch seconds).

    Call it for the monotonic reading (``now``); :meth:`wall` gives the epoch time that moves with it.
    """

    def __init__(self, start: float = 1_000.0, *, wall_start: float = 1_700_000_000.0) -> None:
        self.now = start
        self._wall_offset = wall_start - start

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self._wall_offset

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now
