"""Fixtures for the alerting tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from support.clock import ManualClock
from support.receiver import WebhookReceiver


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as rec:
        yield rec
