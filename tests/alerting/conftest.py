"""Fixtures for the alerting tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from alerting_helpers import ManualClock, Receiver, start_receiver


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    runner = await start_receiver(rec)
    yield rec
    await runner.cleanup()
