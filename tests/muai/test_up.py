"""`muai up`: both processes start, traces flow into the sidecar, one SIGTERM stops both cleanly."""

import json
import signal
import sys
import urllib.error
import urllib.request

from support.ports import free_ports
from support.procs import Process
from support.waiting import poll


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_up_runs_both_and_stops_both_on_one_signal(tmp_path):
    server_port, sidecar_port = free_ports(2)
    up = Process(
        "muai-up",
        [sys.executable, "-m", "muai", "up",
         "--set", f"server.port={server_port}", "--set", f"sidecar.port={sidecar_port}",
         "--set", "engines.preference=[torch]",
         "--set", 'models=[{"name": "tiny-llama", "path": "builtin:tiny-llama"}]'],
        tmp_path / "up.log",
    )
    up.start()
    try:
        server = f"http://127.0.0.1:{server_port}"
        sidecar = f"http://127.0.0.1:{sidecar_port}"
        log = lambda: up.log_path.read_text()  # noqa: E731
        poll(lambda: _get(f"{server}/health/ready")["ready"], timeout=120, what="orchestrator ready",
             retry_on=(OSError, urllib.error.URLError), diagnose=log)
        poll(lambda: _get(f"{sidecar}/health")["status"], timeout=60, what="sidecar up",
             retry_on=(OSError, urllib.error.URLError), diagnose=log)
        # muai up wires the tuner: one admin token for both, handed over in the environment.
        def tuner_reads_the_orchestrator():
            tuner = _get(f"{sidecar}/api/v1/tuner")
            assert tuner["active"], tuner["status"]
            return tuner["ticks"] > 0 and tuner["status"] == "tuning" and tuner["settings"]["server.queue_capacity"]["value"]

        poll(tuner_reads_the_orchestrator, timeout=30, what="the tuner reading the orchestrator's admin API",
             retry_on=(OSError,), diagnose=log)
        # Sampling at the default temperature on random weights can draw EOS early (CI once got 2 tokens of 4).
        answer = _post(f"{server}/v1/completions",
                       {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
        assert answer["usage"]["completion_tokens"] == 4

        def request_seen_by_sidecar():
            stats = _get(f"{sidecar}/api/v1/stats?model=tiny-llama")["stats"]
            return any(row.get("operation") == "text_completion" for row in stats)

        # 404 (no span of that model yet) counts as "not yet".
        poll(request_seen_by_sidecar, timeout=30, what="the request's span in the sidecar's stats",
             retry_on=(OSError,), diagnose=log)
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=60) == 0, log()
        text = log()
        assert "drained" in text and "sidecar stopped" in text
        for url in (f"{server}/health/live", f"{sidecar}/health"):
            try:
                urllib.request.urlopen(url, timeout=2)
            except (OSError, urllib.error.URLError):
                continue
            raise AssertionError(f"{url} still answers after muai up stopped")
    finally:
        up.stop()
