"""Recovery from a dead engine, and what a second replica buys (issue 13; requirements 11.4, 15).

**Engine core killed under load.** A real ``muai serve`` with the tiny Llama on vLLM (torch behind it in the
chain, ``engines.reprobe_after_s`` = ``--reprobe-after``), ``--connections`` clients in a closed loop on
``/v1/completions``. After ``--warmup`` seconds the benchmark SIGKILLs vLLM's engine core process (a child of the
server named ``EngineCore``) and keeps the load on. Figures:

- ``engine_core_recovery_s``: from the kill until a request sent after it has succeeded and none fails any more
  (goal <= 30 on this machine): the chain notices the dead core, moves the model to torch and retries there;
- ``in_flight_stall_s``: the longest a request that was running at the kill waited for its answer;
- ``vllm_back_s``: from the kill until vLLM serves the model again and readiness says ready (it names the
  engine), after the re-probe; ``readiness_after_kill`` the readiness statuses seen in between, in order, and
  ``degraded_reason`` the first reason it gave;
- every answer's status during the run: each request gets an answer (a result, or 503 with ``Retry-After``);
  ``unanswered`` (a connection error or a 5xx other than 503) must be 0.

**Replicas.** Two servers on torch, with ``models[].replicas`` 1 and 2, both up at once and given the same
closed-loop load in turn for ``--duration`` seconds, ``--rounds`` times with the order swapped every round (each
figure its best round): ``replicas2_vs_1`` is the ratio of completed requests per second (reported; above 1 only
where there are cores for the second replica).

Prints one JSON line and writes ``bench/results/recovery.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench._report import add_output_args, finish
from bench._serving import VLLM_CPU_ENV, free_port, start, wait_ready
from bench._serving import stop as stop_all

PROMPT = "the quick brown fox jumps over the lazy dog"


def _config(model_dir: Path, port: int, *, preference: list[str], replicas: int, reprobe_after_s: float) -> dict:
    return {
        "models": [{"name": "m", "path": str(model_dir), "task": "generate", "replicas": replicas}],
        "engines": {"preference": preference, "reprobe_after_s": reprobe_after_s},
        "server": {"port": port, "queue_capacity": 1024},
        "telemetry": {"tracing": {"enabled": False}},
    }


def _serve(work: Path, name: str, config: dict) -> subprocess.Popen:
    path = work / f"{name}.json"
    path.write_text(json.dumps(config))
    return start([sys.executable, "-m", "muai", "--log-level", "warning", "serve", "--config", str(path)],
                 work / f"{name}.log", VLLM_CPU_ENV)


def _engine_core(server: subprocess.Popen) -> Any:
    import psutil

    for child in psutil.Process(server.pid).children(recursive=True):
        try:
            if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


async def _load(base: str, connections: int, stop: asyncio.Event, log: list[tuple[float, int, float]]) -> None:
    """Closed-loop clients until ``stop``; every answer as ``(finished_at, status, started_at)``."""
    import aiohttp

    payload = {"model": "m", "prompt": PROMPT, "max_tokens": 8}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def client() -> None:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    async with session.post(f"{base}/v1/completions", json=payload) as resp:
                        await resp.read()
                        status = resp.status
                        if status == 503 and "Retry-After" not in resp.headers:
                            status = 599
                except aiohttp.ClientError:
                    status = 0
                log.append((time.monotonic(), status, began))
                if status != 200:
                    await asyncio.sleep(0.05)  # a client that was told to back off does, briefly

        await asyncio.gather(*(client() for _ in range(connections)))


async def _readiness(session: Any, base: str) -> tuple[str | None, str | None, list[str]]:
    """The model's engine, the server's readiness status and its degraded reasons, from ``/health/ready``."""
    async with session.get(f"{base}/health/ready") as resp:
        body = await resp.json()
    return (body.get("models", {}).get("m") or {}).get("engine"), body.get("status"), list(body.get("degraded", []))


async def _engine_of(session: Any, base: str) -> str | None:
    return (await _readiness(session, base))[0]


async def _kill_run(args: argparse.Namespace, model_dir: Path, work: Path) -> dict[str, Any]:
    import aiohttp

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = _serve(work, "kill", _config(model_dir, port, preference=["vllm", "torch"], replicas=1,
                                          reprobe_after_s=args.reprobe_after))
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, f"{base}/health/ready", [server], args.start_timeout)
            if await _engine_of(session, base) != "vllm":
                raise RuntimeError(f"the model did not start on vLLM; see {work / 'kill.log'}")
        core = _engine_core(server)
        if core is None:
            raise RuntimeError("no EngineCore process under the server")
        log: list[tuple[float, int, float]] = []
        stop = asyncio.Event()
        load = asyncio.create_task(_load(base, args.connections, stop, log))
        await asyncio.sleep(args.warmup)
        killed_at = time.monotonic()
        core.send_signal(signal.SIGKILL)
        vllm_back = None
        degraded_reason = None
        statuses_seen: list[str] = []
        async with aiohttp.ClientSession() as session:
            deadline = killed_at + args.reprobe_after * 4 + args.start_timeout
            seen_other = False
            while time.monotonic() < deadline:
                engine, status, degraded = await _readiness(session, base)
                if status and (not statuses_seen or statuses_seen[-1] != status):
                    statuses_seen.append(status)
                if degraded and degraded_reason is None:
                    degraded_reason = degraded[0]
                seen_other = seen_other or engine != "vllm"
                if seen_other and engine == "vllm" and status == "ready":
                    vllm_back = time.monotonic() - killed_at
                    break
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        stop.set()
        await load
    finally:
        stop_all([server])
    after = [(t, s, b) for t, s, b in log if t >= killed_at]
    # Serving again: the first request sent after the kill that succeeded has finished, and no request failed
    # after that (the last failure, if any, is the later of the two).
    fresh = [t for t, s, b in after if s == 200 and b >= killed_at]
    failures = [t for t, s, _ in after if s != 200]
    recovery = max([min(fresh) if fresh else float("inf"), *failures]) - killed_at
    stall = max((t - b for t, _, b in after if b < killed_at), default=0.0)
    statuses = Counter(str(s) for _, s, _ in log)
    unanswered = sum(n for s, n in statuses.items() if s in ("0", "599") or (s.startswith("5") and s != "503"))
    return {"engine_core_recovery_s": round(recovery, 3), "in_flight_stall_s": round(stall, 3), "vllm_back_s": None if vllm_back is None else round(vllm_back, 3),
            "statuses": dict(sorted(statuses.items())), "unanswered": unanswered,
            "requests_after_kill": len(after), "failed_after_kill": len(failures),
            # What /health/ready said after the kill, in order (e.g. degraded while torch serves, then ready).
            "readiness_after_kill": statuses_seen, "degraded_reason": degraded_reason}


async def _measure(base: str, connections: int, duration: float) -> dict[str, Any]:
    """Closed-loop requests per second against ``base`` over ``duration`` seconds, after a second of warm-up."""
    log: list[tuple[float, int, float]] = []
    stop = asyncio.Event()
    load = asyncio.create_task(_load(base, connections, stop, log))
    await asyncio.sleep(1.0)
    log.clear()
    started = time.monotonic()
    await asyncio.sleep(duration)
    stop.set()
    await load
    elapsed = time.monotonic() - started
    done = sum(1 for t, s, _ in log if s == 200 and t <= started + elapsed)
    return {"req_per_s": round(done / elapsed, 2), "errors": sum(1 for _, s, _ in log if s != 200)}


async def _replicas(args: argparse.Namespace, model_dir: Path, work: Path) -> dict[int, dict[str, Any]]:
    """One and two torch replicas, both servers up at once and loaded in turn (the order swapped every round);
    each figure is its best round: on a shared machine other processes only ever slow a round down, and a
    neighbour's burst in one round would otherwise decide the ratio."""
    import aiohttp

    servers, bases = [], {}
    try:
        for replicas in (1, 2):
            port = free_port()
            bases[replicas] = f"http://127.0.0.1:{port}"
            servers.append(_serve(work, f"replicas{replicas}", _config(
                model_dir, port, preference=["torch"], replicas=replicas, reprobe_after_s=60)))
        async with aiohttp.ClientSession() as session:
            for replicas, base in bases.items():
                await wait_ready(session, f"{base}/health/ready", servers, args.start_timeout)
        rounds: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for i in range(args.rounds):
            for replicas in ((1, 2) if i % 2 == 0 else (2, 1)):
                rounds[replicas].append(await _measure(bases[replicas], args.connections, args.duration))
    finally:
        stop_all(servers)
    return {n: {**max(r, key=lambda x: x["req_per_s"]), "rounds_req_per_s": [x["req_per_s"] for x in r],
                "errors": sum(x["errors"] for x in r)} for n, r in rounds.items()}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from adapters.tiny import resolve_model_path

    model_dir = Path(resolve_model_path(args.model))
    work = Path(tempfile.mkdtemp(prefix="muai-bench-recovery-"))
    kill = await _kill_run(args, model_dir, work)
    both = await _replicas(args, model_dir, work)
    one, two = both[1], both[2]
    ratio = round(two["req_per_s"] / one["req_per_s"], 3) if one["req_per_s"] else None
    recovery = kill["engine_core_recovery_s"]
    return {
        "bench": "recovery",
        "figures": {"engine_core_kill": kill, "replicas_1": one, "replicas_2": two},
        "ratios": {"replicas2_vs_1": ratio},
        "goals": {
            "engine_core_recovery_s": {"goal": "<= 30", "value": recovery, "met": recovery <= 30},
            "unanswered": {"goal": "== 0", "value": kill["unanswered"], "met": kill["unanswered"] == 0},
        },
        "setup": {"model": args.model, "connections": args.connections, "reprobe_after_s": args.reprobe_after,
                  "duration_s": args.duration, "rounds": args.rounds, "cpus": os.cpu_count(), "logs": str(work)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muai bench recovery", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama", help="model (default builtin:tiny-llama)")
    parser.add_argument("--connections", type=int, default=8, help="closed-loop clients (default 8)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the kill (default 3)")
    parser.add_argument("--reprobe-after", type=float, default=10.0,
                        help="engines.reprobe_after_s of the killed server (default 10)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per replicas round (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each replicas server, alternating (default 2)")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds a server may take to start")
    add_output_args(parser)
    args = parser.parse_args(argv)
    return finish(asyncio.run(_run(args)), args)


if __name__ == "__main__":
    sys.exit(main())
