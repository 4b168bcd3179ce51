"""The auto-tuner against static settings on one shifting workload (issue 11; requirement 12).

One real orchestrator (`python -m muai serve`, torch engine, the tiny Llama) and one real sidecar (`python -m muai
sidecar`, the orchestrator tracing into it), each its own process. An open-loop client sends Poisson arrivals
(`POST /v1/completions`, fixed `max_tokens`) through one trace, built from the server's measured capacity ``C``
(closed-loop requests per second at the default settings, short prompts, the best of three readings):

    quiet 0.1 C -> steady 0.6 C -> step 1.5 C -> back down 0.6 C -> long prompts at 0.6 C

The same trace (same seed, same arrival times and prompts) is run under:

- **default**: the shipped static settings (queue 256, no wait bound, batch 16, timeout 5 ms), tuner off;
- **grid**: a grid search over the tuner's knobs (admission: queue capacity 32/64/256 or a wait bound of 0.7 or 0.4
  of the objective; x batch size x batch timeout), each point run on a shortened trace; the best point by goodput is
  then run on the whole trace as **best_static**;
- **tuned_cold**: the tuner on, with an empty history;
- **tuned_warm**: the tuner on again after a sidecar restart, warm from the history the cold run wrote.

Static settings are applied through the admin API between runs (the same server process serves every run, so the
model, the caches and the process are the same for all). Per phase it reports goodput (requests per second that
answered 200 within the SLO), SLO attainment (of admitted, i.e. answered, requests), p99 latency of admitted
requests, and 429s; per run the time to recover after the step (``recovery_s``: from the step's start until the
one-second bins of admitted requests, by arrival, stay at >= 99% attainment to the phase's end) and, for the tuner,
its changes and rollbacks. Ratios: ``tuned_vs_default_goodput``, ``tuned_vs_best_static_goodput`` (over the whole
trace; the ratio of the means of ``--repeats`` runs each of best_static and tuned_cold, alternated, since one run
of the same static settings varies from the next by about as much as the two differ; each pair's ratio is
reported too), ``overload_goodput_vs_capacity``.

Prints one JSON line and writes ``bench/results/tuning.json``. Takes about 25 minutes (``--quick``: about 8).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._report import add_output_args, finish
from bench._serving import free_port, wait_ready
from sidecar.tuner.shell import parse_metrics

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
TOKEN = "bench-tuning-admin-token-0123456789"
# Prompts the tiny model (greedy) answers up to max_tokens without stopping early, so each request costs the same.
SHORT_PROMPT = "once upon a time there was"
LONG_TEXT = "the quick brown fox jumps over the lazy dog"
DEFAULTS = {"server.queue_capacity": 256, "server.max_queue_wait_s": None, "batching.max_batch_size": 16,
            "batching.min_batch_size": 1, "batching.batch_timeout_s": 0.005}


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    load: float  # share of the measured capacity
    long_prompts: bool = False


def trace(scale: float) -> list[Phase]:
    return [
        Phase("quiet", 15 * scale, 0.1),
        Phase("steady", 25 * scale, 0.6),
        Phase("step", 30 * scale, 1.5),
        Phase("down", 20 * scale, 0.6),
        Phase("long", 30 * scale, 0.6, long_prompts=True),
    ]


def arrivals(phases: list[Phase], capacity: float, seed: int) -> list[tuple[float, str, bool]]:
    """(send time from the start, phase, long prompt) for every request: one Poisson process per phase."""
    rng = random.Random(seed)
    out = []
    start = 0.0
    for phase in phases:
        rate = phase.load * capacity
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + phase.seconds:
                break
            out.append((t, phase.name, phase.long_prompts))
        start += phase.seconds
    return out


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MUAI_") or k == "MUAI_CACHE_DIR"}


class Stack:
    """The orchestrator, started once, and a sidecar that each run may restart with the tuner on or off."""

    def __init__(self, workdir: Path, *, slo_s: float, max_tokens: int = 48, long_words: int = 150) -> None:
        self.workdir = workdir
        self.slo_s = slo_s
        self.max_tokens = max_tokens
        words = LONG_TEXT.split()
        self.long_prompt = " ".join(words[i % len(words)] for i in range(long_words))
        self.server_port = free_port()
        self.sidecar_port = free_port()
        self.base = f"http://127.0.0.1:{self.server_port}"
        self.sidecar_base = f"http://127.0.0.1:{self.sidecar_port}"
        self.state_dir = workdir / "tuner-state"
        self.server: subprocess.Popen | None = None
        self.sidecar: subprocess.Popen | None = None
        self.config_path = workdir / "muai.yaml"
        self.config_path.write_text(json.dumps({
            "models": [{"name": MODEL, "path": "builtin:tiny-llama", "task": "generate"}],
            "engines": {"preference": ["torch"], "torch": {"threads": 1}},
            "server": {"port": self.server_port, "admin_token": TOKEN, "drain_timeout_s": 5,
                       "request_timeout_s": 60, "retry_after_s": 1},
            "telemetry": {"tracing": {"endpoint": f"{self.sidecar_base}/v1/traces"}},
            "sidecar": {
                "port": self.sidecar_port,
                "collectors": {"gpu": {"enabled": False}, "orchestrator": {"url": self.base}},
                "tuner": {"state_dir": str(self.state_dir), "slo": {"p99_s": slo_s}},
            },
        }))

    def _start(self, args: list[str], log_name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.workdir / log_name, "ab")
        env = {**_env(), **(extra_env or {})}
        return subprocess.Popen([sys.executable, "-m", "muai", *args, "--config", str(self.config_path)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    async def start_server(self, session: Any) -> None:
        self.server = self._start(["serve"], "server.log")
        await wait_ready(session, f"{self.base}/health/ready", [self.server], 180)

    async def start_sidecar(self, session: Any, *, tuner: bool) -> None:
        await self.stop_sidecar()
        env = {"MUAI_SIDECAR__TUNER__ENABLED": "true" if tuner else "false"}
        if tuner:
            env["MUAI_SIDECAR__TUNER__ADMIN_TOKEN"] = TOKEN
        self.sidecar = self._start(["sidecar"], "sidecar.log", env)
        await wait_ready(session, f"{self.sidecar_base}/health", [self.sidecar], 60)

    async def stop_sidecar(self) -> None:
        if self.sidecar is not None:
            _stop(self.sidecar)
            self.sidecar = None

    def stop(self) -> None:
        for proc in (self.server, self.sidecar):
            if proc is not None:
                _stop(proc)

    async def patch(self, session: Any, settings: dict[str, Any]) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.patch(f"{self.base}/admin/config", json=settings, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"PATCH {settings} answered {resp.status}: {await resp.text()}")

    async def tuner_state(self, session: Any) -> dict[str, Any]:
        async with session.get(f"{self.sidecar_base}/api/v1/tuner") as resp:
            return await resp.json()

    def body(self, long_prompt: bool) -> bytes:
        prompt = self.long_prompt if long_prompt else SHORT_PROMPT
        return json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0}).encode()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def capacity(stack: Stack, session: Any, seconds: float, connections: int) -> float:
    """Closed-loop requests per second at the current settings (short prompts)."""
    url = f"{stack.base}/v1/completions"
    body = stack.body(False)
    done = 0
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                done += resp.status == 200

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    return done / (time.monotonic() - started)


async def replay(stack: Stack, session: Any, plan: list[tuple[float, str, bool]]) -> list[tuple[float, str, int, float]]:
    """Send every request of ``plan`` at its time (open loop); (send time, phase, status, latency) of each."""
    url = f"{stack.base}/v1/completions"
    headers = {"Content-Type": "application/json"}
    bodies = {False: stack.body(False), True: stack.body(True)}
    results: list[tuple[float, str, int, float]] = []

    async def one(at: float, phase: str, long_prompt: bool) -> None:
        sent = time.monotonic()
        try:
            async with session.post(url, data=bodies[long_prompt], headers=headers) as resp:
                await resp.read()
                status = resp.status
        except Exception:  # noqa: BLE001 - a failed connection is an answer that did not meet the SLO
            status = 599
        results.append((at, phase, status, time.monotonic() - sent))

    start = time.monotonic()
    tasks = []
    for at, phase, long_prompt in plan:
        delay = start + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at, phase, long_prompt)))
    await asyncio.gather(*tasks)
    return results


def summarise(results: list[tuple[float, str, int, float]], phases: list[Phase], slo_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    start = 0.0
    total_good = 0
    for phase in phases:
        rows = [r for r in results if r[1] == phase.name]
        ok = [r for r in rows if r[2] == 200]
        good = [r for r in ok if r[3] <= slo_s]
        total_good += len(good)
        lat = sorted(r[3] for r in ok)
        p99 = lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)] if lat else None
        entry: dict[str, Any] = {
            "sent": len(rows),
            "goodput_rps": round(len(good) / phase.seconds, 3),
            "attainment": round(len(good) / len(ok), 4) if ok else None,
            "p99_s": None if p99 is None else round(p99, 4),
            "rejected": sum(r[2] == 429 for r in rows),
            "errors": sum(r[2] not in (200, 429) for r in rows),
        }
        if phase.name == "step":
            entry["recovery_s"] = _recovery(ok, start, phase.seconds, slo_s)
        out[phase.name] = entry
        start += phase.seconds
    duration = sum(p.seconds for p in phases)
    outside = [r for r in results if r[1] != "step" and r[2] == 200]
    # The long-prompt phase offers 0.6 C of short-prompt capacity, which long prompts make an overload too (about
    # twice what the server does on them): its share is also given apart, and so is the rest without it.
    short = [r for r in outside if r[1] != "long"]
    return {
        "goodput_rps": round(total_good / duration, 3),
        "attainment_outside_overload": _share(outside, slo_s),
        "attainment_short_outside_overload": _share(short, slo_s),
        "phases": out,
    }


def _share(ok: list[tuple[float, str, int, float]], slo_s: float) -> float | None:
    return round(sum(r[3] <= slo_s for r in ok) / len(ok), 4) if ok else None


def _recovery(ok: list[tuple[float, str, int, float]], start: float, seconds: float, slo_s: float) -> float:
    """Seconds from the phase's start after which every 1-s bin (by arrival) meets the SLO for >= 99% of requests."""
    bins: dict[int, list[bool]] = {}
    for at, _, _, latency in ok:
        bins.setdefault(int(at - start), []).append(latency <= slo_s)
    last_bad = -1
    for i in range(int(seconds)):
        met = bins.get(i)
        if met and sum(met) / len(met) < 0.99:
            last_bad = i
    return float(last_bad + 1)


