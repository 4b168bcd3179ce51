"""`muai bench fuzz`, briefly: both real processes, schemathesis both ways and random bodies on every route that
takes one; no 5xx, no traceback in either log, both alive after (the long run is the benchmark's)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bench import fuzz

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(240)]


def test_a_short_fuzz_of_both_servers_finds_nothing_and_reaches_every_route(tmp_path: Path, capsys):
    status = fuzz.main(["--examples", "3", "--requests", "80", "--results-dir", str(tmp_path), "--strict"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 0, report["goals"]
    figures = report["figures"]
    assert {"orchestrator_positive", "orchestrator_negative", "sidecar_positive", "sidecar_negative"} <= set(figures)
    assert figures["orchestrator_positive"]["operations"] >= 13 and figures["sidecar_positive"]["operations"] >= 9
    bodies = figures["random_bodies"]
    assert bodies["server_errors"] == 0 and bodies["connections_dropped"] == 0
    assert sum(n for s, n in bodies["statuses"].items() if s.startswith("4")) > bodies["requests"] // 2
    assert figures["tracebacks_logged"] == {"serve": 0, "sidecar": 0} and figures["alive_after"] is True


def test_the_random_bodies_cover_every_route_that_takes_a_body():
    cases = fuzz._cases(random.Random(1), 400, "http://s", "http://c")
    routes = {(method, url.split("//", 1)[1].split("/", 1)[1]) for method, url, _, _ in cases}
    assert {("POST", "v1/completions"), ("POST", "v1/chat/completions"), ("POST", "v1/embeddings"),
            ("POST", "v1/workflows/chat"), ("PATCH", "admin/config"), ("PATCH", "api/v1/config"),
            ("POST", "v1/traces")} <= routes
    assert any(h.get("Content-Encoding") for _, _, _, h in cases)
    assert any(len(body) > fuzz.MAX_BODY for _, _, body, _ in cases)
