"""The sidecar process: an aiohttp app around the pure monitor, detectors and alert book.

Endpoints (``docs/sidecar-api.md`` has the shapes):

* ``POST /v1/traces``: the OTLP/HTTP receiver (protobuf or JSON, optionally gzip).
* ``GET /api/v1/stats``, ``/api/v1/gpus``, ``/api/v1/host``, ``/api/v1/alerts``: the query API.
* ``GET /api/v1/tuner``: the auto-tuner's settings, their source and its recent decisions (``docs/tuner.md``).
* ``GET /metrics``: Prometheus exposition of the sidecar's registry. ``GET /health``.

Background work (collectors, the evaluation tick, span forwarding, alert dispatch, the tuner) runs in tasks started
and stopped by ``cleanup_ctx``; none of it ever blocks ingestion. This module wires the app, its background work and
the OTLP/HTTP receiver; the query API's handlers are in ``sidecar.api``, the state in ``sidecar.state``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry

from alerting import (
    AlertBook,
    AlertmanagerSink,
    Dispatcher,
    LogSink,
    Passthrough,
    Route,
    Sink,
    Throttle,
    TokenBucket,
    WebhookSink,
)
from sidecar.api import (
    get_alerts,
    get_gpus,
    get_health,
    get_host,
    get_metrics,
    get_stats,
    get_tuner,
    json_errors,
    patch_config,
    read_body,
)
from sidecar.collectors.gpu import GpuCollector
from sidecar.collectors.host import HostCollector
from sidecar.config import SidecarConfig
from sidecar.errors import OtlpError, PayloadTooLarge
from sidecar.evaluation import Evaluator
from sidecar.forwarding import Forwarder
from sidecar.gpu_faults import GpuFault, cordon
from sidecar.metrics import SidecarMetrics
from sidecar.monitor import PerformanceMonitor
from sidecar.openapi import OPENAPI, OPENAPI_PATH, openapi_document, openapi_endpoint
from sidecar.otlp import (
    RESPONSE_CONTENT_TYPE,
    decode_request,
    decompress,
    encode_response,
    encode_status,
    media_kind,
)
from sidecar.otlp_grpc import start_receiver
from sidecar.state import STATE, SidecarState, ingest
from sidecar.tls import TlsConfigError, client_ssl_context, server_ssl_context
from sidecar.tuner import Tuner

log = logging.getLogger("muai.sidecar")

_GZIP_MAGIC = b"\x1f\x8b"


# -- construction --------------------------------------------------------------------------------------------


def _dispatchers(config: SidecarConfig, extra_sinks: Sequence[Sink]) -> list[Dispatcher]:
    """One dispatcher per sink, so each sink has its own buffer, retry budget and token bucket.

    A shared bucket would go to whichever sink's policy flushes first (the log's), and in a storm the webhook
    would get what is left: each receiver is rate limited on its own.
    """
    alerting = config.alerting
    rl = alerting.rate_limit

    def throttle() -> Throttle:
        return Throttle(
            group_by=tuple(rl.group_by),
            group_wait_s=rl.group_wait_s,
            group_interval_s=rl.group_interval_s,
            repeat_interval_s=rl.repeat_interval_s,
            bucket=TokenBucket(capacity=rl.burst, rate_per_s=rl.rate_per_s),
        )

    out = []
    sinks = alerting.sinks
    if sinks.log.enabled:
        out.append(Dispatcher([Route(LogSink(), policy=throttle())], buffer_size=1000, max_attempts=1))
    if sinks.webhook.url is not None:
        hook = sinks.webhook
        sink = WebhookSink(hook.url, secret=hook.secret, timeout_s=hook.timeout_s)
        out.append(Dispatcher([Route(sink, policy=throttle())], buffer_size=hook.buffer, max_attempts=hook.retries + 1))
    if sinks.alertmanager.url is not None:
        am = sinks.alertmanager
        # Alertmanager drops an alert whose endsAt passes without news; re-posts come 4x inside that.
        sink = AlertmanagerSink(am.url, timeout_s=am.timeout_s, firing_ttl_s=am.resend_interval_s * 4)
        policy = Passthrough(resend_interval_s=am.resend_interval_s)
        out.append(Dispatcher([Route(sink, policy=policy)], buffer_size=am.buffer, max_attempts=am.retries + 1))
    for sink in extra_sinks:
        out.append(Dispatcher([Route(sink, policy=throttle())]))
    return out


def create_app(
    config: SidecarConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    gpu_collector: GpuCollector | None = None,
    host_collector: HostCollector | None = None,
    extra_sinks: Sequence[Sink] = (),
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """Build the sidecar's aiohttp application (nothing starts until the app runs).

    ``clock`` (monotonic seconds) drives the windows and rules, ``wall_clock`` (epoch seconds) stamps alerts;
    tests pass clocks they advance. ``extra_sinks`` adds alert sinks beside the configured ones (each with the
    configured rate limits). Collectors default to real NVML and psutil ones built from the config.
    """
    monitor = PerformanceMonitor(
        windows=config.monitor.windows, max_samples=config.monitor.max_samples, max_series=config.monitor.max_series
    )
    if gpu_collector is None and config.collectors.gpu.enabled:
        gpu_collector = GpuCollector(processes=config.collectors.gpu.processes)
    if host_collector is None and config.collectors.host.enabled:
        target = config.collectors.orchestrator
        port = None
        if target.url:
            parts = urlsplit(target.url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        host_collector = HostCollector(pid_file=target.pid_file, port=port)
    book = AlertBook(
        history_size=config.alerting.history_size,
        external_labels=config.alerting.external_labels,
        generator_url=f"{'https' if config.tls.enabled else 'http'}://{config.host}:{config.port}/api/v1/alerts",
    )
    evaluator = Evaluator(config.detectors, monitor=monitor, book=book) if config.detectors.enabled else None
    dispatchers = _dispatchers(config, extra_sinks) if config.detectors.enabled else []
    registry = registry if registry is not None else CollectorRegistry()
    state = SidecarState(
        config=config,
        clock=clock,
        wall_clock=wall_clock,
        monitor=monitor,
        registry=registry,
        gpu=gpu_collector,
        host=host_collector,
        forwarder=Forwarder(config.forwarding) if config.forwarding.endpoint else None,
        book=book,
        evaluator=evaluator,
        dispatchers=dispatchers,
        started_at=clock(),
    )
    state.metrics = SidecarMetrics(registry, lambda: state)
    state.tuner = Tuner(
        config.tuner, monitor=monitor, orchestrator_url=config.collectors.orchestrator.url, registry=registry,
        clock=clock, wall_clock=wall_clock, host=lambda: state.host_sample, gpus=lambda: state.gpu_samples,
        ca_file=config.collectors.orchestrator.ca_file,
    )

    app = web.Application(middlewares=[json_errors], client_max_size=config.receiver.max_body_bytes)
    app[STATE] = state
    app.router.add_post("/v1/traces", _traces)
    app.router.add_get("/api/v1/stats", get_stats)
    app.router.add_get("/api/v1/gpus", get_gpus)
    app.router.add_get("/api/v1/host", get_host)
    app.router.add_get("/api/v1/alerts", get_alerts)
    app.router.add_get("/api/v1/tuner", get_tuner)
    app.router.add_patch("/api/v1/config", patch_config)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/health", get_health)
    app[OPENAPI] = openapi_document(windows=list(monitor.windows))
    app.router.add_get(OPENAPI_PATH, openapi_endpoint)
    app.cleanup_ctx.append(_background)
    return app


# -- background work -----------------------------------------------------------------------------------------


async def _background(app: web.Application):
    state = app[STATE]
    tasks: list[asyncio.Task] = []
    state.otlp_grpc = await start_receiver(state)  # None when sidecar.otlp_grpc_port is null (or taken)
    if state.gpu is not None:
        await asyncio.to_thread(state.gpu.start)
    if state.gpu is not None or state.host is not None:
        tasks.append(asyncio.create_task(_collect_loop(state), name="sidecar-collect"))
    for dispatcher in state.dispatchers:
        await dispatcher.start()
    if state.evaluator is not None:
        tasks.append(asyncio.create_task(_evaluate_loop(state), name="sidecar-evaluate"))
    if state.forwarder is not None:
        tasks.append(asyncio.create_task(_guard("forward", state, state.forwarder.run), name="sidecar-forward"))
    if state.tuner is not None and state.tuner.active:
        tasks.append(asyncio.create_task(_guard("tuner", state, state.tuner.run), name="sidecar-tuner"))
    try:
        yield
    finally:
        if state.otlp_grpc is not None:
            await state.otlp_grpc.stop(state.config.shutdown_timeout_s)
            state.otlp_grpc = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for dispatcher in state.dispatchers:
            await dispatcher.aclose()
        if state.gpu is not None:
            await asyncio.to_thread(state.gpu.close)


async def _guard(name: str, state: SidecarState, fn) -> None:
    try:
        await fn()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a dead loop is reported on /health rather than killing the process
        log.exception("sidecar %s loop stopped", name)
        state.loop_errors[name] = repr(exc)[:300]


async def _collect_loop(state: SidecarState) -> None:
    interval = state.config.collectors.interval_s
    failing: set[str] = set()
    while True:
        await collect_once(state, failing)
        await asyncio.sleep(interval)


async def collect_once(state: SidecarState, failing: set[str] | None = None) -> None:
    """Take one GPU and one host sample (in worker threads) and record them; errors are logged once and counted."""
    failing = set() if failing is None else failing
    for name, collector in (("gpu", state.gpu), ("host", state.host)):
        if collector is None or (name == "gpu" and not collector.available):
            continue
        try:
            sample = await asyncio.to_thread(collector.sample)
        except Exception as exc:  # noqa: BLE001 - a collector must never stop the sidecar
            state.metrics.collector_errors[name].inc()
            if name not in failing:
                log.warning("%s collector failed: %r; retrying every interval", name, exc)
                failing.add(name)
            continue
        failing.discard(name)
        now = state.clock()
        record = state.monitor.record_resource
        if name == "gpu":
            state.gpu_samples, state.gpu_sampled_at = sample, state.wall_clock()
            for g in sample:
                record("gpu_utilization_ratio", str(g.index), g.utilization_ratio, now)
                record("gpu_framebuffer_used_percent", str(g.index), g.framebuffer_used_percent, now)
                record("gpu_power_watts", str(g.index), g.power_watts, now)
        else:
            state.host_sample, state.host_sampled_at = sample, state.wall_clock()
            record("host_cpu_percent", "", sample.cpu_percent, now)
            record("host_memory_percent", "", sample.memory_percent, now)
            if sample.orchestrator is not None:
                record("orchestrator_cpu_percent", "", sample.orchestrator.cpu_percent, now)
                record("orchestrator_rss_bytes", "", float(sample.orchestrator.rss_bytes), now)


async def _evaluate_loop(state: SidecarState) -> None:
    interval = state.config.detectors.interval_s
    logged = False
    while True:
        try:
            state.evaluate()
            logged = False
            while state.pending_cordons:
                fault = state.pending_cordons.pop(0)
                asyncio.create_task(_cordon(state, fault), name=f"sidecar-cordon-{fault.device}")
        except Exception:  # noqa: BLE001 - log once per failure streak, count every tick
            state.metrics.evaluation_errors.inc()
            if not logged:
                log.exception("detector evaluation failed; retrying every tick")
                logged = True
        await asyncio.sleep(interval)


async def _cordon(state: SidecarState, fault: GpuFault) -> None:
    import aiohttp

    orchestrator = state.config.collectors.orchestrator
    token = state.config.tuner.admin_token
    if not orchestrator.url:
        log.error("GPU %d: %s; not cordoned: no orchestrator (sidecar.collectors.orchestrator.url)", fault.index,
                  fault.reason)
        return
    connector = None
    if orchestrator.url.startswith("https:"):
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(orchestrator.ca_file,
                                                                key="sidecar.collectors.orchestrator.ca_file"))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        outcome = await cordon(session, orchestrator.url, token.get_secret_value() if token else None, fault)
    log.error("GPU %d: %s; %s", fault.index, fault.reason, outcome)


# -- handlers ------------------------------------------------------------------------------------------------


async def _traces(request: web.Request) -> web.Response:
    state = request.app[STATE]
    metrics = state.metrics
    cfg = state.config.receiver
    kind = None
    try:
        kind = media_kind(request.headers.get("Content-Type"))
        encoding = request.headers.get("Content-Encoding")
        length = request.content_length
        if length is not None and length > cfg.max_body_bytes:
            raise PayloadTooLarge(f"Content-Length {length} exceeds the {cfg.max_body_bytes}-byte limit")
        if encoding is None or encoding.strip().lower() in ("", "identity"):
            body = await read_body(request, cfg.max_body_bytes)
        else:
            # aiohttp may already have inflated the stream (its servers do by default; serve() turns that off):
            # gzip's magic number starts neither protobuf nor JSON, so it tells which case this is.
            body = await read_body(request, cfg.max_decompressed_bytes)
            if body[:2] == _GZIP_MAGIC or encoding.strip().lower() != "gzip":
                body = decompress(body, encoding, limit=cfg.max_decompressed_bytes)
        message, raw = decode_request(body, kind)
    except OtlpError as exc:
        metrics.export(kind or "unknown", exc.status)
        payload, content_type = encode_status(kind, exc.status, exc.message)
        return web.Response(status=exc.status, body=payload, content_type=content_type)
    mapped = ingest(state, message, raw, kind)
    return web.Response(
        body=encode_response(kind, rejected=mapped.rejected, error_message=mapped.error_message),
        content_type=RESPONSE_CONTENT_TYPE[kind],
    )


# -- process entry points ------------------------------------------------------------------------------------


async def serve(config: Any, *, started: asyncio.Future | None = None) -> None:
    """Run the sidecar until SIGTERM or SIGINT, then shut down gracefully.

    ``started``, when given, receives the bound ``(host, port)`` once listening (port 0 picks a free one).
    Takes the ``sidecar`` section or the whole configuration that holds it.
    """
    config = _section(config)
    tls = config.tls
    ssl_context = server_ssl_context(tls.cert_file, tls.key_file) if tls.enabled else None
    if config.collectors.orchestrator.ca_file:  # a CA file that cannot be read stops start-up, not the tuner later
        client_ssl_context(config.collectors.orchestrator.ca_file, key="sidecar.collectors.orchestrator.ca_file")
    app = create_app(config)
    # auto_decompress=False: the receiver inflates gzip itself, bounded by receiver.max_decompressed_bytes.
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=config.shutdown_timeout_s, access_log=None, auto_decompress=False
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context)
    await site.start()
    host, port = config.host, config.port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        host, port = server.sockets[0].getsockname()[:2]
    log.info("muai sidecar listening on %s://%s:%d (OTLP/HTTP /v1/traces, /metrics, /api/v1/*)",
             "https" if ssl_context else "http", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signal support
            pass
    if started is not None and not started.done():
        started.set_result((host, port))
    try:
        await stop.wait()
        log.info("muai sidecar stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
        await runner.cleanup()
        log.info("muai sidecar stopped")


def _section(config: Any) -> SidecarConfig:
    """The sidecar section, whether given itself or inside the whole configuration (``config.sidecar``)."""
    if config is None:
        return SidecarConfig()
    if isinstance(config, SidecarConfig):
        return config
    section = getattr(config, "sidecar", None)
    if isinstance(section, SidecarConfig):
        return section
    raise TypeError(f"expected a SidecarConfig or a configuration with a `sidecar` section, got {type(config).__name__}")


def run(config: Any = None) -> int:
    """The blocking entry point ``muai sidecar`` calls; returns the process exit code.

    Takes the ``sidecar`` section or the whole configuration that holds it (``muai.config.MuaiConfig``).
    """
    config = _section(config)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except TlsConfigError as exc:
        log.error("muai sidecar cannot serve HTTPS: %s", exc)
        return 1
    except OSError as exc:  # e.g. the port is taken: say so plainly instead of a traceback
        log.error("muai sidecar could not start on %s:%d: %s", config.host, config.port, exc)
        return 1
    return 0


__all__ = ["STATE", "SidecarState", "collect_once", "create_app", "run", "serve"]
