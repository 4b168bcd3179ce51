"""The evaluation tick: monitor windows -> threshold rules and statistical detectors -> alert lifecycle.

:class:`Evaluator` is pure and synchronous: it reads the :class:`~sidecar.monitor.PerformanceMonitor` and the
latest resource samples, updates the rules and detectors of :mod:`detectors`, records what it sees in an
:class:`alerting.AlertBook`, and returns the transitions (firing / resolved snapshots) for the caller to hand
to the dispatchers. It never waits on a sink.

Alerts it raises (labels beyond ``alertname`` and ``severity`` in brackets):

* ``HighRequestLatency`` [model, operation]: a latency percentile over ``detectors.window`` above the threshold.
* ``HighErrorRate`` [model, operation]: the error ratio above the threshold.
* ``LowThroughput`` [model, operation]: the request rate below the floor (only once the series is a window old).
* ``LatencyAnomaly`` [model, operation, detector]: EWMA / MAD / CUSUM / anomaly likelihood / new maximum on the p95 latency of successive,
  non-overlapping intervals (``statistical.interval_s``), on a log scale, scoring only rises.
* ``HighGpuMemory`` [gpu, uuid]: framebuffer in use above the threshold percent.
* ``HighHostMemory``: host memory in use above the threshold percent.

Latency and error rules keep their state while a window holds fewer than ``min_count`` requests (NaN with
``nan_policy="hold"``): a model so slow that few requests finish must not resolve its own latency alert. Silence
itself is ``LowThroughput``'s to report (off until ``detectors.throughput.threshold_rps`` is set).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alerting import Alert, AlertBook
from detectors import (
    CusumDetector,
    EwmaDetector,
    LikelihoodDetector,
    MadDetector,
    NoveltyDetector,
    RecurringGate,
    RuleState,
    ThresholdRule,
    memory_percent_above,
    throughput_below,
)

from sidecar.collectors.gpu import GpuSample
from sidecar.collectors.host import HostSample
from sidecar.config import DetectorsConfig
from sidecar.monitor import REQUEST, PerformanceMonitor, SeriesKey

ALERT_LATENCY = "HighRequestLatency"
ALERT_ERRORS = "HighErrorRate"
ALERT_THROUGHPUT = "LowThroughput"
ALERT_ANOMALY = "LatencyAnomaly"
ALERT_GPU_MEMORY = "HighGpuMemory"
ALERT_HOST_MEMORY = "HighHostMemory"

_QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
_NAN = math.nan
# Latencies are judged on a log scale, where the step from 0.1 ms to nothing would look like a collapse and the
# way back like an explosion (log(1e-9) is -20.7): below a millisecond, all latencies read as one millisecond.
_MIN_LATENCY_S = 1e-3
# Points that build the likelihood detector's median before its residuals start (config: likelihood.warmup).
_LIKELIHOOD_BASELINE_WARMUP = 30
STATISTICAL_DETECTORS = ("ewma", "mad", "cusum", "likelihood", "novelty")


@dataclass(slots=True)
class DetectorScore:
    """The latest score of one statistical detector on one series (NaN while warming up)."""

    detector: str
    model: str
    operation: str
    score: float


class _Rise:
    """Scores only a rise above the baseline: for latency a drop is good news, judged normal, and joins the
    baseline (so the detector follows a model that got faster). Built on ``_judge``, the hook the detectors'
    shared base leaves to subclasses."""

    def _judge(self, x: float):
        score, baseline, threshold, detail = super()._judge(x)
        # The side of what was judged: for a smoothed EWMA that is the smoothed value, not x.
        above = x > baseline if math.isnan(self._signed) else self._signed > 0
        return (score if above else 0.0), baseline, threshold, detail


class _RiseEwma(_Rise, EwmaDetector):
    pass


class _RiseMad(_Rise, MadDetector):
    pass


class _RiseCusum(CusumDetector):
    """The upper CUSUM sum alone: upward drift."""

    def _judge(self, x: float):
        _, baseline, threshold, detail = super()._judge(x)
        return self.sums[0], baseline, threshold, detail


class _SeriesDetectors:
    __slots__ = ("latency", "errors", "throughput", "stats", "last_anomaly", "anomaly_firing", "interval_start",
                 "labels", "quiet_until", "pages")

    def __init__(self, key: SeriesKey) -> None:
        self.latency: ThresholdRule | None = None
        self.errors: ThresholdRule | None = None
        self.throughput: ThresholdRule | None = None
        self.stats: dict[str, object] = {}
        self.last_anomaly: dict[str, float] = {}
        self.anomaly_firing: set[str] = set()
        self.interval_start: float | None = None
        self.quiet_until = -math.inf  # no new anomaly alert fires before this (statistical.repeat_hold_s)
        self.pages: dict[str, deque[float]] = {}  # when each detector's alert fired (statistical.repeat_raise)
        self.labels = {"model": key.model, "operation": key.operation}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class Evaluator:
    """Runs every rule and detector once per tick and keeps the alert book in step.

    Args:
        config: the ``detectors`` section.
        monitor: the performance monitor it reads.
        book: the alert lifecycle it writes (``now`` there is wall-clock seconds since the epoch).
    """

    def __init__(self, config: DetectorsConfig, *, monitor: PerformanceMonitor, book: AlertBook) -> None:
        self.monitor = monitor
        self.book = book
        self.config = config
        self._series: dict[SeriesKey, _SeriesDetectors] = {}
        self._gpu_rules: dict[int, ThresholdRule] = {}
        self._host_rule: ThresholdRule | None = None
        self.ticks = 0

    # -- configuration ---------------------------------------------------------------------------------

    def reconfigure(self, config: DetectorsConfig) -> None:
        """Apply new runtime values: thresholds and ``for`` durations in place, statistical detectors rebuilt
        when their parameters changed (they warm up again)."""
        old, self.config = self.config, config
        for det in self._series.values():
            for rule, cfg in ((det.latency, config.latency), (det.errors, config.error_rate)):
                if rule is not None:
                    rule.for_s = cfg.for_s
            if det.latency is not None:
                if config.latency.quantile != old.latency.quantile:
                    det.latency = None  # a different quantile is a different rule; rebuilt below
                else:
                    det.latency.threshold = config.latency.threshold_s
                    det.latency.keep_firing_for_s = config.latency.keep_firing_for_s
            if det.errors is not None:
                det.errors.threshold = config.error_rate.threshold
            if det.throughput is not None:
                if config.throughput.threshold_rps is None:
                    det.throughput = None
                else:
                    det.throughput.threshold = config.throughput.threshold_rps
                    det.throughput.for_s = config.throughput.for_s
            if config.statistical != old.statistical:
                det.stats = {}
        for rule in self._gpu_rules.values():
            rule.threshold = config.gpu_memory.threshold_percent
            rule.for_s = config.gpu_memory.for_s
        if self._host_rule is not None:
            self._host_rule.threshold = config.host_memory.threshold_percent
            self._host_rule.for_s = config.host_memory.for_s

    def _make_stats(self) -> dict[str, object]:
        st = self.config.statistical
        # Points are log latencies, so an absolute floor on their spread is a relative one on latency.
        floor = math.log1p(st.min_rel_spread)
        out: dict[str, object] = {}
        if st.ewma.enabled:
            out["ewma"] = _RiseEwma(
                alpha=st.ewma.alpha, z_threshold=st.ewma.z_threshold, warmup=st.ewma.warmup, min_std=floor,
                smoothing=st.ewma.smoothing,
                adapt_after=st.adapt_after, clip_anomalies=st.clip_anomalies, name="ewma",
            )
            if st.ewma.recurring_days:
                # The EWMA's mean trails a daily cycle, so each day's peak sits far above it; a peak reached at this
                # time on each of the last days is the cycle, not an incident.
                out["ewma"] = RecurringGate(out["ewma"], days=st.ewma.recurring_days, window_s=st.ewma.recurring_window_s)
        if st.mad.enabled:
            out["mad"] = _RiseMad(
                window=st.mad.window, z_threshold=st.mad.z_threshold, warmup=st.mad.warmup, min_std=floor,
                adapt_after=st.adapt_after, clip_anomalies=st.clip_anomalies, name="mad",
            )
        if st.cusum.enabled:
            out["cusum"] = _RiseCusum(
                k=st.cusum.k, h=st.cusum.h, warmup=st.cusum.warmup, min_std=floor, adapt_after=st.adapt_after, name="cusum"
            )
        if st.likelihood.enabled:
            lk = st.likelihood
            # Its median learns every point (a lasting shift stops scoring once it is the median), so adapt_after and
            # clip_anomalies have nothing to act on; only a rise scores, as for the others.
            out["likelihood"] = LikelihoodDetector(
                window=lk.window, baseline_warmup=_LIKELIHOOD_BASELINE_WARMUP, warmup=lk.warmup,
                short_window=lk.short_window, history=lk.history, epsilon=lk.epsilon, scale=lk.scale, direction="up", min_z=lk.min_z,
                min_std=floor, name="likelihood",
            )
        if st.novelty.enabled:
            nv = st.novelty
            # The upper range is floored like the others' spread: on a near-flat series a new maximum must still be a
            # rise of a few percent of latency.
            out["novelty"] = NoveltyDetector(
                history_s=nv.history_s, recent_s=nv.recent_s, margin=nv.margin, min_history_s=nv.min_history_s,
                clip_anomalies=st.clip_anomalies, min_spread=floor, scale=nv.scale, direction=nv.direction,
                name="novelty",
            )
        return out

    # -- the tick ----------------------------------------------------------------------------------------

    def tick(
        self,
        now: float,
        wall: float,
        *,
        gpus: Sequence[GpuSample] = (),
        host: HostSample | None = None,
    ) -> list[Alert]:
        """Evaluate everything at ``now`` (monotonic) / ``wall`` (epoch); return alert transitions to notify."""
        out: list[Alert] = []
        self.ticks += 1
        cfg = self.config
        window = cfg.window
        horizon = self.monitor.windows[window]
        live = set(self.monitor.keys(scope=REQUEST))
        for key in [k for k in self._series if k not in live]:
            self._forget(key, wall, out)
        for key in sorted(live, key=lambda k: (k.model, k.operation)):
            det = self._series.get(key)
            if det is None:
                det = self._series[key] = _SeriesDetectors(key)
            latency, error_ratio = self.monitor.latency_and_errors(key, window, now)
            enough = latency.count >= cfg.latency.min_count
            self._latency(det, latency, enough, now, wall, out)
            self._errors(det, latency.count, error_ratio, now, wall, out)
            self._throughput(det, key, latency.rate_per_s, horizon, now, wall, out)
            self._statistical(det, key, horizon, now, wall, out)
        self._gpu_memory(gpus, now, wall, out)
        self._host_memory(host, now, wall, out)
        return out

    def _observe(self, out: list[Alert], labels: dict, annotations: dict | None, *, wall: float, **kw) -> Alert | None:
        transition = self.book.observe(labels, annotations, now=wall, **kw)
        if transition is not None:
            out.append(transition)
        return transition

    def _latency(self, det, stats, enough: bool, now: float, wall: float, out: list[Alert]) -> None:
        cfg = self.config.latency
        if not cfg.enabled:
            if det.latency is not None:
                det.latency = None
                self._observe(out, {"alertname": ALERT_LATENCY, "severity": cfg.severity, **det.labels}, None, wall=wall, active=False)
            return
        if det.latency is None:
            # "hold": too few requests in the window is no evidence that latency recovered.
            det.latency = ThresholdRule(
                name=ALERT_LATENCY, threshold=cfg.threshold_s, above=True, for_s=cfg.for_s,
                keep_firing_for_s=cfg.keep_firing_for_s, nan_policy="hold", signal=f"{cfg.quantile} latency (s)",
            )
        value = getattr(stats, cfg.quantile) if enough else _NAN
        state = det.latency.evaluate(value, now)
        labels = {"alertname": ALERT_LATENCY, "severity": cfg.severity, **det.labels}
        ann = None
        if state is not RuleState.INACTIVE and math.isfinite(value):
            ann = {
                "summary": f"{cfg.quantile} latency of {det.labels['model']}/{det.labels['operation']} is {_fmt(value)} s",
                "description": f"{cfg.quantile} request latency over {self.config.window} above {_fmt(cfg.threshold_s)} s "
                f"for {_fmt(cfg.for_s)} s ({stats.count} requests)",
            }
        self._observe(out, labels, ann, wall=wall, state=state,
                      value=value if math.isfinite(value) else None, threshold=cfg.threshold_s)

    def _errors(self, det, count: int, ratio: float, now: float, wall: float, out: list[Alert]) -> None:
        cfg = self.config.error_rate
        labels = {"alertname": ALERT_ERRORS, "severity": cfg.severity, **det.labels}
        if not cfg.enabled:
            if det.errors is not None:
                det.errors = None
                self._observe(out, labels, None, wall=wall, active=False)
            return
        if det.errors is None:
            det.errors = ThresholdRule(
                name=ALERT_ERRORS, threshold=cfg.threshold, above=True, for_s=cfg.for_s, nan_policy="hold", signal="error ratio"
            )
        value = ratio if count >= cfg.min_count else _NAN
        state = det.errors.evaluate(value, now)
        ann = None
        if state is not RuleState.INACTIVE and math.isfinite(value):
            ann = {
                "summary": f"error ratio of {det.labels['model']}/{det.labels['operation']} is {_fmt(value)}",
                "description": f"error ratio over {self.config.window} above {_fmt(cfg.threshold)} for {_fmt(cfg.for_s)} s "
                f"({count} requests)",
            }
        self._observe(out, labels, ann, wall=wall, state=state,
                      value=value if math.isfinite(value) else None, threshold=cfg.threshold)

    def _throughput(self, det, key, rate: float, horizon: float, now: float, wall: float, out: list[Alert]) -> None:
        cfg = self.config.throughput
        labels = {"alertname": ALERT_THROUGHPUT, "severity": cfg.severity, **det.labels}
        if cfg.threshold_rps is None:
            if det.throughput is not None:
                det.throughput = None
                self._observe(out, labels, None, wall=wall, active=False)
            return
        if det.throughput is None:
            det.throughput = throughput_below(cfg.threshold_rps, for_s=cfg.for_s, name=ALERT_THROUGHPUT)
        # A window younger than its horizon under-reads its rate: no verdict until it has covered one.
        value = rate if now - self.monitor.first_seen(key) >= horizon else _NAN
        state = det.throughput.evaluate(value, now)
        ann = None
        if state is not RuleState.INACTIVE and math.isfinite(value):
            ann = {
                "summary": f"throughput of {det.labels['model']}/{det.labels['operation']} is {_fmt(value)} req/s",
                "description": f"request rate over {self.config.window} below {_fmt(cfg.threshold_rps)}/s for {_fmt(cfg.for_s)} s",
            }
        self._observe(out, labels, ann, wall=wall, state=state,
                      value=value if math.isfinite(value) else None, threshold=cfg.threshold_rps)

    def _interval_p95(self, det: _SeriesDetectors, key: SeriesKey, horizon: float, now: float) -> float | None:
        """The p95 of the requests that finished since the previous point, once per ``interval_s``; None otherwise.

        A quiet interval (under ``min_count`` requests) is merged with the next ones, for at most one
        ``detectors.window``, after which its requests are dropped and a new interval starts.
        """
        st = self.config.statistical
        if det.interval_start is None:
            self.monitor.take_fresh(key)  # starts collecting this series' latencies
            det.interval_start = now
            return None
        elapsed = now - det.interval_start
        if elapsed < st.interval_s:
            return None
        if self.monitor.fresh_count(key) < st.min_count:
            if elapsed >= max(st.interval_s, horizon):
                self.monitor.take_fresh(key)
                det.interval_start = now
            return None
        values = self.monitor.take_fresh(key)
        det.interval_start = now
        return float(np.quantile(values, 0.95))

    def _statistical(
        self, det: _SeriesDetectors, key: SeriesKey, horizon: float, now: float, wall: float, out: list[Alert]
    ) -> None:
        st = self.config.statistical
        if not det.stats and any(getattr(st, name).enabled for name in STATISTICAL_DETECTORS):
            det.stats = self._make_stats()

        def labels(name: str) -> dict:
            return {"alertname": ALERT_ANOMALY, "severity": st.severity, "detector": name, **det.labels}

        for name in [n for n in det.last_anomaly if n not in det.stats]:  # turned off at runtime: its alert goes too
            del det.last_anomaly[name]
            det.anomaly_firing.discard(name)
            self._observe(out, labels(name), None, wall=wall, active=False)
        if not det.stats:
            return
        p95 = self._interval_p95(det, key, horizon, now)
        if p95 is None:
            return
        self._judge_point(det, p95, now, wall, out)

    def judge_point(self, model: str, operation: str, p95: float, now: float, wall: float) -> list[Alert]:
        """Feed one interval's p95 latency straight to the statistical detectors of ``model``/``operation``,
        as :meth:`tick` does once per ``statistical.interval_s``; return the alert transitions.

        For replaying a recorded series through exactly the sidecar's detectors and alert lifecycle (the NAB
        benchmark does); the series needs no traffic in the monitor.
        """
        key = SeriesKey(REQUEST, model, operation)
        det = self._series.get(key)
        if det is None:
            det = self._series[key] = _SeriesDetectors(key)
        if not det.stats:
            det.stats = self._make_stats()
        out: list[Alert] = []
        self._judge_point(det, p95, now, wall, out)
        return out

    def _judge_point(self, det: _SeriesDetectors, p95: float, now: float, wall: float, out: list[Alert]) -> None:
        st = self.config.statistical

        def labels(name: str) -> dict:
            return {"alertname": ALERT_ANOMALY, "severity": st.severity, "detector": name, **det.labels}

        point = math.log(max(p95, _MIN_LATENCY_S))
        for name, detector in det.stats.items():
            verdict = detector.update(point, now)
            anomalous = verdict is not None and verdict.anomalous
            bar = math.nan if verdict is None else verdict.threshold
            pages = det.pages.get(name)
            if pages:
                while pages and pages[0] <= now - st.repeat_window_s:
                    pages.popleft()
                if getattr(detector, "scalable_threshold", True):
                    # Paged on this series recently: a detector that keeps paging on one series is too tight for it.
                    bar *= 1.0 + st.repeat_raise * len(pages)
                    anomalous = anomalous and verdict.score > bar
            if anomalous and name not in det.anomaly_firing and (
                now < det.quiet_until or any(other != name for other in det.anomaly_firing)
            ):
                # One page per incident: while another detector's alert fires on this series, or soon after one
                # resolved, this detector's finding is the same incident (or its echo), so it counts as normal.
                anomalous = False
            if anomalous:
                det.last_anomaly[name] = now
                value, baseline = math.exp(verdict.value), math.exp(verdict.baseline)
                if name == "likelihood":
                    why = (f"likelihood {verdict.score:.6f} above {verdict.threshold:.6g}: the recent intervals' p95 rose "
                           "further above their rolling median than this series has shown in its history")
                elif name == "novelty":
                    if verdict.value >= verdict.baseline:
                        why = (f"{verdict.score:.2f} upper ranges above the highest p95 of the history (threshold "
                               f"{bar:g}): higher than this series has been for days")
                    else:
                        why = (f"{verdict.score:.2f} lower ranges below the lowest p95 of the history (threshold "
                               f"{bar:g}): lower than this series has been for days (requests failing "
                               "fast, or not doing their work?)")
                else:
                    why = f"score {verdict.score:.2f} above {bar:g} (sigmas of log latency)"
                if bar != verdict.threshold:
                    why += (f"; the threshold is {verdict.threshold:g} raised for {len(pages)} page(s) this detector sent on "
                            f"this series in the last {st.repeat_window_s:g} s")
                ann = {
                    "summary": f"p95 latency of {det.labels['model']}/{det.labels['operation']} is unusual: {_fmt(value)} s "
                    f"(expected about {_fmt(baseline)} s)",
                    "description": f"{name}: the latest interval's p95 is {_fmt(value / baseline)}x its baseline; {why}",
                    "score": _fmt(verdict.score),
                }
                # A detector's section may carry its own `for` delay (novelty's spikes last one point).
                for_s = getattr(getattr(st, name), "for_s", st.for_s)
                fired = self._observe(out, labels(name), ann, wall=wall, active=True, for_s=for_s,
                                      value=value, threshold=bar)
                if fired is not None:
                    det.anomaly_firing.add(name)
                    det.pages.setdefault(name, deque()).append(now)
            elif name in det.last_anomaly and (
                # A pending anomaly needs anomalous points throughout for_s; a firing one clears after clear_after_s.
                (verdict is not None and name not in det.anomaly_firing)
                or now - det.last_anomaly[name] >= st.clear_after_s
            ):
                del det.last_anomaly[name]
                if name in det.anomaly_firing:
                    det.quiet_until = now + st.repeat_hold_s
                det.anomaly_firing.discard(name)
                self._observe(out, labels(name), None, wall=wall, active=False)

    def _gpu_memory(self, gpus: Sequence[GpuSample], now: float, wall: float, out: list[Alert]) -> None:
        cfg = self.config.gpu_memory
        for gpu in gpus:
            labels = {"alertname": ALERT_GPU_MEMORY, "severity": cfg.severity, "gpu": str(gpu.index), "uuid": gpu.uuid}
            rule = self._gpu_rules.get(gpu.index)
            if not cfg.enabled:
                if rule is not None:
                    del self._gpu_rules[gpu.index]
                    self._observe(out, labels, None, wall=wall, active=False)
                continue
            if rule is None:
                rule = self._gpu_rules[gpu.index] = memory_percent_above(cfg.threshold_percent, for_s=cfg.for_s, name=ALERT_GPU_MEMORY)
            pct = gpu.framebuffer_used_percent
            value = _NAN if pct is None else pct
            state = rule.evaluate(value, now)
            ann = None
            if state is not RuleState.INACTIVE:
                ann = {"summary": f"GPU {gpu.index} framebuffer {_fmt(value)}% used",
                       "description": f"GPU {gpu.index} ({gpu.name}) memory above {_fmt(cfg.threshold_percent)}% for {_fmt(cfg.for_s)} s"}
            self._observe(out, labels, ann, wall=wall, state=state,
                          value=None if pct is None else pct, threshold=cfg.threshold_percent)

    def _host_memory(self, host: HostSample | None, now: float, wall: float, out: list[Alert]) -> None:
        cfg = self.config.host_memory
        labels = {"alertname": ALERT_HOST_MEMORY, "severity": cfg.severity}
        if not cfg.enabled:
            if self._host_rule is not None:
                self._host_rule = None
                self._observe(out, labels, None, wall=wall, active=False)
            return
        if host is None:
            return
        if self._host_rule is None:
            self._host_rule = memory_percent_above(cfg.threshold_percent, for_s=cfg.for_s, name=ALERT_HOST_MEMORY)
        state = self._host_rule.evaluate(host.memory_percent, now)
        ann = None
        if state is not RuleState.INACTIVE:
            ann = {"summary": f"host memory {_fmt(host.memory_percent)}% used",
                   "description": f"host memory above {_fmt(cfg.threshold_percent)}% for {_fmt(cfg.for_s)} s"}
        self._observe(out, labels, ann, wall=wall, state=state, value=host.memory_percent, threshold=cfg.threshold_percent)

    def _forget(self, key: SeriesKey, wall: float, out: list[Alert]) -> None:
        det = self._series.pop(key)
        cfg = self.config
        names = [(ALERT_LATENCY, cfg.latency.severity, {}), (ALERT_ERRORS, cfg.error_rate.severity, {}),
                 (ALERT_THROUGHPUT, cfg.throughput.severity, {})]
        names += [(ALERT_ANOMALY, cfg.statistical.severity, {"detector": n}) for n in STATISTICAL_DETECTORS]
        for alertname, severity, extra in names:
            self._observe(out, {"alertname": alertname, "severity": severity, **extra, **det.labels}, None, wall=wall, active=False)

    # -- introspection -----------------------------------------------------------------------------------

    def scores(self) -> list[DetectorScore]:
        """Latest score of every statistical detector on every series."""
        out = []
        for key, det in self._series.items():
            for name, detector in det.stats.items():
                out.append(DetectorScore(name, key.model, key.operation, detector.score()))
        return out


__all__ = [
    "ALERT_ANOMALY",
    "ALERT_ERRORS",
    "ALERT_GPU_MEMORY",
    "ALERT_HOST_MEMORY",
    "ALERT_LATENCY",
    "ALERT_THROUGHPUT",
    "DetectorScore",
    "Evaluator",
]
