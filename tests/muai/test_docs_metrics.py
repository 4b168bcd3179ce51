import re
from pathlib import Path

from muai.cli import main
from muai.docs import METRICS_HEADER, metric_names, render_metrics_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
REGENERATE = "regenerate: muai config docs --metrics -o docs/metrics.md"


def test_metrics_reference_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == render_metrics_reference(), REGENERATE


def test_both_processes_are_listed_with_their_core_families():
    names = metric_names(DOC.read_text(encoding="utf-8"))
    for name in (
        "muai_requests_total", "muai_request_latency_seconds", "muai_batch_inference_count_total",
        "muai_batch_execution_count_total", "muai_rejected_requests_total",  # orchestrator
        "muai_sidecar_latency_seconds", "muai_gpu_utilization_ratio", "muai_host_memory_used_bytes",
        "muai_sidecar_notifications_sent_total", "muai_sidecar_forwarded_batches_total",  # sidecar
    ):
        assert name in names


def test_every_row_has_a_type_and_help_text():
    rows = [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| `muai_")]
    assert rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[1] in {"counter", "gauge", "histogram", "summary"}, row
        assert cells[3], f"no help text: {row}"


def test_names_in_the_hand_written_intro_exist():
    names = metric_names(render_metrics_reference())
    for mentioned in set(re.findall(r"muai_[a-z0-9_]+", METRICS_HEADER)):
        if mentioned.endswith("_"):  # a prefix such as muai_gpu_
            assert any(n.startswith(mentioned) for n in names), mentioned
        else:
            base = re.sub(r"_(bucket|sum|count)$", "", mentioned)
            assert mentioned in names or base in names, mentioned


def test_cli_writes_the_reference(tmp_path):
    out = tmp_path / "metrics.md"
    assert main(["config", "docs", "--metrics", "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render_metrics_reference()