def grid(slo_s: float) -> list[dict[str, Any]]:
    """Admission by count (three queue capacities) and by waiting time (the bound the tuner starts from, 0.7 of the
    objective, and a tighter one), each with two batch sizes and two batch timeouts."""
    points = []
    admission = [{"server.queue_capacity": c} for c in (32, 64, 256)] + [
        {"server.queue_capacity": 256, "server.max_queue_wait_s": round(share * slo_s, 3)} for share in (0.7, 0.4)]
    for admit in admission:
        for batch in (16, 32):
            for timeout in (0.002, 0.01):
                points.append({**admit, "batching.max_batch_size": batch, "batching.batch_timeout_s": timeout})
    return points


async def _settle(stack: Stack, session: Any) -> None:
    """Let the previous run's queue drain before the next run starts."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        async with session.get(f"{stack.base}/metrics") as resp:
            view = parse_metrics(await resp.text())
        if sum(view.waiting.values()) + sum(view.running.values()) == 0:
            return
        await asyncio.sleep(0.5)


async def _static_run(stack: Stack, session: Any, settings: dict[str, Any], plan, phases, slo_s) -> dict[str, Any]:
    await _settle(stack, session)
    await stack.patch(session, {**DEFAULTS, **settings, "batching.min_batch_size": 1})
    results = await replay(stack, session, plan)
    return summarise(results, phases, slo_s)


# The orchestrator's span exporter sends a batch at least this often (OpenTelemetry's default schedule delay, 5 s).
SPAN_FLUSH_S = 6.0


async def _tuned_run(stack: Stack, session: Any, plan, phases, slo_s) -> dict[str, Any]:
    await _settle(stack, session)
    await stack.patch(session, DEFAULTS)
    # The previous run's last spans must land in the sidecar that is stopped now: sent to the new one, they would
    # fill its windows with the previous run's latencies and the tuner would answer a breach that is over.
    await asyncio.sleep(SPAN_FLUSH_S)
    await stack.start_sidecar(session, tuner=True)
    before = await stack.tuner_state(session)
    seen = len(before.get("decisions", []))
    started = time.monotonic()  # the sidecar stamps decisions with the same system-wide monotonic clock
    results = await replay(stack, session, plan)
    state = await stack.tuner_state(session)
    await stack.start_sidecar(session, tuner=False)
    decisions = state.get("decisions", [])[seen:]
    summary = summarise(results, phases, slo_s)
    summary["changes"] = len(decisions)
    summary["rollbacks"] = sum(d["reason"] == "rollback" for d in decisions)
    summary["final_settings"] = {k: v["value"] for k, v in state.get("settings", {}).items()}
    summary["learned_levels"] = len(state.get("learned", {}).get("levels", []))
    summary["decisions_by_reason"] = _count(d["reason"] for d in decisions)
    summary["decisions_by_phase"] = _by_phase(decisions, phases, started)
    return summary


def _by_phase(decisions: list[dict[str, Any]], phases: list[Phase], started: float) -> dict[str, list[str]]:
    """Each phase's decisions, one short line each: seconds into the phase, knob, old -> new, reason, fresh p99."""
    out: dict[str, list[str]] = {p.name: [] for p in phases}
    for d in decisions:
        t, start = d["at"] - started, 0.0
        for phase in phases:
            if t < start + phase.seconds or phase is phases[-1]:
                fresh = d.get("readings", {}).get("fresh_p99_s")
                out[phase.name].append(f"{t - start:.0f}s {d['knob'].split('.')[-1]} {d['old']}->{d['new']} "
                                       f"{d['reason']} fresh_p99={fresh}")
                break
            start += phase.seconds
    return out


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    workdir = Path(tempfile.mkdtemp(prefix="muai-bench-tuning-"))
    stack = Stack(workdir, slo_s=args.slo_s, max_tokens=args.max_tokens, long_words=args.long_words)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            print("[tuning] starting the orchestrator and the sidecar", file=sys.stderr, flush=True)
            await stack.start_server(session)
            await stack.start_sidecar(session, tuner=False)
            await capacity(stack, session, 3, 32)  # warm-up
            # The best of three: on a shared machine other processes only ever slow a measurement down, and a
            # capacity read low makes the step no overload at all (the default then loses nothing to the tuner).
            samples = sorted([await capacity(stack, session, args.calibrate_s / 3, 96) for _ in range(3)])
            cap = samples[-1]
            print(f"[tuning] capacity at the defaults: {cap:.1f} requests/s", file=sys.stderr, flush=True)
            phases = trace(args.scale)
            plan = arrivals(phases, cap, args.seed)
            runs: dict[str, Any] = {}

            print("[tuning] default static settings", file=sys.stderr, flush=True)
            runs["default"] = await _static_run(stack, session, {}, plan, phases, args.slo_s)

            short = trace(args.scale * args.grid_scale)
            short_plan = arrivals(short, cap, args.seed + 1)
            scores = []
            points = [] if args.no_grid or args.best_static is not None else grid(args.slo_s)
            for i, point in enumerate(points):
                s = await _static_run(stack, session, point, short_plan, short, args.slo_s)
                scores.append((s["goodput_rps"], point))
                print(f"[tuning] grid {i + 1}/{len(points)} {point}: goodput {s['goodput_rps']}", file=sys.stderr, flush=True)
            best_goodput, best = max(scores, key=lambda item: item[0]) if scores else (None, args.best_static or {})
            print(f"[tuning] best static {best}; on the whole trace", file=sys.stderr, flush=True)
            runs["best_static"] = await _static_run(stack, session, best, plan, phases, args.slo_s)
            runs["best_static"]["settings"] = best

            shutil.rmtree(stack.state_dir, ignore_errors=True)
            print("[tuning] tuner, cold", file=sys.stderr, flush=True)
            runs["tuned_cold"] = await _tuned_run(stack, session, plan, phases, args.slo_s)
            print("[tuning] tuner, warm (sidecar restarted, history kept)", file=sys.stderr, flush=True)
            runs["tuned_warm"] = await _tuned_run(stack, session, plan, phases, args.slo_s)
            # The comparison that decides is within a few percent, about what one run of the same static settings
            # varies from the next here: further pairs of the best static settings and a cold tuner, alternated.
            statics, colds = [runs["best_static"]["goodput_rps"]], [runs["tuned_cold"]["goodput_rps"]]
            for i in range(1, args.repeats):
                print(f"[tuning] repeat {i + 1}/{args.repeats}: best static, then the tuner cold", file=sys.stderr,
                      flush=True)
                statics.append((await _static_run(stack, session, best, plan, phases, args.slo_s))["goodput_rps"])
                shutil.rmtree(stack.state_dir, ignore_errors=True)
                colds.append((await _tuned_run(stack, session, plan, phases, args.slo_s))["goodput_rps"])
    finally:
        stack.stop()

    default = runs["default"]["goodput_rps"]
    best_static, tuned = statistics.mean(statics), statistics.mean(colds)
    ratios = {
        "tuned_vs_default_goodput": round(runs["tuned_cold"]["goodput_rps"] / default, 3) if default else None,
        "tuned_vs_best_static_goodput": round(tuned / best_static, 3) if best_static else None,
        "tuned_vs_best_static_goodput_each": [round(c / b, 3) for b, c in zip(statics, colds) if b],
        "warm_vs_default_goodput": round(runs["tuned_warm"]["goodput_rps"] / default, 3) if default else None,
        "overload_goodput_vs_capacity": round(runs["tuned_cold"]["phases"]["step"]["goodput_rps"] / cap, 3),
    }
    figures = {
        "capacity_rps": round(cap, 2),
        "capacity_samples_rps": [round(x, 2) for x in samples],
        "slo_p99_s": args.slo_s,
        "recovery_s": {name: run["phases"]["step"]["recovery_s"] for name, run in runs.items()},
        "attainment_outside_overload": {name: run["attainment_outside_overload"] for name, run in runs.items()},
        "attainment_quiet_steady_down": {name: run["attainment_short_outside_overload"] for name, run in runs.items()},
        "tuner_changes": {name: runs[name]["changes"] for name in ("tuned_cold", "tuned_warm")},
        "tuner_rollbacks": {name: runs[name]["rollbacks"] for name in ("tuned_cold", "tuned_warm")},
        "grid_best_short_goodput": best_goodput,
        "best_static_goodput_runs": [round(x, 3) for x in statics],
        "tuned_cold_goodput_runs": [round(x, 3) for x in colds],
    }
    return {
        "bench": "tuning",
        "figures": figures,
        "ratios": ratios,
        "goals": {
            "tuned_vs_default_goodput": ">= 1.3",
            "tuned_vs_best_static_goodput": ">= 1.0",
            "overload_goodput_vs_capacity": ">= 0.9",
            "attainment_outside_overload": ">= 0.99",
            "recovery_s": "<= 30",
        },
        "runs": runs,
        "setup": {"model": "builtin:tiny-llama (torch, 1 thread)", "max_tokens": args.max_tokens,
                  "long_prompt_words": args.long_words, "trace_scale": args.scale, "grid_scale": args.grid_scale,
                  "grid_points": len(grid(args.slo_s)), "seed": args.seed, "workdir": str(workdir)},
    }


