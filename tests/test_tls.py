"""Transport security: both servers over HTTPS with a certificate made here, and the refusal to put an admin token on
the network in clear text.

The stack test runs `muai up` with TLS on both processes: real HTTPS requests (verified against the test's own CA) to
the orchestrator, its metrics port and the sidecar, the tuner driving the orchestrator's admin API over HTTPS, the
orchestrator's spans reaching the sidecar over HTTPS, and the OTLP/gRPC receiver behind the same certificate.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError
from support.ports import free_ports
from support.procs import ROOT, Process
from support.tls import https_json, self_signed
from support.waiting import poll

from orchestrator.config import ServerConfig
from orchestrator.tls import insecure_admin_problem, is_loopback
from sidecar.config import SidecarConfig

pytestmark = pytest.mark.timeout(180)
TOKEN = "tls-test-admin-token-0123456789"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUAI_") or k == "MUAI_CACHE_DIR"}
    env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    return env


# --- the rule -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_addresses(host: str):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "192.168.0.10", "example.internal", "::ffff:10.0.0.1"])
def test_addresses_beyond_loopback(host: str):
    assert not is_loopback(host)


def test_the_problem_is_only_a_token_beyond_loopback_without_tls():
    args = dict(section="server", host="0.0.0.0", token_key="server.admin_token", token_set=True, tls_on=False, allowed=False)
    assert insecure_admin_problem(**args)
    assert insecure_admin_problem(**{**args, "host": "127.0.0.1"}) is None
    assert insecure_admin_problem(**{**args, "token_set": False}) is None
    assert insecure_admin_problem(**{**args, "tls_on": True}) is None
    assert insecure_admin_problem(**{**args, "allowed": True}) is None


def test_orchestrator_config_refuses_an_admin_token_beyond_loopback_without_tls():
    with pytest.raises(ValidationError) as info:
        ServerConfig(host="0.0.0.0", admin_token=TOKEN)
    message = str(info.value)
    for key in ("server.host", "server.admin_token", "server.tls.cert_file", "server.tls.key_file",
                "server.allow_insecure_admin"):
        assert key in message, key
    assert TOKEN not in message, "the refusal must not print the token it protects"
    # Each way out is accepted: TLS, loopback, no admin API, or the explicit allowance.
    ServerConfig(host="0.0.0.0", admin_token=TOKEN, tls={"cert_file": "c.pem", "key_file": "k.pem"})
    ServerConfig(host="127.0.0.1", admin_token=TOKEN)
    ServerConfig(host="0.0.0.0")
    ServerConfig(host="0.0.0.0", admin_token=TOKEN, allow_insecure_admin=True)


def test_sidecar_config_refuses_its_token_beyond_loopback_without_tls():
    with pytest.raises(ValidationError) as info:
        SidecarConfig(host="0.0.0.0", tuner={"admin_token": TOKEN})
    message = str(info.value)
    for key in ("sidecar.host", "sidecar.tuner.admin_token", "sidecar.tls.cert_file", "sidecar.tls.key_file",
                "sidecar.allow_insecure_admin"):
        assert key in message, key
    assert TOKEN not in message
    SidecarConfig(host="0.0.0.0", tuner={"admin_token": TOKEN}, tls={"cert_file": "c.pem", "key_file": "k.pem"})
    SidecarConfig(host="0.0.0.0", tuner={"admin_token": TOKEN}, allow_insecure_admin=True)
    SidecarConfig(host="0.0.0.0")


@pytest.mark.parametrize("model", [ServerConfig, SidecarConfig])
def test_certificate_and_key_go_together(model):
    with pytest.raises(ValidationError, match=r"tls.cert_file and .*tls.key_file go together"):
        model(tls={"cert_file": "c.pem"})


def test_muai_serve_refuses_to_start_and_names_the_keys(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "muai", "serve", "--set", "server.host=0.0.0.0", "--set", f"server.admin_token={TOKEN}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    for key in ("server.tls.cert_file", "server.tls.key_file", "server.allow_insecure_admin"):
        assert key in result.stderr, result.stderr
    assert TOKEN not in result.stdout + result.stderr


def test_muai_up_refuses_before_starting_anything():
    result = subprocess.run(
        [sys.executable, "-m", "muai", "up", "--set", "sidecar.host=0.0.0.0"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "sidecar.tls.cert_file" in result.stderr and "sidecar.allow_insecure_admin" in result.stderr
    assert "sidecar on" not in result.stdout, "nothing may start"


def test_an_unreadable_certificate_stops_either_server_naming_the_keys(tmp_path: Path, caplog):
    from muai.config import load_config
    from orchestrator.server import serve
    from sidecar.app import run

    missing = str(tmp_path / "missing.pem")
    config = load_config(env={}, overrides=[f"server.tls.cert_file={missing}", f"server.tls.key_file={missing}",
                                            f"sidecar.tls.cert_file={missing}", f"sidecar.tls.key_file={missing}"])
    with caplog.at_level(logging.ERROR):
        assert serve(config) == 1
        assert run(config) == 1
    text = caplog.text
    assert "server.tls.cert_file" in text and "sidecar.tls.cert_file" in text and "missing.pem" in text


# --- both servers over HTTPS --------------------------------------------------------------------------------------


def _plain_http_gets_no_answer(url: str) -> bool:
    try:
        urllib.request.urlopen(url.replace("https://", "http://"), timeout=5)
    except (urllib.error.URLError, OSError, ValueError):
        return True
    return False


def test_muai_up_serves_both_over_https_and_the_tuner_and_the_spans_follow(tmp_path: Path):
    cert = self_signed(tmp_path / "tls")
    server_port, sidecar_port, metrics_port, grpc_port = free_ports(4)
    tls = {"cert_file": str(cert.cert_file), "key_file": str(cert.key_file)}
    config = {
        "models": [{"name": "echo", "path": str(tmp_path), "engine": "echo"}],
        "engines": {"preference": ["torch"]},
        "server": {"port": server_port, "admin_token": TOKEN, "drain_timeout_s": 2, "tls": tls},
        "telemetry": {"metrics": {"port": metrics_port}, "tracing": {"ca_file": str(cert.ca_file)}},
        "sidecar": {
            "port": sidecar_port, "otlp_grpc_port": grpc_port, "tls": tls,
            "collectors": {"gpu": {"enabled": False}, "interval_s": 0.5, "orchestrator": {"ca_file": str(cert.ca_file)}},
            "tuner": {"interval_s": 0.25, "state_dir": str(tmp_path / "tuner")},
        },
    }
    path = tmp_path / "muai.yaml"
    path.write_text(json.dumps(config))
    up = Process("muai-up", [sys.executable, "-m", "muai", "up", "--config", str(path)], tmp_path / "up.log", env=_env())
    server, sidecar = f"https://127.0.0.1:{server_port}", f"https://127.0.0.1:{sidecar_port}"
    context = cert.client_context()
    with up:
        poll(lambda: https_json(f"{server}/health/ready", context)[1]["ready"], timeout=120, what="orchestrator ready",
             retry_on=(OSError, urllib.error.URLError), diagnose=up.describe)
        poll(lambda: https_json(f"{sidecar}/health", context)[1]["status"], timeout=60, what="sidecar up",
             retry_on=(OSError, urllib.error.URLError), diagnose=up.describe)

        # A client that does not trust the certificate is refused by its own TLS layer.
        with pytest.raises(urllib.error.URLError) as refused:
            https_json(f"{server}/health/live", ssl.create_default_context())
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
        for url in (f"{server}/health/live", f"{sidecar}/health"):
            assert _plain_http_gets_no_answer(url), f"{url} answered plain HTTP"

        status, answer = https_json(f"{server}/v1/completions", context,
                                    method="POST", body={"model": "echo", "prompt": "a b c", "max_tokens": 3})
        assert status == 200 and answer["usage"]["completion_tokens"] == 3
        status, admin = https_json(f"{server}/admin/config", context, headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and admin
        status, metrics = https_json(f"https://127.0.0.1:{metrics_port}/metrics", context)
        assert status == 200 and "muai_requests_total" in metrics

        # The tuner (verifying the orchestrator with sidecar.collectors.orchestrator.ca_file) reads its admin API.
        def tuner_reads_the_orchestrator():
            tuner = https_json(f"{sidecar}/api/v1/tuner", context)[1]
            assert tuner["active"], tuner["status"]
            return tuner["ticks"] > 0 and tuner["status"] == "tuning" and tuner["settings"]["server.queue_capacity"]["value"]

        poll(tuner_reads_the_orchestrator, timeout=30, what="the tuner reading the orchestrator over HTTPS",
             retry_on=(OSError,), diagnose=up.describe)

        # The orchestrator's spans (verifying the sidecar with telemetry.tracing.ca_file) arrive over HTTPS.
        def span_seen_by_the_sidecar():
            rows = https_json(f"{sidecar}/api/v1/stats?model=echo", context)[1]["stats"]
            return any(row.get("operation") == "text_completion" for row in rows)

        poll(span_seen_by_the_sidecar, timeout=30, what="the request's span in the sidecar's stats",
             retry_on=(OSError, urllib.error.URLError), diagnose=up.describe)

        # The sidecar's runtime configuration, token-guarded, over HTTPS.
        status, changed = https_json(f"{sidecar}/api/v1/config", context, method="PATCH",
                                     body={"detectors": {"latency": {"threshold_s": 3.0}}},
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200, changed

        # OTLP/gRPC behind the same certificate: an empty export is accepted over a verified channel.
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.ca_file.read_bytes())
        with grpc.secure_channel(f"localhost:{grpc_port}", credentials) as channel:
            export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
            assert export(b"", timeout=10) == b""
