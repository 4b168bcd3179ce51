"""Consistent probability sampling (OpenTelemetry's specification): thresholds, their ``ot=th:`` encoding in
``tracestate``, and the sampler that keeps every new trace while traffic is low and a budget of traces per second
above it. Pure arithmetic and one SDK ``Sampler``; ``orchestrator.tracing`` wires it."""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import TraceState

from orchestrator.errors import MuaiError


class TracingConfigError(MuaiError, ValueError):
    """The tracing section cannot be used (e.g. an endpoint that is not a URL, a sampling ratio out of range)."""


RANDOM_BITS = 56
_SPACE = 1 << RANDOM_BITS
_RANDOM_MASK = _SPACE - 1
# Thresholds keep 4 significant hex digits (the specification's default precision): short tracestate values, and a
# probability that the encoded threshold reproduces exactly, so the sidecar's 1/p is the p that decided.
_TH_GRAIN = 1 << 40
_RATE_INTERVAL_S = 1.0


def threshold_for(probability: float) -> int:
    """The 56-bit rejection threshold of ``probability`` (kept when ``randomness >= threshold``), rounded to 4 hex digits."""
    if probability >= 1.0:
        return 0
    t = int(round((1.0 - probability) * _SPACE / _TH_GRAIN)) * _TH_GRAIN
    return min(t, _SPACE - _TH_GRAIN)  # never 2**56: that would be "never sample", not a probability


def encode_threshold(threshold: int) -> str:
    """``th`` as the specification writes it: 14 hex digits with trailing zeros removed (``0`` for always)."""
    return f"{threshold:014x}".rstrip("0") or "0"


def parse_threshold(th: str) -> int | None:
    """The threshold of a ``th`` value, or None when it is not 1 to 14 hex digits."""
    if not 0 < len(th) <= 14:
        return None
    try:
        return int(th.ljust(14, "0"), 16)
    except ValueError:
        return None


def probability_of(threshold: int) -> float:
    return (_SPACE - threshold) / _SPACE


def with_threshold(trace_state: TraceState | None, th: str) -> TraceState:
    """``trace_state`` with ``ot=th:<th>``, keeping the ``ot`` entry's other sub-keys (``rv``) and other vendors'."""
    state = trace_state if trace_state is not None else TraceState()
    old = state.get("ot")
    parts = [p for p in old.split(";") if p and not p.startswith("th:")] if old else []
    value = ";".join([f"th:{th}", *parts])
    return state.update("ot", value) if old is not None else state.add("ot", value)


def randomness(trace_id: int, trace_state: TraceState | None) -> int:
    # An explicit ``rv`` wins; otherwise the trace id's low 56 bits, random under W3C Trace Context level 2.
    if trace_state is not None:
        ot = trace_state.get("ot")
        if ot:
            for part in ot.split(";"):
                if part.startswith("rv:") and len(part) == 17:
                    try:
                        return int(part[3:], 16)
                    except ValueError:
                        break
    return trace_id & _RANDOM_MASK


class AdjustableRatioSampler(Sampler):
    """OpenTelemetry consistent probability sampling of new traces, its probability following the traffic.

    Each root span is kept when the trace's randomness (``rv``, else the trace id's low 56 bits) reaches the
    threshold of the current probability, and a kept span records that threshold in its ``tracestate`` as
    ``ot=th:...``; its children inherit it, so every span says its own adjusted count (1/p) and the sidecar can
    weight it. The probability is ``ratio`` (``telemetry.tracing.sampling_ratio``, changeable at runtime) while
    new traces arrive at up to ``budget_per_s`` per second; above that it falls to ``budget_per_s / rate`` so about
    ``budget_per_s`` traces per second are kept however busy the server is (``None``: a fixed ratio). The rate is
    counted per second without a lock: a lost increment under a race only nudges the estimate.
    """

    def __init__(self, ratio: float, *, budget_per_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._ratio = self._check(ratio)
        if budget_per_s is not None and not budget_per_s > 0:
            raise TracingConfigError(f"sampling budget must be positive, got {budget_per_s}")
        self.budget_per_s = budget_per_s
        self._clock = clock
        self._interval_start = clock()
        self._count = 0
        self._rate = 0.0  # traces per second over the last complete interval
        self._threshold_of: tuple[float, int] = (1.0, 0)  # the last probability and its threshold

    @staticmethod
    def _check(ratio: float) -> float:
        if not 0.0 <= ratio <= 1.0:
            raise TracingConfigError(f"sampling ratio must be within [0, 1], got {ratio}")
        return ratio

    @property
    def ratio(self) -> float:
        return self._ratio

    def set_ratio(self, ratio: float) -> None:
        self._ratio = self._check(ratio)

    def probability(self) -> float:
        """The probability the next new trace is sampled with (counts it as one arrival)."""
        ratio = self._ratio
        budget = self.budget_per_s
        if budget is None:
            return ratio
        now = self._clock()
        elapsed = now - self._interval_start
        if elapsed >= _RATE_INTERVAL_S:
            # An idle gap of several intervals reads as a low rate, as it should.
            self._rate = self._count / elapsed
            self._interval_start, self._count = now, 0
        self._count += 1
        # The running interval's count bounds a burst before the interval ends.
        rate = max(self._rate, float(self._count))
        return ratio if rate * ratio <= budget else budget / rate

    def root_threshold(self) -> int | None:
        """The rejection threshold for the next new trace, counting it as one arrival; None when none is kept
        (probability 0). A new trace is kept when its randomness is at least this threshold."""
        p = self.probability()
        if p <= 0.0:
            return None
        last_p, threshold = self._threshold_of
        if p != last_p:
            # Under a budget the probability moves once per rate interval, not per request.
            threshold = threshold_for(p)
            self._threshold_of = (p, threshold)
        return threshold

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None) -> SamplingResult:
        return self._decide(parent_context, trace_id, attributes)

    def _decide(self, parent_context, trace_id, attributes) -> SamplingResult:
        threshold = self.root_threshold()
        parent = trace.get_current_span(parent_context).get_span_context() if parent_context is not None else None
        parent_state = parent.trace_state if parent is not None else None
        if threshold is None:
            return SamplingResult(Decision.DROP, None, parent_state)
        if randomness(trace_id, parent_state) < threshold:
            return SamplingResult(Decision.DROP, None, parent_state)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, with_threshold(parent_state, encode_threshold(threshold)))

    def get_description(self) -> str:
        return f"ConsistentProbabilitySampler{{ratio={self._ratio}, budget_per_s={self.budget_per_s}}}"


__all__ = [
    "RANDOM_BITS",
    "AdjustableRatioSampler",
    "TracingConfigError",
    "encode_threshold",
    "parse_threshold",
    "probability_of",
    "randomness",
    "threshold_for",
    "with_threshold",
]
