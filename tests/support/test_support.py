"""The surface of the shared test helpers, and the failure messages the suite relies on to say what hung."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import support
from support.clock import ManualClock
from support.procs import Process
from support.waiting import apoll, poll


def test_exported_members() -> None:
    assert sorted(support.__all__) == sorted([
        "ALERTMANAGER", "AMTOOL", "NO_ALERTMANAGER", "NO_PROMETHEUS", "PROMETHEUS", "PROMTOOL", "ManualClock",
        "OtlpReceiver", "Process", "Received", "RecordingServer", "WebhookReceiver", "alertmanager_config",
        "alertmanager_process", "apoll", "free_port", "free_ports", "poll", "prometheus_process", "span_attributes",
    ])
    for name in support.__all__:
        assert hasattr(support, name)


def test_poll_returns_the_first_truthy_value_and_names_what_timed_out() -> None:
    answers = iter([0, None, "ready"])
    assert poll(lambda: next(answers), timeout=5) == "ready"
    with pytest.raises(AssertionError, match=r"timed out after 0.05s waiting for nothing \(last error: OSError"):
        poll(lambda: (_ for _ in ()).throw(OSError("refused")), timeout=0.05, what="nothing", retry_on=(OSError,))


async def test_apoll_awaits_async_conditions_and_adds_the_diagnosis() -> None:
    async def later() -> int:
        return 7

    assert await apoll(later, timeout=5) == 7
    with pytest.raises(AssertionError, match="waiting for never\nthe log"):
        await apoll(lambda: False, timeout=0.05, what="never", diagnose=lambda: "the log")


def test_manual_clock_moves_both_readings_only_when_advanced() -> None:
    clock = ManualClock()
    before = (clock(), clock.wall())
    assert clock.advance(2.5) == 1_002.5
    assert (clock(), clock.wall()) == (before[0] + 2.5, before[1] + 2.5)


def test_a_process_that_exits_fails_the_wait_with_its_log(tmp_path: Path) -> None:
    code = "import sys; print('bad flag'); sys.exit(3)"
    with Process("child", [sys.executable, "-c", code], tmp_path / "child.log", url="http://127.0.0.1:9") as proc:
        with pytest.raises(AssertionError, match=r"(?s)child is not running.*exited with 3.*bad flag"):
            proc.wait_ready(timeout=30)
    assert proc.stop() == 3
