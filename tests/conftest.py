"""Suite-wide settings: offline engines, caches inside the repo's ignored area, GPU tests only where a GPU is."""

from __future__ import annotations

import os
import shutil
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


REAL_COMPONENTS = ("prometheus", "promtool", "prometheus-alertmanager", "amtool")


def pytest_sessionstart(session: pytest.Session) -> None:
    """In CI the integration tests must run, not skip: a missing install step fails the run instead of hiding."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    missing = [name for name in REAL_COMPONENTS if shutil.which(name) is None]
    if missing:
        pytest.exit(f"CI run without {', '.join(missing)}: scripts/bootstrap.sh should have installed them", returncode=3)
