"""The production serving path, `python -m muai serve` (``_serve``'s own runner, not aiohttp's TestServer): SIGTERM
with requests in flight, a second signal, and a client that leaves while its request waits."""

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

from orchestrator.lifecycle import MIN_SHUTDOWN_GRACE_S, shutdown_grace

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def start_server(tmp_path):
    """Starts `muai serve` on a free port with an echo model (``inject_delay_s`` per inference); killed at the end."""
    procs: list[subprocess.Popen] = []

    def start(*, inject_delay_s: float = 3.0, **sections):
        port = free_port()
        model_dir = tmp_path / "echo-model"
        model_dir.mkdir(exist_ok=True)
        config = {
            "models": [{"name": "echo", "path": str(model_dir), "engine": "echo", "inject_delay_s": inject_delay_s}],
            "server": {"port": port, "drain_timeout_s": 60, "retry_after_s": 2, "pid_file": str(tmp_path / "muai.pid")},
            "telemetry": {"tracing": {"enabled": False}},
        }
        for key, value in sections.items():
            config[key] = {**config.get(key, {}), **value}
        path = tmp_path / "muai.yaml"
        path.write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUAI_") or k == "MUAI_CACHE_DIR"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "muai", "serve", "--config", str(path)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return proc, f"http://127.0.0.1:{port}"

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def server_process(start_server, tmp_path):
    proc, base = start_server()
    return proc, base, tmp_path


async def wait_ready(session, proc, base):
    async def ready():
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stdout.read().decode()}")
        try:
            async with session.get(f"{base}/health/ready") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False
    await poll(ready, timeout=90, what="the server to become ready")


async def readiness(session, base) -> dict:
    async with session.get(f"{base}/health/ready") as resp:
        return await resp.json()


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


async def test_a_client_that_leaves_is_taken_out_of_the_queue(start_server):
    # Batching off: one echo request runs at a time, the next waits in the admission queue.
    proc, base = start_server(batching={"enabled": False})
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, proc, base)

        async def complete(prompt):
            async with session.post(f"{base}/v1/completions", json={"model": "echo", "prompt": prompt}) as resp:
                return resp.status

        busy = asyncio.create_task(complete("busy"))

        async def running():
            return (await readiness(session, base))["requests"]["running"] == 1
        await poll(running, what="one running request")
        impatient = asyncio.create_task(complete("impatient"))

        async def queued():
            return (await readiness(session, base))["requests"]["waiting"] == 1
        await poll(queued, what="the second request to wait in the queue")
        impatient.cancel()  # the client hangs up

        async def cancelled():
            async with session.get(f"{base}/metrics") as resp:
                text = await resp.text()
            return 'muai_requests_total{model="echo",operation="text_completion",status="cancelled"} 1.0' in text
        await poll(cancelled, what="the server to count the request as cancelled")
        assert (await readiness(session, base))["requests"]["waiting"] == 0
        assert await asyncio.wait_for(busy, 60) == 200


async def test_a_second_sigterm_stops_waiting_for_requests(start_server):
    proc, base = start_server(inject_delay_s=10.0)
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, proc, base)

        async def complete():
            try:
                async with session.post(f"{base}/v1/completions", json={"model": "echo", "prompt": "slow"}) as resp:
                    return resp.status
            except aiohttp.ClientError as exc:
                return type(exc).__name__

        slow = asyncio.create_task(complete())

        async def in_flight():
            return (await readiness(session, base))["requests"]["running"] == 1
        await poll(in_flight, what="the request to run")
        proc.send_signal(signal.SIGTERM)

        async def draining():
            return (await readiness(session, base))["status"] == "draining"
        await poll(draining, what="readiness to report draining")
        proc.send_signal(signal.SIGTERM)
        # Cut short: the request is cancelled instead of waited for (drain_timeout_s is 60 s, the request 10 s).
        outcome = await asyncio.wait_for(slow, 60)
        assert outcome != 200

    code = await asyncio.to_thread(proc.wait, 60)
    output = proc.stdout.read().decode()
    assert code == 0, output
    assert "second SIGTERM" in output and "drain ended with 1 requests unfinished" in output


def test_shutdown_grace_is_what_is_left_of_the_drain_and_a_second_signal_leaves_the_minimum():
    assert shutdown_grace(100.0, 70.0, hurried=False) == 30.0
    assert shutdown_grace(100.0, 99.9, hurried=False) == MIN_SHUTDOWN_GRACE_S
    assert shutdown_grace(100.0, 130.0, hurried=False) == MIN_SHUTDOWN_GRACE_S
    assert shutdown_grace(100.0, 70.0, hurried=True) == MIN_SHUTDOWN_GRACE_S
    assert shutdown_grace(None, 70.0, hurried=False) == MIN_SHUTDOWN_GRACE_S
