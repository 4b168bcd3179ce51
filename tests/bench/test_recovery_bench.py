"""`muai bench recovery`, briefly: vLLM's engine core SIGKILLed under load is noticed at once, every request is
answered (torch takes the model, then vLLM takes it back at the re-probe), and two torch replicas both serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import recovery

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]


def test_a_killed_engine_core_costs_no_request_and_vllm_comes_back(tmp_path: Path, capsys):
    status = recovery.main(["--warmup", "1.5", "--duration", "2", "--reprobe-after", "3", "--connections", "4",
                            "--rounds", "1", "--results-dir", str(tmp_path), "--strict"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 0, report["goals"]
    kill = report["figures"]["engine_core_kill"]
    assert kill["unanswered"] == 0 and kill["requests_after_kill"] > 0
    assert kill["engine_core_recovery_s"] <= 30
    assert kill["vllm_back_s"] is not None, "vLLM never took the model back after the re-probe"
    # Readiness shows the degradation and its cause while torch serves, and is ready again once vLLM is back.
    assert "degraded" in kill["readiness_after_kill"] and kill["readiness_after_kill"][-1] == "ready"
    assert kill["degraded_reason"] and "vllm" in kill["degraded_reason"].lower()
    assert report["figures"]["replicas_2"]["req_per_s"] > 0 and report["figures"]["replicas_2"]["errors"] == 0
    assert report["ratios"]["replicas2_vs_1"] > 0
