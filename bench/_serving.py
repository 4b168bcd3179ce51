"""What the benchmarks that run real servers share: a free port on 127.0.0.1, a child process started from the
checkout with a clean environment, a readiness wait that notices a child that died, and a process's CPU time."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What vLLM's CPU build needs from its environment (its device), and its usage report off.
VLLM_CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_NO_USAGE_STATS": "1"}


def start(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``cmd`` from the repository root, output to ``log_path``, with ``env`` added to this process's environment.
    ``MUAI_*`` variables of the caller's shell would override the benchmark's own configuration files, so only the
    model cache's location passes."""
    log = open(log_path, "wb")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MUAI_") or k == "MUAI_CACHE_DIR"}
    return subprocess.Popen(cmd, cwd=ROOT, env={**inherited, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)


async def wait_ready(session: Any, url: str, procs: list[subprocess.Popen], timeout: float = 120.0) -> None:
    """Until ``url`` answers 200; fails at once, naming it, when one of ``procs`` has exited."""
    import aiohttp

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a benchmark process exited early with {proc.returncode}: {proc.args}")
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def stop(procs: list[subprocess.Popen], timeout: float = 60.0) -> None:
    """SIGTERM every one of ``procs`` (the last started first: a server before the sidecar it exports to), then
    wait for each and kill one that outlives ``timeout``."""
    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_seconds(proc: Any) -> float:
    """User plus system CPU seconds of a ``psutil.Process``."""
    times = proc.cpu_times()
    return times.user + times.system


__all__ = ["ROOT", "VLLM_CPU_ENV", "cpu_seconds", "free_port", "start", "stop", "wait_ready"]
