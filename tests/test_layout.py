"""The house rules of DESIGN.md that code can check."""

import subprocess
import sys


def test_monitoring_packages_never_import_torch():
    code = "import detectors, alerting, sidecar, adapters, sys; bad = [m for m in ('torch', 'vllm', 'deepspeed', 'onnxruntime', 'transformers') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_orchestrator_and_sidecar_never_import_each_other():
    code = (
        "import sys, orchestrator, orchestrator.server;"
        "assert not any(m == 'sidecar' or m.startswith('sidecar.') for m in sys.modules), 'orchestrator imports sidecar';"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    code = (
        "import sys, sidecar, sidecar.app;"
        "assert not any(m == 'orchestrator' or m.startswith('orchestrator.') for m in sys.modules), 'sidecar imports orchestrator';"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
