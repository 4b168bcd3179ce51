"""Suite-wide settings: offline engines, caches inside the repo's ignored area, GPU tests only where a GPU is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_CACHE = ROOT / ".cache"

# The same as the Makefile exports, for runs of pytest without make.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "MUAI_CACHE_DIR": str(_CACHE / "muai"),
    "TORCH_EXTENSIONS_DIR": str(_CACHE / "torch_extensions"),
    "VLLM_CACHE_ROOT": str(_CACHE / "vllm"),
    "HF_HOME": str(_CACHE / "huggingface"),
}.items():
    os.environ.setdefault(_name, _value)


def _gpu_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("gpu" in item.keywords for item in items) and not _gpu_present():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with a driver (NVML found none here)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
