"""The server's background work and orderly close: preload, the telemetry loop, the separate metrics port
(``cleanup_ctx``), and the pure grace rule plus the connection close that shutdown uses."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from orchestrator.http.probes import metrics_endpoint
from orchestrator.metrics import ResourceSampler
from orchestrator.state import STATE, ServerState, refresh_status
from orchestrator.tls import TlsConfigError, server_ssl_context

log = logging.getLogger("orchestrator.server")  # one logger name for the whole server, as before the split


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    tasks = [asyncio.create_task(_preload(state), name="muai-preload"),
             asyncio.create_task(_telemetry_loop(state), name="muai-telemetry")]
    metrics_runner = await _start_metrics_port(state)
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if state.owns_manager:
            try:
                await state.manager.aclose()
            except Exception as exc:
                log.warning("closing the model manager failed: %r", exc)
        await asyncio.to_thread(state.tracing.shutdown, min(5.0, state.config.telemetry.tracing.export_timeout_s))
        if state.sampler is not None:
            state.sampler.close()


async def _preload(state: ServerState) -> None:
    preload = [m.name for m in state.config.models if m.preload]
    state.preload_pending.update(preload)
    for name in preload:
        started = time.monotonic()
        try:
            await state.manager.aload_model(name)
            log.info("model %s loaded in %.2fs", name, time.monotonic() - started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("preloading model %s failed: %s", name, exc)
        finally:
            state.preload_pending.discard(name)
    await refresh_status(state)


async def _telemetry_loop(state: ServerState) -> None:
    interval = state.config.telemetry.metrics.resource_interval_s
    metrics = state.metrics
    if metrics is not None:
        try:
            state.sampler = ResourceSampler()
        except Exception as exc:
            metrics.sampler_failed("resources", exc)
    while True:
        # The one place the engines' status is sampled (and, through it, idle KV-cache entries expire): off the
        # event loop, so readiness can stay a plain read.
        await refresh_status(state)
        if metrics is not None:
            if state.sampler is not None:
                try:
                    metrics.set_resources(await asyncio.to_thread(state.sampler.sample))
                    metrics.sampler_ok("resources")
                except Exception as exc:
                    metrics.sampler_failed("resources", exc)
            metrics.sample_throughput(time.monotonic())
            try:
                for model, stats in _engine_stats(state).items():
                    metrics.set_engine_stats(model, stats)
                metrics.sampler_ok("engine_stats")
            except Exception as exc:
                metrics.sampler_failed("engine_stats", exc)
        await asyncio.sleep(interval)


def _engine_stats(state: ServerState) -> dict[str, dict[str, Any]]:
    """Engine-native counters (KV cache, prefix cache) of every loaded model, read from its fallback chain."""
    manager = state.manager
    out: dict[str, dict[str, Any]] = {}
    for name in manager.models():
        if not manager.is_loaded(name):
            continue
        chain = manager.get_model(name).chain
        stats = chain.stats() if chain is not None else {}
        if stats:
            out[name] = stats
    return out


def listener_ssl_context(config: Any) -> ssl.SSLContext | None:
    """The context of every listener of the server (``server.tls.*``): the main port and the metrics port; None
    when TLS is off. Raises :class:`TlsConfigError` naming the keys when the files cannot be loaded."""
    tls = config.server.tls
    return server_ssl_context(tls.cert_file, tls.key_file) if tls.enabled else None


async def _start_metrics_port(state: ServerState) -> web.AppRunner | None:
    cfg = state.config.telemetry.metrics
    if state.metrics is None or cfg.port is None:
        return None
    app = web.Application()
    app[STATE] = state
    app.router.add_get(cfg.path, metrics_endpoint)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        ssl_context = listener_ssl_context(state.config)
        await web.TCPSite(runner, cfg.host, cfg.port, ssl_context=ssl_context).start()
    except (OSError, TlsConfigError) as exc:
        await runner.cleanup()
        problem = f"metrics port {cfg.host}:{cfg.port} could not be bound: {getattr(exc, 'strerror', None) or exc}"
        log.error("%s; serving goes on without it", problem)
        state.health.report("metrics_port", problem)
        return None
    log.info("metrics on %s://%s:%d%s", "https" if ssl_context else "http", cfg.host, cfg.port, cfg.path)
    return runner


MIN_SHUTDOWN_GRACE_S = 1.0
"""Least time open connections get to finish once the listener closes (a response being written, a health check)."""


def shutdown_grace(deadline: float | None, now: float, *, hurried: bool) -> float:
    """How long open connections may take to finish after the drain: what is left of ``server.drain_timeout_s``,
    at least :data:`MIN_SHUTDOWN_GRACE_S`, and only that minimum after a second signal. Pure.

    Without it aiohttp waits up to its ``shutdown_timeout`` per connection on top of the drain, twice (once for
    the handler, once more after cancelling it), so shutdown could take three times the drain timeout."""
    if hurried or deadline is None:
        return MIN_SHUTDOWN_GRACE_S
    return max(MIN_SHUTDOWN_GRACE_S, deadline - now)


async def close_connections(runner: web.AppRunner, grace: float, hurry: asyncio.Event) -> None:
    """Stop listening, then let open connections finish within ``grace`` seconds before their handlers are
    cancelled; a (further) signal setting ``hurry`` ends the wait at once. ``runner.cleanup()`` then finds them
    closed, or cancels what is left within its own ``shutdown_timeout``."""
    for site in list(runner.sites):
        await site.stop()
    server = runner.server
    if server is None:
        return
    await asyncio.sleep(0)  # let requests that arrived just before the listener closed start (as cleanup() does)
    pre_shutdown = getattr(server, "pre_shutdown", None)  # aiohttp >= 3.10
    if pre_shutdown is not None:
        pre_shutdown()  # idle keep-alive connections close now instead of holding the wait
    closing = asyncio.create_task(server.shutdown(grace))
    if hurry.is_set():  # hurried during the drain already: the minimum grace, no more waiting to cut short
        await closing
        return
    hurried = asyncio.create_task(hurry.wait())
    try:
        await asyncio.wait({closing, hurried}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hurried.cancel()
    if not closing.done():
        log.warning("second signal: cancelling the requests still open instead of waiting for them")
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)


__all__ = [
    "MIN_SHUTDOWN_GRACE_S",
    "close_connections",
    "lifecycle",
    "shutdown_grace",
]
