"""Pins the public surface of the detectors package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import detectors

EXPECTED = {
    "DEFAULT_HORIZONS",
    "CusumDetector",
    "DailyRecurrence",
    "Detector",
    "DetectorConfigError",
    "DetectorError",
    "EwmaDetector",
    "LikelihoodDetector",
    "MadDetector",
    "MultiRatioWindow",
    "MultiWindow",
    "NoveltyDetector",
    "RatioWindow",
    "RecurringGate",
    "RollingWindow",
    "RuleState",
    "ThresholdRule",
    "UnknownWindowError",
    "Verdict",
    "WindowStats",
    "error_rate_above",
    "latency_above",
    "memory_percent_above",
    "throughput_below",
}


def test_all_is_pinned():
    assert set(detectors.__all__) == EXPECTED
    assert len(detectors.__all__) == len(EXPECTED)


def test_every_exported_name_resolves():
    for name in detectors.__all__:
        assert getattr(detectors, name) is not None


def test_public_classes_have_docstrings():
    for name in detectors.__all__:
        obj = getattr(detectors, name)
        if isinstance(obj, type) or callable(obj):
            assert obj.__doc__, name


def test_error_hierarchy():
    assert issubclass(detectors.DetectorConfigError, detectors.DetectorError)
    assert issubclass(detectors.DetectorConfigError, ValueError)
    assert issubclass(detectors.UnknownWindowError, KeyError)


def test_importing_detectors_pulls_in_no_engine():
    code = (
        "import sys, detectors\n"
        "heavy = [m for m in ('torch', 'vllm', 'onnxruntime', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    root = Path(detectors.__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""
