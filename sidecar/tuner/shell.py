"""The tuner's thin shell: readings from the sidecar's windows and the orchestrator, decisions out through its admin API.

Each tick: ``GET /admin/config`` (the settings as they are: the orchestrator is the authority), ``GET /metrics``
(queue depth, rejections, KV-cache evictions), the monitor's windows; then :class:`TunerPolicy` decides, and one
``PATCH /admin/config`` applies what it decided. Every decision is a log line, a metric, a row in the history and
an entry in ``GET /api/v1/tuner``. When the orchestrator cannot be reached the tuner changes nothing and says so:
the last applied settings stay where they are, and serving never depends on the sidecar.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from sidecar.otlp import REQUEST
from sidecar.tls import client_ssl_context
from sidecar.tuner.config import TunerConfig
from sidecar.tuner.policy import (
    KNOBS,
    MAX_BATCH,
    NULLABLE_KNOBS,
    REASONS,
    ROLLBACK,
    Bounds,
    Decision,
    LearnedTable,
    ModelReading,
    Readings,
    TunerPolicy,
)
from sidecar.tuner.readings import histogram_delta, histogram_quantile, histogram_share_within
from sidecar.tuner.store import TunerStore

if TYPE_CHECKING:
    from sidecar.monitor import PerformanceMonitor

log = logging.getLogger("muai.sidecar.tuner")

_MIN_BATCH = "batching.min_batch_size"


def policy_from_config(config: TunerConfig, *, learned: LearnedTable | None = None) -> TunerPolicy:
    bounds = {k: Bounds(v.min, v.max, v.max_step_ratio, v.min_step) for k, v in config.knobs.items()}
    return TunerPolicy(
        bounds=bounds, enabled=config.enabled, deadband=config.deadband, admission_share=config.admission_share,
        timeout_share=config.timeout_share, cooldown_s=config.cooldown_s, trial_s=config.trial_s,
        rollback_tolerance=config.rollback_tolerance, bar_s=config.bar_s, attainment_target=config.attainment_target,
        memory_reserve_ratio=config.memory_reserve_ratio,
        learned=learned if learned is not None else LearnedTable(attainment_target=config.attainment_target),
    )


def default_state_dir() -> Path:
    return Path(os.environ.get("MUAI_CACHE_DIR") or Path.home() / ".cache" / "muai") / "sidecar"


@dataclass(slots=True)
class OrchestratorView:
    """What one tick read off the orchestrator."""

    settings: dict[str, Any]
    continuous_batching: set[str] = field(default_factory=set)
    waiting: dict[str, float] = field(default_factory=dict)
    running: dict[str, float] = field(default_factory=dict)
    rejected_total: float = 0.0
    finished_total: float = 0.0
    kv_evictions_total: float = 0.0
    kv_bytes: float = 0.0
    latency_buckets: dict[str, dict[float, float]] = field(default_factory=dict)
    """Per model, ``muai_request_latency_seconds``' cumulative bucket counts (upper bound -> count), engines summed."""
    queue_buckets: dict[str, dict[float, float]] = field(default_factory=dict)
    """The same of ``muai_request_queue_seconds``: the wait for a running slot."""


# Refusals of admission the tuner's own knobs cause: a full queue, or one waiting past its bound.
_ADMISSION_REJECTS = frozenset({"queue_full", "queue_wait"})


def parse_metrics(text: str) -> OrchestratorView:
    """The counters and gauges the tuner reads from the orchestrator's exposition (settings come from the admin API)."""
    view = OrchestratorView(settings={})
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "muai_requests_waiting":
                view.waiting[labels.get("model", "")] = value
            elif name == "muai_requests_running":
                view.running[labels.get("model", "")] = value
            elif name == "muai_requests_total" and labels.get("status") == "ok":
                view.finished_total += value
            elif name == "muai_rejected_requests_total" and labels.get("reason") in _ADMISSION_REJECTS:
                view.rejected_total += value
            elif name in ("muai_request_latency_seconds_bucket", "muai_request_queue_seconds_bucket"):
                into = view.latency_buckets if name.startswith("muai_request_latency") else view.queue_buckets
                buckets = into.setdefault(labels.get("model", ""), {})
                le = float(labels.get("le", "inf"))
                buckets[le] = buckets.get(le, 0.0) + value
            elif name == "muai_kv_cache_evictions_total":
                view.kv_evictions_total += value
            elif name == "muai_kv_cache_bytes":
                view.kv_bytes += value
            elif name == "muai_engine_requests_running":
                view.continuous_batching.add(labels.get("model", ""))
    return view


