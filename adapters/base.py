"""The engine interface every adapter implements, and the small types that cross it.

An adapter is a thin shell around one inference engine (vLLM, DeepSpeed, ONNX Runtime, PyTorch). The project owns
its lifecycle (load, infer, unload), so it is an abstract base rather than a Protocol. Engines are imported only
inside their own module and only when asked for; `available()` answers without importing anything heavy where it
can (``importlib.util.find_spec``) and always says why not.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Task = Literal["generate", "embed"]
FinishReason = Literal["stop", "length", "error"]


class EngineError(RuntimeError):
    """The one error type engines raise; the engine's own exception is kept as ``__cause__``.

    ``engine`` and ``model`` say where it happened; ``retryable`` tells the fallback chain whether the next engine
    may succeed where this one failed (a malformed request is not retryable; an engine crash is). ``fatal`` marks
    a model no engine can load (its path is missing or holds no model): the chain stops at once instead of trying
    the next engine. An engine's own configuration error is not fatal: that engine sits out, the next one serves.
    """

    def __init__(
        self, message: str, *, engine: str = "", model: str = "", retryable: bool = True, fatal: bool = False
    ) -> None:
        super().__init__(message)
        self.engine = engine
        self.model = model
        self.retryable = retryable
        self.fatal = fatal


class EngineUnavailableError(EngineError):
    """The engine is not installed, or the hardware it needs is absent."""


class ModelLoadError(EngineError):
    """The model could not be loaded (missing path, not a model, engine init failed)."""


class InferenceError(EngineError):
    """Inference failed for a request or a batch."""


class DeviceFaultError(InferenceError):
    """The device under the engine failed in a way that poisons it for every later call (a CUDA illegal memory
    access, an uncorrectable ECC error, a device-side assert, a lost GPU): retryable elsewhere, never here again
    until the device is re-probed. ``device`` names it (``cuda:0``)."""

    def __init__(self, message: str, *, device: str, engine: str = "", model: str = "") -> None:
        super().__init__(message, engine=engine, model=model, retryable=True)
        self.device = device


class InvalidRequestError(EngineError, ValueError):
    """The request itself is bad (e.g. prompt longer than the model's context); no engine would do better."""

    def __init__(self, message: str, *, engine: str = "", model: str = "") -> None:
        super().__init__(message, engine=engine, model=model, retryable=False)


@dataclass(frozen=True, slots=True)
class Availability:
    """Whether an engine can run here, and why not when it cannot."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an engine does by itself; the server uses it to route (continuous batching skips our batcher)."""

    continuous_batching: bool = False
    prefix_caching: bool = False
    tensor_parallel: bool = False
    pipeline_parallel: bool = False
    streaming: bool = False
    conversation_cache: bool = False
    max_batch_size: int = 32


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What to load: the model's directory (``save_pretrained`` layout) and how."""

    name: str
    path: str
    task: Task = "generate"
    device: str = "auto"
    dtype: str = "float32"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Generation settings; ``temperature == 0`` means greedy."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    """Generate ``max_new_tokens`` whatever the model's end-of-sequence token says (vLLM's request extension;
    benchmarks need fixed-length outputs)."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys may share a batch (the batcher groups on it)."""
        return (self.greedy, self.temperature, self.top_p)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt: str
    sampling: SamplingParams = SamplingParams()
    request_id: str = ""
    conversation_id: str | None = None


@dataclass(slots=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason = "length"
    cache_hit: bool = False
    """True when a cached conversation state (or an engine prefix cache) served part of the prompt."""
    cached_tokens: int = 0
    error: EngineError | None = None
    """Set instead of raising when the engine can tell which request of a batch failed."""


@dataclass(slots=True)
class EmbeddingResult:
    vector: list[float]
    prompt_tokens: int
    error: EngineError | None = None


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One step of a streamed generation: new text since the last chunk; the last chunk has ``finish_reason``."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine(ABC):
    """Base of all engine adapters.

    Sync engines (torch, ONNX Runtime, DeepSpeed) implement ``_generate_sync`` / ``_embed_sync``; the async
    methods run them on the engine's own single worker thread so the event loop never blocks and one model's
    forward passes never overlap. Engines with an async API of their own (vLLM) override the async methods.
    """

    name: ClassVar[str]
    capabilities: Capabilities = Capabilities()

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings: dict[str, Any] = dict(settings or {})
        self.spec: ModelSpec | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Callers on two event loops (the server's, the manager's blocking API) may ask for the worker at once.
        self._executor_lock = threading.Lock()

    @classmethod
    @abstractmethod
    def available(cls, settings: Mapping[str, Any] | None = None) -> Availability:
        """Importable and hardware present; never raises."""

    @abstractmethod
    def load(self, spec: ModelSpec) -> None:
        """Load ``spec``; raises ModelLoadError (cause kept) on failure."""

    @abstractmethod
    def unload(self) -> None:
        """Release the model and its memory; safe to call twice."""

    @property
    def loaded(self) -> bool:
        return self.spec is not None

    def status(self) -> dict[str, Any]:
        """Engine-specific facts for readiness (execution provider, tp size, ...)."""
        return {"engine": self.name, "model": self.spec.name if self.spec else None}

    def stats(self) -> dict[str, float]:
        """Engine-native counters for metrics (e.g. vLLM prefix cache hits/queries); empty when none."""
        return {}

    # Sync cores; engines override the ones they support.
    def _generate_sync(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        raise InvalidRequestError(f"engine {self.name!r} does not generate", engine=self.name)

    def _embed_sync(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        raise InvalidRequestError(f"engine {self.name!r} does not embed", engine=self.name)

    def _worker(self) -> ThreadPoolExecutor:
        """The engine's one worker thread (created on first use)."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"muai-{self.name}")
            return self._executor

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker(), fn, *args)
        except RuntimeError as exc:
            if "after shutdown" not in str(exc):
                raise
            raise self._closed_error() from exc
        except asyncio.CancelledError:
            if _caller_cancelled():
                raise
            # ``close()`` dropped this call before it ran: the caller's task was not cancelled, so it must get an
            # answer (the server's 503), not a CancelledError nobody asked for.
            raise self._closed_error() from None

    def _closed_error(self) -> EngineUnavailableError:
        model = self.spec.name if self.spec is not None else ""
        return EngineUnavailableError(f"engine {self.name} was unloaded before the request finished", engine=self.name,
                                      model=model)

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order."""
        return await self._run(self._generate_sync, batch)

    async def embed(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        return await self._run(self._embed_sync, texts)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """Default: one chunk with the whole completion. Engines that can stream override it."""
        (result,) = await self.generate([request])
        if result.error is not None:
            raise result.error
        yield StreamChunk(result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens)

    def end_conversation(self, conversation_id: str) -> bool:
        """Drop cached state for a conversation; True when something was released."""
        return False

    def close(self) -> None:
        """Unload, and drop calls still queued for the worker thread (their callers get EngineUnavailableError)."""
        self.unload()
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


def _caller_cancelled() -> bool:
    """Inside an ``except CancelledError``: True when the current task itself is being cancelled (so the error must
    propagate), False when only an awaited future was cancelled under it (an engine dropped the call)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0

