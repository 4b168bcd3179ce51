"""The public surface of the sidecar package, and the process entry point."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from support.ports import free_port
from support.waiting import poll

import sidecar

ROOT = Path(__file__).resolve().parents[2]


def test_exported_members():
    assert sorted(sidecar.__all__) == sorted(
        [
            "DEFAULT_PORT", "Evaluator", "GpuCollector", "GpuSample", "HostCollector", "HostSample", "MalformedPayload",
            "OtlpError", "PayloadTooLarge", "PerformanceMonitor", "SeriesKey", "SeriesStats", "SidecarConfig",
            "SidecarError", "SidecarState", "SpanSample", "UnsupportedMediaType", "create_app", "map_request", "run", "serve",
        ]
    )
    for name in sidecar.__all__:
        assert getattr(sidecar, name) is not None
    assert issubclass(sidecar.MalformedPayload, (sidecar.SidecarError, ValueError))
    assert sidecar.DEFAULT_PORT == 9464


def test_importing_sidecar_imports_no_engine():
    code = "import sys, sidecar, sidecar.app; bad = [m for m in ('torch', 'vllm', 'deepspeed', 'onnxruntime', 'transformers') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)


def test_process_serves_and_stops_cleanly_on_sigterm():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    assert resp.status == 200
                    return True
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        poll(healthy, timeout=60, interval=0.1, what="the sidecar to come up")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert f"listening on http://127.0.0.1:{port}" in out and "stopped" in out


def test_port_in_use_is_a_clear_error_not_a_traceback():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert "could not start" in result.stderr and "Traceback" not in result.stderr
