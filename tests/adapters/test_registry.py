"""The lazy engine registry and the adapters package surface."""

from __future__ import annotations

import subprocess
import sys

import pytest

import adapters
from adapters import registry
from adapters.base import Engine, EngineUnavailableError
from adapters.echo import EchoEngine


def test_names_in_default_preference_order():
    assert registry.engine_names() == ("vllm", "deepspeed", "onnxruntime", "torch", "echo")


def test_get_engine_class_returns_the_named_subclass():
    cls = registry.get_engine_class("echo")
    assert cls is EchoEngine and issubclass(cls, Engine) and cls.name == "echo"
    engine = registry.create_engine("echo", {"dim": 4})
    assert isinstance(engine, EchoEngine) and engine.settings == {"dim": 4} and not engine.loaded


def test_torch_engine_is_found_lazily():
    pytest.importorskip("torch")
    cls = registry.get_engine_class("torch")
    assert cls.__name__ == "TorchEngine" and cls.__module__ == "adapters.torch_engine"
    assert registry.probe("torch").ok


def test_unknown_engine_error_lists_the_known_ones():
    with pytest.raises(registry.UnknownEngineError) as info:
        registry.get_engine_class("tensorrt-llm")
    msg = str(info.value)
    assert "unknown engine 'tensorrt-llm'" in msg
    assert "vllm, deepspeed, onnxruntime, torch, echo" in msg
    assert isinstance(info.value, LookupError) and isinstance(info.value, EngineUnavailableError)
    assert not info.value.retryable


def test_probe_never_raises_and_says_why():
    av = registry.probe("nope")
    assert not av and "known engines" in av.reason
    av = registry.probe("echo", {"unavailable": "drill"})
    assert not av and av.reason == "drill"
    assert registry.probe("echo")


def test_install_hints_name_the_extra():
    assert registry.install_hint("onnxruntime") == "pip install 'muai[onnx]'"
    assert "muai[deepspeed]" in registry.install_hint("deepspeed")
    assert "vllm" in registry.install_hint("vllm")
    assert registry.install_hint("nope") == ""


def test_importing_adapters_imports_no_engine_and_no_torch():
    code = (
        "import sys, adapters, adapters.registry, adapters.fallback, adapters.kvcache, adapters.echo\n"
        "adapters.registry.probe('echo')\n"
        "heavy = [m for m in ('torch', 'transformers', 'vllm', 'onnxruntime', 'deepspeed', 'adapters.torch_engine',"
        " 'adapters.vllm_engine', 'adapters.onnx_engine', 'adapters.deepspeed_engine') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_package_surface_is_pinned():
    assert sorted(adapters.__all__) == sorted([
        "Availability", "CacheStats", "Capabilities", "ChainConfigError", "ConversationCache", "DeviceFaultError",
        "EmbeddingResult",
        "Engine", "EngineError", "EngineUnavailableError", "FallbackChain", "FallbackEvent", "FinishReason",
        "GenerationRequest", "GenerationResult", "InferenceError", "InvalidRequestError", "KvCacheError",
        "ModelLoadError", "ModelSpec", "SamplingParams", "StreamChunk", "Task", "UnknownEngineError",
        "build_tiny_model", "build_tiny_models", "builtin_names", "create_engine", "engine_names",
        "get_engine_class", "install_hint", "minilm_path", "probe", "resolve_model_path", "tensor_bytes",
    ])
    for name in adapters.__all__:
        assert hasattr(adapters, name), name
