"""Helpers for the alerting tests: a clock you advance, a recording sink, a webhook receiver."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from alerting import Alert, AlertState, Notification, Passthrough


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class RecordingSink:
    """A real sink that keeps what it is sent (our own interface, not a fake of someone else's)."""

    max_batch = 64

    def __init__(self, name: str = "recorder", *, policy_factory: Callable[[], Any] | None = None) -> None:
        self.name = name
        self.batches: list[list[Notification]] = []
        self._policy_factory = policy_factory or (lambda: Passthrough(resend_interval_s=None))
        self.closed = False

    def default_policy(self) -> Any:
        return self._policy_factory()

    @property
    def notifications(self) -> list[Notification]:
        return [n for batch in self.batches for n in batch]

    async def send(self, notifications: Sequence[Notification]) -> None:
        self.batches.append(list(notifications))

    async def aclose(self) -> None:
        self.closed = True


def make_alert(
    name: str = "HighLatency",
    *,
    state: AlertState = AlertState.FIRING,
    at: float = 1_000.0,
    ends: float | None = None,
    **labels: str,
) -> Alert:
    return Alert(
        labels={"alertname": name, "severity": "warning", **labels},
        annotations={"summary": f"{name} is firing"},
        state=state,
        active_at=at,
        starts_at=at,
        ends_at=ends if state is AlertState.RESOLVED else None,
        updated_at=at,
    )


async def wait_until(cond: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until it holds or the deadline passes (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook subscriber: answers ``fail_status`` to the first ``fail_first`` requests."""

    url: str = ""
    fail_first: int = 0
    fail_status: int = 500
    requests: list[Received] = field(default_factory=list)
    gate: asyncio.Event | None = None

    @property
    def accepted(self) -> list[Received]:
        return [r for r in self.requests if r.status == 200]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.gate is not None:
            await self.gate.wait()
        failing = len(self.requests) < self.fail_first
        status = self.fail_status if failing else 200
        self.requests.append(Received(body=body, headers=dict(request.headers), status=status))
        return web.json_response({"ok": not failing}, status=status)


async def start_receiver(receiver: Receiver, path: str = "/hook") -> web.AppRunner:
    app = web.Application()
    app.router.add_post(path, receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    receiver.url = f"http://{host}:{port}{path}"
    return runner



async def poll_async(probe: Callable[[], Awaitable[Any]], *, what: str, timeout: float = 20.0) -> Any:
    """Await ``probe`` until it returns something truthy (and return it) or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
