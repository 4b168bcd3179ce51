"""The `muai` command: serve, sidecar, up, config, models, bench.

Heavy packages (torch, the engines, the servers) are imported only by the subcommand that needs them, so
`muai --help` and `muai config check` answer at once.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from muai.config import PROFILES, ConfigError, MuaiConfig, dump_yaml, load_config

log = logging.getLogger("muai")

BENCHMARKS: dict[str, str] = {
    "engines": "engine throughput: ONNX Runtime vs PyTorch, and the all-disabled path vs plain transformers",
    "server": "server throughput with metrics and tracing on vs off (echo engine, 64 connections)",
    "batching": "dynamic batching vs the raw engine and vs unbatched; batcher overhead",
    "kv_cache": "multi-turn KV-cache reuse vs recomputing the history",
    "sidecar": "OTLP ingestion rate, query latency, CPU and RSS of the sidecar",
    "tuning": "the sidecar's auto-tuner vs the default and the best grid-searched static settings on a shifting load",
    "faults": "serving throughput and p99 with the OTLP endpoint, a webhook or Alertmanager down vs all healthy",
    "nab": "detector quality on the Numenta Anomaly Benchmark beside its published detectors (needs ../shared/nab)",
    "fuzz": "schemathesis and random bodies against both HTTP APIs: no 5xx, every answer as documented",
    "vllm_vs_native": "our server on the vLLM adapter vs vLLM's own OpenAI server, same model and client",
    "recovery": "a killed vLLM engine core under load: time to serving again, every request answered; 2 replicas vs 1",
}


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML configuration (default: $MUAI_CONFIG, else built-in defaults)")
    parser.add_argument("--profile", choices=PROFILES, help="start from a shipped profile (default: $MUAI_PROFILE)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one key, e.g. --set server.port=8001 (repeatable; beats file and environment)",
    )


def _config(args: argparse.Namespace, extra: Sequence[str] = ()) -> MuaiConfig:
    return load_config(getattr(args, "config", None), profile=getattr(args, "profile", None),
                       overrides=[*args.overrides, *extra])


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _listen_overrides(args: argparse.Namespace, section: str) -> list[str]:
    extra = []
    if getattr(args, "host", None):
        extra.append(f"{section}.host={args.host}")
    if getattr(args, "port", None):
        extra.append(f"{section}.port={args.port}")
    return extra


def _not_available(capability: str, module: str) -> CliError:
    return CliError(f"{capability} is not available in this build yet (module {module} is missing)")


def _import(module: str, capability: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name.split(".")[0]) and exc.name in module:
            raise _not_available(capability, module) from exc
        raise


# ----------------------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args, _listen_overrides(args, "server"))
    server = _import("orchestrator.server", "the orchestrator server")
    from muai.config import ORCHESTRATOR_SECTIONS, apply_update

    update = functools.partial(apply_update, sections=ORCHESTRATOR_SECTIONS)
    return int(server.serve(config, update_config=update) or 0)


def cmd_sidecar(args: argparse.Namespace) -> int:
    config = _config(args, _listen_overrides(args, "sidecar"))
    sidecar = _import("sidecar", "the sidecar")
    return int(sidecar.run(config) or 0)


def cmd_up(args: argparse.Namespace) -> int:
    """Both processes for local use: the sidecar first, the orchestrator tracing into it; Ctrl-C stops both."""
    config = _config(args)
    state_dir = Path(os.environ.get("MUAI_CACHE_DIR") or Path.home() / ".cache" / "muai") / "run"
    state_dir.mkdir(parents=True, exist_ok=True)
    pid_file = state_dir / "orchestrator.pid"
    sidecar_url = f"{'https' if config.sidecar.tls.enabled else 'http'}://{config.sidecar.host}:{config.sidecar.port}"
    server_url = f"{'https' if config.server.tls.enabled else 'http'}://{config.server.host}:{config.server.port}"
    _refuse_clear_text_tokens(config)
    source: list[str] = []
    if args.config:
        source += ["--config", args.config]
    if args.profile:
        source += ["--profile", args.profile]
    # The user's own --set come last so they win over the wiring below.
    user_sets = [arg for item in args.overrides for arg in ("--set", item)]
    base = [sys.executable, "-m", "muai", "--log-level", args.log_level]
    sidecar_cmd = [*base, "sidecar", *source,
                   "--set", f"sidecar.collectors.orchestrator.pid_file={pid_file}",
                   "--set", f"sidecar.collectors.orchestrator.url={server_url}", *user_sets]
    server_cmd = [*base, "serve", *source,
                  "--set", f"server.pid_file={pid_file}",
                  "--set", f"telemetry.tracing.endpoint={sidecar_url}/v1/traces", *user_sets]
    # The sidecar's tuner drives the orchestrator's admin API, which needs a token: one made for this run when the
    # configuration has none. Handed over in the environment, so it never shows in a process listing.
    env = dict(os.environ)
    token = config.server.admin_token or secrets.token_urlsafe(32)
    tuner_token = config.sidecar.tuner.admin_token
    env["MUAI_SERVER__ADMIN_TOKEN"] = token
    env["MUAI_SIDECAR__TUNER__ADMIN_TOKEN"] = tuner_token.get_secret_value() if tuner_token else token
    sidecar: subprocess.Popen | None = None
    server: subprocess.Popen | None = None

    def request_stop(*_: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"muai up: sidecar on {sidecar_url}, orchestrator on {server_url} (Ctrl-C stops both)", flush=True)
        # Own sessions: a terminal's Ctrl-C reaches only this process, which then signals each child exactly once
        # (a second signal would cut the orchestrator's drain short).
        sidecar = subprocess.Popen(sidecar_cmd, start_new_session=True, env=env)
        server = subprocess.Popen(server_cmd, start_new_session=True, env=env)
        while sidecar.poll() is None and server.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        # Further Ctrl-C while stopping must not abandon the sidecar (it runs in its own session).
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        # The orchestrator first, so it drains and flushes its spans while the sidecar still listens.
        _stop_child(server, timeout=config.server.drain_timeout_s + 10.0)
        _stop_child(sidecar, timeout=10.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [child.returncode for child in (sidecar, server) if child is not None]
    return 0 if all(code in (0, -signal.SIGTERM, -signal.SIGINT) for code in codes) else 1


def _refuse_clear_text_tokens(config: MuaiConfig) -> None:
    """``muai up`` always hands both processes an admin token (the tuner's), so the rule each would apply at its own
    start-up (admin token + beyond loopback + no TLS = refused) is applied here first, before anything starts."""
    from orchestrator.tls import insecure_admin_problem as server_problem
    from sidecar.tls import insecure_admin_problem as sidecar_problem

    problems = [
        server_problem(section="server", host=config.server.host, token_key="server.admin_token", token_set=True,
                       tls_on=config.server.tls.enabled, allowed=config.server.allow_insecure_admin),
        sidecar_problem(section="sidecar", host=config.sidecar.host, token_key="sidecar.tuner.admin_token",
                        token_set=True, tls_on=config.sidecar.tls.enabled, allowed=config.sidecar.allow_insecure_admin),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CliError("muai up gives the tuner an admin token on both processes: " + "; ".join(problems))


def _stop_child(child: subprocess.Popen | None, *, timeout: float) -> None:
    if child is None:
        return
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d did not stop within %.0fs; killing it", child.pid, timeout)
        child.kill()
        child.wait()


def cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.file or args.config, profile=args.profile, overrides=args.overrides)
    print(dump_yaml(config), end="")
    print(f"# configuration OK ({len(config.models)} models)", file=sys.stderr)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    config = load_config(args.config, profile=args.profile, overrides=args.overrides)
    print(dump_yaml(config), end="")
    return 0


def cmd_config_docs(args: argparse.Namespace) -> int:
    from muai.docs import render_configuration_reference, render_metrics_reference

    text = render_metrics_reference() if args.metrics else render_configuration_reference()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_models_make_tiny(args: argparse.Namespace) -> int:
    from adapters.tiny import build_tiny_models

    start = time.monotonic()
    built = build_tiny_models(args.dir, seed=args.seed,
                              progress=lambda name: print(f"building {name} ...", file=sys.stderr, flush=True))
    for name, path in built.items():
        print(f"{name}\t{path}")
    print(f"built {len(built)} models in {time.monotonic() - start:.1f}s", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.list:
        for name, what in BENCHMARKS.items():
            print(f"{name:10s} {what}")
        return 0
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise CliError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    # bench/ is a plain folder of the checkout, not an installed package.
    repo_root = str(Path(__file__).resolve().parents[1])
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    status = 0
    for name in names:
        module = _import(f"bench.{name}", f"benchmark {name!r}")
        print(f"# bench {name}: {BENCHMARKS[name]}", file=sys.stderr, flush=True)
        status |= int(module.main(args.bench_args) or 0)
    return status


# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muai",
        description="MuAI: serve models on vLLM, DeepSpeed, ONNX Runtime or PyTorch, and monitor them with a sidecar.",
    )
    parser.add_argument("--log-level", default=os.environ.get("MUAI_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"], help="log level (default: info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the orchestrator (OpenAI-compatible HTTP server)",
                       description="Run the orchestrator. With no configuration it serves the embedded default models.")
    _add_config_args(p)
    p.add_argument("--host", help="listen address (server.host)")
    p.add_argument("--port", type=int, help="listen port (server.port)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("sidecar", help="run the monitoring sidecar",
                       description="Run the sidecar: NVML/host collectors, OTLP receiver, percentiles, detectors, alerts.")
    _add_config_args(p)
    p.add_argument("--host", help="listen address (sidecar.host)")
    p.add_argument("--port", type=int, help="listen port (sidecar.port)")
    p.set_defaults(func=cmd_sidecar)

    p = sub.add_parser("up", help="run the orchestrator and the sidecar together (local use)",
                       description="Start the sidecar and the orchestrator, traces flowing into the sidecar. Ctrl-C stops both.")
    _add_config_args(p)
    p.set_defaults(func=cmd_up)

    cfg = sub.add_parser("config", help="validate, show or document the configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = cfg_sub.add_parser("check", help="validate FILE (+ environment) and print the effective configuration")
    p.add_argument("file", nargs="?", help="YAML file (default: --config, $MUAI_CONFIG, or none)")
    _add_config_args(p)
    p.set_defaults(func=cmd_config_check)
    p = cfg_sub.add_parser("show", help="print the effective configuration, e.g. of a profile")
    _add_config_args(p)
    p.set_defaults(func=cmd_config_show)
    p = cfg_sub.add_parser("docs", help="write the configuration reference (docs/configuration.md)")
    p.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")
    p.add_argument("--metrics", action="store_true",
                   help="write the Prometheus metrics reference (docs/metrics.md) instead")
    p.set_defaults(func=cmd_config_docs)

    models = sub.add_parser("models", help="build the embedded tiny models")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = models_sub.add_parser("make-tiny", help="build the tiny Llama and GPT-2 models and their tokenizer into DIR")
    p.add_argument("dir", help="destination folder (one sub-folder per model)")
    p.add_argument("--seed", type=int, default=1234, help="random seed (same seed, same weights)")
    p.set_defaults(func=cmd_models_make_tiny)

    p = sub.add_parser("bench", help="run benchmarks (prints one JSON line each, writes bench/results/NAME.json)")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--bench-args", nargs=argparse.REMAINDER, default=[], help="arguments passed to each benchmark")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"muai: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"muai: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