def _settings_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict) or set(value) - set(DEFAULTS):
        raise argparse.ArgumentTypeError(f"expected an object with keys among {sorted(DEFAULTS)}, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muai bench tuning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slo-s", type=float, default=1.0, help="p99 latency objective (default 1.0 s)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens generated per request (default 48)")
    parser.add_argument("--long-words", type=int, default=150, help="words of a long prompt (default 150)")
    parser.add_argument("--scale", type=float, default=1.0, help="stretch the trace's phases (default 1.0: 120 s)")
    parser.add_argument("--grid-scale", type=float, default=0.34, help="grid points run this share of the trace")
    parser.add_argument("--calibrate-s", type=float, default=10.0, help="seconds of closed-loop capacity measurement")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of the best static settings and of the cold tuner, alternated; "
                             "tuned_vs_best_static_goodput is the ratio of their means (default 2)")
    parser.add_argument("--no-grid", action="store_true", help="skip the grid search (best_static = default)")
    parser.add_argument("--best-static", type=_settings_arg, default=None, metavar="JSON",
                        help="skip the grid search and compare with these static settings, e.g. "
                             "'{\"batching.max_batch_size\": 32, \"server.max_queue_wait_s\": 0.4}' (what an earlier "
                             "grid found, or your own)")
    parser.add_argument("--quick", action="store_true", help="a shorter trace and grid (about 8 minutes)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.grid_scale = 0.5, 0.3
    report = asyncio.run(_run(args))
    return finish(report, args)


if __name__ == "__main__":
    raise SystemExit(main())
