"""Engine adapters: one thin module per engine behind one interface, the lazy registry, the fallback chain and
the KV-cache accounting.

Importing this package imports no engine and no torch: engines are reached through the registry
(``get_engine_class("torch")``, ``create_engine``), which imports an engine's module only when it is asked for.
"""

from adapters.base import (
    Availability,
    Capabilities,
    EmbeddingResult,
    Engine,
    DeviceFaultError,
    EngineError,
    EngineUnavailableError,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    InvalidRequestError,
    ModelLoadError,
    ModelSpec,
    SamplingParams,
    StreamChunk,
    Task,
)
from adapters.fallback import ChainConfigError, FallbackChain, FallbackEvent
from adapters.kvcache import CacheStats, ConversationCache, KvCacheError, tensor_bytes
from adapters.registry import (
    UnknownEngineError,
    create_engine,
    engine_names,
    get_engine_class,
    install_hint,
    probe,
)
from adapters.tiny import build_tiny_model, build_tiny_models, builtin_names, minilm_path, resolve_model_path

__all__ = [
    "Availability",
    "CacheStats",
    "Capabilities",
    "ChainConfigError",
    "ConversationCache",
    "EmbeddingResult",
    "Engine",
    "DeviceFaultError",
    "EngineError",
    "EngineUnavailableError",
    "FallbackChain",
    "FallbackEvent",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "InferenceError",
    "InvalidRequestError",
    "KvCacheError",
    "ModelLoadError",
    "ModelSpec",
    "SamplingParams",
    "StreamChunk",
    "Task",
    "UnknownEngineError",
    "build_tiny_model",
    "build_tiny_models",
    "builtin_names",
    "create_engine",
    "engine_names",
    "get_engine_class",
    "install_hint",
    "minilm_path",
    "probe",
    "resolve_model_path",
    "tensor_bytes",
]
