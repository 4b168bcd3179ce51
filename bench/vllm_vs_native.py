"""Our server on the vLLM adapter against vLLM's own OpenAI server, same engine, same model, same client (issue 14;
requirements 1, 6).

Three servers, each started by the benchmark on 127.0.0.1 and measured by vLLM's own client
(``vllm.benchmarks.serve``: ``--dataset-name random``, ``--num-prompts`` prompts of ``--input-len`` tokens,
``--output-len`` output tokens with ``ignore_eos``, ``--concurrency`` in flight, on ``/v1/completions``):

- **vllm_server**: ``python -m vllm.entrypoints.openai.api_server`` with the settings our adapter gives vLLM
  (float32, eager, the same KV-cache bytes, prefix caching on, vLLM's own stat logging off);
- **ours**: ``muai serve``, the model pinned to the vLLM engine, tracing off;
- **ours_traced**: the same with tracing on, exported to a real ``muai sidecar`` (the default sampling).

Every server is started once and stays up, idle, while the others are measured; each answers
``--warmup-prompts`` unmeasured prompts first. Then ``--repeats`` rounds, one client run per server each, the order
alternated (forward, then backward): one run of 400 prompts lasts about 4 s here, and runs of the same server
minutes apart differed by up to 30%, so servers measured seconds apart in one round compare best.

Figures per server: request throughput, output tokens per second, median and p99 time per output token and time
to first token, each the median over the rounds, with each round's throughput (``req_per_s_each``). Ratios:
``ours_vs_vllm_server`` (request throughput, of the medians; goal >= 0.95), ``ours_tpot_vs_vllm_server`` (median
TPOT, ours over theirs; goal <= 1.05), the time to first token's, and the same for ``ours_traced``; ``..._paired``
is the median of the rounds' own ratios (each in ``..._each_round``). ``--servers`` measures fewer (vLLM's own
server is always one).

The model is the tiny Llama (``builtin:tiny-llama``) unless ``--model`` names another, e.g. ``builtin:bench-llama``.
Prints one JSON line and writes ``bench/results/vllm_vs_native.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._report import add_output_args, finish
from bench._serving import VLLM_CPU_ENV, free_port, start, stop, wait_ready

KV_CACHE_BYTES = 512 * 1024**2  # adapters.vllm_engine.DEFAULT_KV_CACHE_BYTES: what our adapter gives vLLM
SERVED = "bench-model"
KINDS = ("vllm_server", "ours", "ours_traced")
FIGURES = {
    "request_throughput": "req_per_s", "output_throughput": "output_tok_per_s", "median_tpot_ms": "median_tpot_ms",
    "p99_tpot_ms": "p99_tpot_ms", "median_ttft_ms": "median_ttft_ms", "p99_ttft_ms": "p99_ttft_ms",
    "completed": "completed", "failed": "failed",
}
# vLLM's client has no __main__ of its own; its engine core is spawned, so whatever starts it needs the guard.
CLIENT = """
if __name__ == "__main__":
    import sys
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
"""


def _server_cmd(kind: str, model_dir: Path, port: int, config: Path) -> list[str]:
    if kind == "vllm_server":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                "--enforce-eager", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--enable-prefix-caching",
                "--disable-log-stats", "--disable-uvicorn-access-log"]
    return [sys.executable, "-m", "muai", "--log-level", "warning", "serve", "--config", str(config)]


def _config(model_dir: Path, port: int, sidecar_port: int, *, traced: bool) -> dict[str, Any]:
    return {
        # The client asks for ignore_eos in each request, as it does of vLLM's server.
        "models": [{"name": SERVED, "path": str(model_dir), "task": "generate", "engine": "vllm", "dtype": "float32"}],
        "engines": {"vllm": {"kv_cache_memory_bytes": KV_CACHE_BYTES}},
        "server": {"port": port, "queue_capacity": 1024},
        "telemetry": {"tracing": {"enabled": traced, "endpoint": f"http://127.0.0.1:{sidecar_port}/v1/traces"}},
        "sidecar": {"port": sidecar_port, "otlp_grpc_port": None, "tuner": {"enabled": False},
                    "collectors": {"orchestrator": {"url": f"http://127.0.0.1:{port}"}},
                    "alerting": {"sinks": {"log": {"enabled": False}}}},
    }


def _client(args: argparse.Namespace, model_dir: Path, port: int, work: Path, name: str,
            num_prompts: int | None = None) -> dict[str, Any]:
    result = work / f"{name}-result.json"
    cmd = [sys.executable, "-c", CLIENT, "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
           "--endpoint", "/v1/completions", "--model", SERVED, "--tokenizer", str(model_dir),
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(num_prompts or args.num_prompts),
           "--max-concurrency", str(args.concurrency), "--ignore-eos", "--seed", "0", "--disable-tqdm",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(work), "--result-filename", result.name]
    env = {**os.environ, **VLLM_CPU_ENV}
    with open(work / f"{name}-client.log", "wb") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1800)
    raw = json.loads(result.read_text())
    return {ours: raw.get(theirs) for theirs, ours in FIGURES.items()}


async def _ready(url: str, procs: list[subprocess.Popen], timeout: float) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        await wait_ready(session, url, procs, timeout)


def _start_server(args: argparse.Namespace, kind: str, model_dir: Path, work: Path,
                  procs: list[subprocess.Popen]) -> int:
    """Start ``kind`` (and, for ``ours_traced``, its sidecar), appending to ``procs``; its port once ready."""
    port, sidecar_port = free_port(), free_port()
    config = work / f"{kind}.json"
    config.write_text(json.dumps(_config(model_dir, port, sidecar_port, traced=kind == "ours_traced")))
    own: list[subprocess.Popen] = []
    if kind == "ours_traced":
        own.append(start([sys.executable, "-m", "muai", "--log-level", "warning", "sidecar", "--config",
                          str(config)], work / f"{kind}-sidecar.log"))
    own.append(start(_server_cmd(kind, model_dir, port, config), work / f"{kind}-server.log", VLLM_CPU_ENV))
    procs.extend(own)
    ready = "/health" if kind == "vllm_server" else "/health/ready"
    asyncio.run(_ready(f"http://127.0.0.1:{port}{ready}", own, args.start_timeout))
    print(f"# vllm_vs_native: {kind} ready on port {port}", file=sys.stderr, flush=True)
    return port


def _median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the repeats (the sum for the request counts), with every repeat's throughput."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r.get(key) is not None]
        if key in ("completed", "failed"):
            out[key] = sum(values)
        else:
            out[key] = statistics.median(values) if values else None
    out["req_per_s_each"] = [round(r["req_per_s"], 2) for r in runs if r.get("req_per_s") is not None]
    return out


def _median_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from adapters.tiny import resolve_model_path

    model_dir = Path(resolve_model_path(args.model))
    work = Path(tempfile.mkdtemp(prefix="muai-bench-vllm-"))
    kinds = tuple(k for k in KINDS if k == "vllm_server" or k in args.servers)  # vLLM's own server first
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    procs: list[subprocess.Popen] = []
    try:
        # Every server is started once and stays up, idle, while another is measured: rounds then follow each
        # other within seconds, so a drift of the machine (single rounds here differ by up to 30%) hits the
        # servers of one round alike, and the per-round ratios below compare like with like.
        ports = {kind: _start_server(args, kind, model_dir, work, procs) for kind in kinds}
        if args.warmup_prompts:
            for kind in kinds:
                _client(args, model_dir, ports[kind], work, f"{kind}-warmup", args.warmup_prompts)
        for repeat in range(args.repeats):
            # Alternated (forward, then backward): whatever drifts within a round hits each server alike.
            for kind in kinds if repeat % 2 == 0 else tuple(reversed(kinds)):
                print(f"# vllm_vs_native: round {repeat + 1}/{args.repeats}: {kind}", file=sys.stderr, flush=True)
                runs[kind].append(_client(args, model_dir, ports[kind], work, f"{kind}-r{repeat}"))
    finally:
        stop(procs)
    figures = {kind: _median_figures(each) for kind, each in runs.items()}
    native = figures["vllm_server"]
    ratios: dict[str, Any] = {}
    for kind in kinds[1:]:
        ratios[f"{kind}_vs_vllm_server"] = _ratio(figures[kind]["req_per_s"], native["req_per_s"])
        ratios[f"{kind}_tpot_vs_vllm_server"] = _ratio(figures[kind]["median_tpot_ms"], native["median_tpot_ms"])
        ratios[f"{kind}_ttft_vs_vllm_server"] = _ratio(figures[kind]["median_ttft_ms"], native["median_ttft_ms"])
        # The same ratios within each round, then their median: the figure least moved by the machine's drift.
        rounds = list(zip(runs[kind], runs["vllm_server"]))
        paired = [_ratio(ours["req_per_s"], theirs["req_per_s"]) for ours, theirs in rounds]
        paired_tpot = [_ratio(ours["median_tpot_ms"], theirs["median_tpot_ms"]) for ours, theirs in rounds]
        ratios[f"{kind}_vs_vllm_server_each_round"] = paired
        ratios[f"{kind}_tpot_vs_vllm_server_each_round"] = paired_tpot
        ratios[f"{kind}_vs_vllm_server_paired"] = _median_of(paired)
        ratios[f"{kind}_tpot_vs_vllm_server_paired"] = _median_of(paired_tpot)
    throughput, tpot = ratios.get("ours_vs_vllm_server"), ratios.get("ours_tpot_vs_vllm_server")
    return {
        "bench": "vllm_vs_native",
        "figures": figures,
        "ratios": ratios,
        "goals": {
            "ours_vs_vllm_server": {"goal": ">= 0.95", "value": throughput,
                                    "paired": ratios.get("ours_vs_vllm_server_paired"),
                                    "met": throughput is not None and throughput >= 0.95},
            "ours_tpot_vs_vllm_server": {"goal": "<= 1.05", "value": tpot,
                                         "paired": ratios.get("ours_tpot_vs_vllm_server_paired"),
                                         "met": tpot is not None and tpot <= 1.05},
        },
        "setup": {"model": args.model, "num_prompts": args.num_prompts, "repeats": args.repeats,
                  "input_len": args.input_len,
                  "output_len": args.output_len, "concurrency": args.concurrency, "dtype": "float32",
                  "kv_cache_bytes": KV_CACHE_BYTES, "client": "vllm.benchmarks.serve (openai backend, /v1/completions)",
                  "logs": str(work), "cpus": os.cpu_count()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muai bench vllm_vs_native", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama", help="model (default builtin:tiny-llama)")
    parser.add_argument("--num-prompts", type=int, default=400, help="requests per server (default 400)")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens (default 32)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds a server may take to start")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of the servers, alternating their order; figures are medians (default 5)")
    parser.add_argument("--warmup-prompts", type=int, default=64,
                        help="prompts each server answers, unmeasured, before the first round (default 64; 0: none)")
    parser.add_argument("--servers", type=lambda v: [k.strip() for k in v.split(",") if k.strip()],
                        default=list(KINDS),
                        help="which servers to measure, comma-separated; vllm_server is always one "
                             f"(default {','.join(KINDS)})")
    add_output_args(parser)
    args = parser.parse_args(argv)
    unknown = set(args.servers) - set(KINDS)
    if unknown:
        parser.error(f"--servers: unknown {', '.join(sorted(unknown))} (known: {', '.join(KINDS)})")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return finish(run(args), args)


if __name__ == "__main__":
    sys.exit(main())
