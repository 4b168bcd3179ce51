"""Graceful drain of the real process: `python -m muai serve`, SIGTERM with requests in flight."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from test_server_support import free_port, poll

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server_process(tmp_path):
    port = free_port()
    model_dir = tmp_path / "echo-model"
    model_dir.mkdir()
    config = {
        "models": [{"name": "echo", "path": str(model_dir), "engine": "echo", "inject_delay_s": 3.0}],
        "server": {"port": port, "drain_timeout_s": 60, "retry_after_s": 2, "pid_file": str(tmp_path / "muai.pid")},
        "telemetry": {"tracing": {"enabled": False}},
    }
    path = tmp_path / "muai.yaml"
    path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUAI_") or k == "MUAI_CACHE_DIR"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "muai", "serve", "--config", str(path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        yield proc, f"http://127.0.0.1:{port}", tmp_path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


async def test_sigterm_finishes_admitted_requests_and_refuses_new_ones(server_process):
    proc, base, tmp_path = server_process
    async with aiohttp.ClientSession() as session:
        async def ready():
            if proc.poll() is not None:
                raise AssertionError(f"server exited early: {proc.stdout.read().decode()}")
            try:
                async with session.get(f"{base}/health/ready") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False
        await poll(ready, timeout=90, what="the server to become ready")
        assert (tmp_path / "muai.pid").read_text().strip() == str(proc.pid)

        async def complete():
            async with session.post(f"{base}/v1/completions", json={"model": "echo", "prompt": "a b c"}) as resp:
                return resp.status, await resp.json()

        admitted = [asyncio.create_task(complete()) for _ in range(3)]

        async def in_flight():
            async with session.get(f"{base}/health/ready") as resp:
                body = await resp.json()
                return body["requests"]["waiting"] + body["requests"]["running"] == 3
        await poll(in_flight, what="three requests in flight")
        proc.send_signal(signal.SIGTERM)

        async def draining():
            async with session.get(f"{base}/health/ready") as resp:
                return resp.status == 503 and (await resp.json())["status"] == "draining"
        await poll(draining, what="readiness to report draining")
        async with session.post(f"{base}/v1/completions", json={"model": "echo", "prompt": "late"}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "2"
            assert (await resp.json())["error"]["code"] == "draining"

        results = await asyncio.wait_for(asyncio.gather(*admitted), 60)
        assert [status for status, _ in results] == [200, 200, 200]
        assert all(body["choices"][0]["text"] == "a b c" for _, body in results)

    code = await asyncio.to_thread(proc.wait, 60)
    output = proc.stdout.read().decode()
    assert code == 0, output
    assert "drained" in output
    assert not (tmp_path / "muai.pid").exists()