def flat_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs' current values out of ``GET /admin/config``'s nested document."""
    out: dict[str, Any] = {}
    missing = object()
    for key in (*KNOBS, _MIN_BATCH):
        node: Any = config
        for part in key.split("."):
            node = node.get(part, missing) if isinstance(node, Mapping) else missing
        # A knob whose None means "off" is a setting when the document has it (an orchestrator without the key
        # cannot take it, so it is not one).
        if node is not missing and (node is not None or key in NULLABLE_KNOBS):
            out[key] = node
    return out


class _TunerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.setting = Gauge("muai_tuner_setting", "Current value of each knob the tuner manages, as last read or set.",
                             ["knob"], registry=registry)
        self.decisions = Counter("muai_tuner_decisions", "Knob changes the tuner applied, by knob and reason.",
                                 ["knob", "reason"], registry=registry)
        self.rollbacks = Counter("muai_tuner_rollbacks", "Changes undone after goodput or SLO attainment fell, by knob.",
                                 ["knob"], registry=registry)
        self.errors = Counter("muai_tuner_errors", "Tuner ticks that could not read or apply, by kind.",
                              ["kind"], registry=registry)
        self.up = Gauge("muai_tuner_orchestrator_up", "1 while the tuner's last call to the orchestrator succeeded.",
                        registry=registry)
        self.goodput = Gauge("muai_tuner_goodput_requests_per_second",
                             "Requests per second that met their SLO, over the tuner's window.", registry=registry)
        self._decision_children = {(k, r): self.decisions.labels(k, r) for k in KNOBS for r in REASONS}
        self._rollback_children = {k: self.rollbacks.labels(k) for k in KNOBS}
        self._error_children = {k: self.errors.labels(k) for k in ("read", "apply", "refused", "tick")}

    def decided(self, d: Decision) -> None:
        self._decision_children[(d.knob, d.reason)].inc()
        if d.reason == ROLLBACK:
            self._rollback_children[d.knob].inc()

    def error(self, kind: str) -> None:
        self._error_children[kind].inc()


class Tuner:
    """One tuner bound to one sidecar's monitor and one orchestrator."""

    def __init__(
        self,
        config: TunerConfig,
        *,
        monitor: PerformanceMonitor,
        orchestrator_url: str | None,
        registry: CollectorRegistry,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        host: Callable[[], Any] = lambda: None,
        gpus: Callable[[], Any] = lambda: (),
        ca_file: str | None = None,
    ) -> None:
        self.config = config
        self.ca_file = ca_file
        self.monitor = monitor
        self.url = orchestrator_url.rstrip("/") if orchestrator_url else None
        self.clock = clock
        self.wall_clock = wall_clock
        self.host = host
        self.gpus = gpus
        self.metrics = _TunerMetrics(registry)
        self.active, self.reason = self._activity()
        self.store: TunerStore | None = None
        learned = LearnedTable(attainment_target=config.attainment_target)
        self.warm_observations = 0
        if self.active:
            directory = Path(config.state_dir) if config.state_dir else default_state_dir()
            self.store = TunerStore(directory / "tuner.sqlite3", keep_s=config.history_keep_s)
            self.warm_observations = learned.load(self.store.observations(since_wall=wall_clock() - config.history_keep_s))
        self.policy = policy_from_config(config, learned=learned)
        self.decisions: deque[dict[str, Any]] = deque(maxlen=config.decisions_kept)
        if self.store is not None:
            self.decisions.extend(self.store.recent_decisions(config.decisions_kept))
        self.settings: dict[str, Any] = {}
        # knob -> (source, value) of the last change the tuner applied; a restarted tuner still knows who set what.
        self.sources: dict[str, tuple[str, Any]] = {}
        for d in self.decisions:
            self.sources[str(d["knob"])] = (str(d["source"]), d["new"])
        self.last_readings: dict[str, Any] | None = None
        self.last_error: str | None = None
        self.ticks = 0
        self._prev: tuple[float, float, float, float] | None = None  # (now, rejected, evictions, finished totals)
        # The latency and queue histograms as the last tick read them: the requests finished since are the difference.
        self._prev_latency: tuple[dict[str, dict[float, float]], dict[str, dict[float, float]]] = ({}, {})
        self._session: aiohttp.ClientSession | None = None
        for model, slo in config.models.items():
            monitor.track_slo(model, slo.p99_s)
        self._tracked: set[str] = set(config.models)

    def _activity(self) -> tuple[bool, str]:
        if not self.config.enabled:
            return False, "disabled (sidecar.tuner.enabled is false): the orchestrator's static configuration stands"
        if self.url is None:
            return False, "no orchestrator to tune (sidecar.collectors.orchestrator.url is unset)"
        if self.config.admin_token is None:
            return False, "no admin token (sidecar.tuner.admin_token): the orchestrator's admin API needs one"
        return True, "tuning"

    # -- the loop ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        if not self.active:
            log.info("tuner off: %s", self.reason)
            return
        log.info("tuner on: %s every %.3gs, %d observations of history loaded", self.url, self.config.interval_s,
                 self.warm_observations)
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        token = self.config.admin_token.get_secret_value() if self.config.admin_token else ""
        # An https orchestrator is verified against sidecar.collectors.orchestrator.ca_file (else the system's CAs).
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(self.ca_file, key="sidecar.collectors.orchestrator.ca_file"))
        self._session = aiohttp.ClientSession(
            timeout=timeout, headers={"Authorization": f"Bearer {token}"}, connector=connector
        )
        try:
            failing = False
            while True:
                try:
                    await self.tick()
                    failing = False
                except Exception:  # noqa: BLE001 - a bad tick must not end tuning; log once per streak, count each
                    self.metrics.error("tick")
                    if not failing:
                        log.exception("tuner tick failed; retrying every interval")
                    failing = True
                await asyncio.sleep(self.config.interval_s)
        finally:
            await self._session.close()
            if self.store is not None:
                self.store.close()

    async def tick(self) -> list[Decision]:
        """Read, decide, apply once. Never raises for the orchestrator's sake: it logs, counts and waits."""
        self.ticks += 1
        try:
            view = await self._read()
        except Exception as exc:  # noqa: BLE001 - unreachable or refusing: change nothing, say so once per streak
            self.metrics.up.set(0)
            self.metrics.error("read")
            self._note_error(f"reading the orchestrator failed: {type(exc).__name__}: {exc}")
            return []
        self.metrics.up.set(1)
        self.settings = view.settings
        for knob in KNOBS:
            if view.settings.get(knob) is not None:
                self.metrics.setting.labels(knob).set(float(view.settings[knob]))
        now = self.clock()
        readings = self.readings(view, now)
        self.last_readings = readings.summary()
        self.metrics.goodput.set(readings.goodput_per_s)
        result = self.policy.tick(readings, now)
        wall = self.wall_clock()
        if self.store is not None and result.observation is not None:
            self.store.add_observation(result.observation, wall)
            if self.ticks % 1000 == 0:
                self.store.prune(wall)
        if result.decisions:
            await self._apply(result.decisions, wall)
        elif self.last_error is not None and self.last_error.startswith("reading"):
            log.info("tuner: the orchestrator answers again")
            self.last_error = None
        return result.decisions

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("tuner: %s; the last applied settings stay in place", message)
        self.last_error = message

    async def _read(self) -> OrchestratorView:
        assert self._session is not None
        async with self._session.get(f"{self.url}/admin/config") as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET /admin/config answered {resp.status}")
            doc = await resp.json()
        try:
            async with self._session.get(f"{self.url}/metrics") as resp:
                view = parse_metrics(await resp.text()) if resp.status == 200 else OrchestratorView(settings={})
        except (aiohttp.ClientError, TimeoutError, ValueError):
            view = OrchestratorView(settings={})  # counters missing: the tuner still sees latency and settings
        view.settings = flat_settings(doc.get("config", {}))
        return view

    def readings(self, view: OrchestratorView, now: float) -> Readings:
        """The policy's inputs from the monitor's windows and one orchestrator view."""
        window = self.config.window
        models: list[ModelReading] = []
        seen: set[str] = set()
        for key in self.monitor.keys(scope=REQUEST):
            if key.model not in self._tracked:
                self.monitor.track_slo(key.model, self.config.slo_for(key.model).p99_s)
                self._tracked.add(key.model)
            stats = self.monitor.series_stats(key, window, now)
            slo = self.config.slo_for(key.model)
            latency = stats.latency
            first = key.model not in seen
            seen.add(key.model)
            tokens = math.nan
            if stats.requests and stats.input_tokens_per_s:
                tokens = stats.input_tokens_per_s * stats.window_s / stats.requests
            fresh_n, fresh_p99, fresh_att, fresh_queue = 0.0, math.nan, math.nan, math.nan
            if first and key.model in view.latency_buckets and key.model in self._prev_latency[0]:
                delta = histogram_delta(view.latency_buckets[key.model], self._prev_latency[0][key.model])
                fresh_n = delta[-1][1] if delta else 0.0
                fresh_p99 = histogram_quantile(delta, 0.99)
                fresh_att = histogram_share_within(delta, slo.p99_s)
                if key.model in view.queue_buckets and key.model in self._prev_latency[1]:
                    queued = histogram_delta(view.queue_buckets[key.model], self._prev_latency[1][key.model])
                    fresh_queue = histogram_quantile(queued, 0.99)
            models.append(ModelReading(
                model=key.model,
                slo_p99_s=slo.p99_s,
                requests_per_s=stats.throughput_rps if stats.requests else 0.0,
                p99_s=latency.p99,
                p50_s=latency.p50,
                attainment=self.monitor.slo_attainment(key, window, now),
                ttft_p99_s=stats.ttft.p99 if stats.ttft is not None else math.nan,
                slo_ttft_s=slo.ttft_p99_s,
                error_ratio=0.0 if math.isnan(stats.error_ratio) else stats.error_ratio,
                waiting=int(view.waiting.get(key.model, 0)) if first else 0,
                running=int(view.running.get(key.model, 0)) if first else 0,
                mean_input_tokens=tokens,
                continuous_batching=key.model in view.continuous_batching,
                fresh_requests=fresh_n,
                fresh_p99_s=fresh_p99,
                fresh_queue_p99_s=fresh_queue,
                fresh_attainment=fresh_att,
            ))
        rejected_rate = evictions_rate = 0.0
        served_rate = math.nan
        if self._prev is not None and now > self._prev[0]:
            dt = now - self._prev[0]
            rejected_rate = max(0.0, view.rejected_total - self._prev[1]) / dt
            evictions_rate = max(0.0, view.kv_evictions_total - self._prev[2]) / dt
            # The orchestrator's own count of finished requests: fresh, where the windows wait for spans to be
            # exported (seconds) and average over the whole window.
            served_rate = max(0.0, view.finished_total - self._prev[3]) / dt
        self._prev = (now, view.rejected_total, view.kv_evictions_total, view.finished_total)
        self._prev_latency = (view.latency_buckets, view.queue_buckets)
        host = self.host()
        used = [g.framebuffer_used_percent for g in self.gpus() or () if g.framebuffer_used_percent is not None]
        settings = dict(view.settings)
        return Readings(
            models=tuple(models),
            settings=settings,
            rejected_per_s=rejected_rate,
            served_per_s=served_rate,
            kv_evictions_per_s=evictions_rate,
            kv_bytes=view.kv_bytes,
            memory_available_bytes=getattr(host, "memory_available_bytes", None),
            memory_total_bytes=getattr(host, "memory_total_bytes", None),
            gpu_memory_used_ratio=max(used) / 100 if used else None,
        )

    async def _apply(self, decisions: list[Decision], wall: float) -> None:
        assert self._session is not None
        patch: dict[str, Any] = {d.knob: d.new for d in decisions}
        # The orchestrator refuses max below min; the batcher's lower bound follows the upper one down.
        if MAX_BATCH in patch and self.settings.get(_MIN_BATCH) is not None:
            if patch[MAX_BATCH] < self.settings[_MIN_BATCH]:
                patch[_MIN_BATCH] = patch[MAX_BATCH]
        try:
            async with self._session.patch(f"{self.url}/admin/config", json=patch) as resp:
                body = await resp.json(content_type=None)
                status = resp.status
        except Exception as exc:  # noqa: BLE001 - the change is not made; the next tick reads the truth again
            self.metrics.error("apply")
            self._note_error(f"applying {sorted(patch)} failed: {type(exc).__name__}: {exc}")
            return
        if status != 200:
            self.metrics.error("refused")
            message = (body or {}).get("error", {}).get("message", "") if isinstance(body, dict) else ""
            self._note_error(f"the orchestrator refused {patch}: {status} {message}")
            return
        self.last_error = None
        for d in decisions:
            self.metrics.decided(d)
            self.metrics.setting.labels(d.knob).set(float(d.new) if d.new is not None else math.nan)
            self.sources[d.knob] = (d.source, d.new)
            self.settings[d.knob] = d.new
            entry = {**d.to_json(), "wall": wall}
            self.decisions.append(entry)
            facts = ", ".join(f"{k}={v}" for k, v in d.readings.items())
            log.info("tuner: %s %s -> %s (%s, %s; load %s; %s)", d.knob, d.old, d.new, d.reason, d.source,
                     d.load_level, facts)
        if self.store is not None:
            self.store.add_decisions(decisions, wall)

    def _learned_best(self) -> dict[str, Any]:
        out = {}
        for level in self.policy.learned.levels():
            best = self.policy.learned.best(level)
            if best is not None:
                settings, goodput, attainment = best
                out[level] = {"settings": settings, "goodput_rps": round(goodput, 4), "attainment": round(attainment, 4)}
        return out

    # -- what GET /api/v1/tuner shows -------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        knobs = {}
        for knob in self.config.knobs:
            value = self.settings.get(knob)
            source, set_to = self.sources.get(knob, ("static", None))
            knobs[knob] = {
                "value": value,
                # Someone else (an operator, an orchestrator restart) may have changed it since.
                "source": source if value == set_to or knob not in self.settings else "static",
                "bounds": {"min": self.config.knobs[knob].min, "max": self.config.knobs[knob].max},
            }
        observations = decisions = 0
        if self.store is not None:
            observations, decisions = self.store.counts()
        return {
            "enabled": self.config.enabled,
            "active": self.active,
            "status": self.reason if self.last_error is None else self.last_error,
            "orchestrator": self.url,
            "interval_s": self.config.interval_s,
            "window": self.config.window,
            "slo": {"default": self.config.slo.model_dump(), "models": {k: v.model_dump() for k, v in self.config.models.items()}},
            "settings": knobs,
            "readings": self.last_readings,
            "learned": {"levels": self.policy.learned.levels(), "entries": len(self.policy.learned),
                        "warm_start_observations": self.warm_observations, "best": self._learned_best()},
            "history": {"observations": observations, "decisions": decisions,
                        "path": str(self.store.path) if self.store is not None else None},
            "ticks": self.ticks,
            "decisions": list(self.decisions),
        }


__all__ = ["OrchestratorView", "Tuner", "default_state_dir", "flat_settings", "parse_metrics", "policy_from_config"]
