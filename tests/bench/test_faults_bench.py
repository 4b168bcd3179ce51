"""`muai bench faults`, briefly: under each telemetry fault every request is still answered, and the failures land in
the counters of the process that met them (the speed itself is the benchmark's to report, not this test's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import faults

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(240)]


def test_faults_never_become_serving_errors_and_are_counted_where_they_happen(tmp_path: Path, capsys):
    status = faults.main(["--rounds", "1", "--duration", "0.5", "--warmup", "0.3", "--connections", "8",
                          "--results-dir", str(tmp_path)])
    assert status == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "faults.json").read_text())
    figures = report["figures"]
    assert set(figures["rps"]) == set(faults.CONDITIONS)
    assert all(figures["rps"][c] > 0 for c in faults.CONDITIONS)
    assert figures["errors"] == {c: 0 for c in faults.CONDITIONS}, "a telemetry fault turned into a serving error"
    assert "serving_under_telemetry_faults_vs_healthy" in report["ratios"]

    notes = figures["notifications"]
    assert notes["healthy"]["webhook"]["sent"] > 0 and notes["healthy"]["webhook"]["failed"] == 0
    webhook = notes["webhook_500"]["webhook"]
    assert webhook["retried"] > 0 and webhook["sent"] == 0
    if "a real Alertmanager" in report["setup"]["conditions"]["healthy"]:
        assert notes["healthy"]["alertmanager"]["sent"] > 0
    manager = notes["alertmanager_down"]["alertmanager"]
    assert manager["retried"] > 0 and manager["sent"] == 0
    # The other sink of a faulted sidecar goes on delivering.
    assert notes["alertmanager_down"]["webhook"]["sent"] > 0

    telemetry = figures["orchestrator_telemetry"]
    assert telemetry["otlp_down"]["export_failures"] > 0
    assert telemetry["healthy"] == {"spans_dropped": 0.0, "export_failures": 0.0}
