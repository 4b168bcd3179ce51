"""The batching benchmark runs end to end at a toy size and reports its shape (never its speed)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.timeout(180)


def test_bench_prints_one_json_line_and_writes_its_report(tmp_path, tmp_path_factory, capsys, monkeypatch):
    pytest.importorskip("transformers")
    # builtin:tiny-llama is built (once per session, shared with the manager tests) under this cache.
    monkeypatch.setenv("MUAI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "muai-cache"))
    from bench import batching

    rc = batching.main([
        "--clients", "4", "--max-new-tokens", "2", "--rounds", "1", "--repeats", "1", "--latency-samples", "5",
        "--overhead-rounds", "3", "--results-dir", str(tmp_path / "results"),
    ])
    assert rc == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report == json.loads((tmp_path / "results" / "batching.json").read_text())
    assert report["bench"] == "batching" and set(report) == {"bench", "figures", "ratios", "goals"}
    assert set(report["ratios"]) == {"batched_vs_raw", "batched_vs_unbatched"}
    assert set(report["goals"]) == {"batched_vs_raw", "batched_vs_unbatched", "added_latency_ms", "overhead_us_per_request"}
    assert all(isinstance(g["met"], bool) for g in report["goals"].values())
    fig = report["figures"]
    assert fig["path"].startswith("ModelManager") and fig["engine"] == "torch" and fig["clients"] == 4
    # The setup says what ran: the default model, the sizes given, and the default-sized ones.
    assert fig["model"] == "builtin:tiny-llama" and fig["max_new_tokens"] == 2 and fig["rounds"] == 1
    assert fig["unbatched_rounds"] == batching.SIZES["builtin:tiny-llama"]["unbatched_rounds"]
    assert fig["mean_batch_size"] > 1  # the concurrent clients really were batched


def test_sizes_follow_the_model_and_each_option_overrides_its_own():
    from bench import batching

    tiny = batching.parse_args([])
    assert tiny.model == "builtin:tiny-llama"
    assert {k: getattr(tiny, k) for k in batching.SIZES["builtin:tiny-llama"]} == batching.SIZES["builtin:tiny-llama"]
    big = batching.parse_args(["--model", "builtin:bench-llama", "--rounds", "7"])
    want = dict(batching.SIZES["builtin:bench-llama"], rounds=7)
    assert {k: getattr(big, k) for k in want} == want
    # A model the table does not know is sized like the large one, not like the toy.
    other = batching.parse_args(["--model", "/models/some-llama"])
    assert other.repeats == batching.SIZES["builtin:bench-llama"]["repeats"]
