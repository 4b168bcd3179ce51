"""What the Hugging Face engines (torch, ONNX Runtime, DeepSpeed) share: one loader of the model's parts, and the
engine shell around the one decode loop (``adapters.hf_decode``).

The three engines are siblings of ``HfEngine``. Each says only what differs, in ``_backend(parts, spec)``: the
torch engine serves the transformers model itself, ONNX Runtime exports, validates and wraps its session, DeepSpeed
serves the module ``init_inference`` returns. The shell does the rest the same way for all three: the model's parts
(``load_parts``: files checked, tokenizer, model, device, context, EOS ids), the conversation cache, one forward
pass at a time, streaming through the one bridge (``adapters.bridge``), runtime knobs, status, and errors.

Failures: an out-of-memory error (CUDA or CPU allocator) fails the batch with a non-retryable ``InferenceError``:
the engine is fine and the next engine would run out too, so the fallback chain gives the error to the caller
instead of moving the model. Any other error is retryable: the chain moves the model to the next engine.

torch and transformers are imported only inside functions.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adapters import _hf
from adapters.base import (
    EmbeddingResult,
    Engine,
    EngineError,
    DeviceFaultError,
    EngineUnavailableError,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    InvalidRequestError,
    ModelLoadError,
    ModelSpec,
    StreamChunk,
)
from adapters.bridge import ThreadStream
from adapters.hf_decode import Conversations, DecodeLoop, Encode, Forward, embed_texts
from adapters.kvcache import CacheStats, ConversationCache

log = logging.getLogger(__name__)

__all__ = ["Backend", "HfEngine", "HfParts", "load_parts"]


@dataclass(slots=True)
class HfParts:
    """A Hugging Face model directory, loaded: what every engine of the family starts from."""

    path: Path
    tokenizer: Any
    model: Any
    """``AutoModelForCausalLM`` (generate) or ``AutoModel`` (embed), in eval mode on ``device``."""
    device: Any
    context_length: int
    eos: frozenset[int]


def load_parts(spec: ModelSpec, settings: Mapping[str, Any], *, engine: str) -> HfParts:
    """Load ``spec`` with transformers; every failure is a ``ModelLoadError`` naming the model (cause kept).

    ``settings["threads"]`` sets ``torch.set_num_threads`` (process-wide).
    """
    path = _hf.check_model_dir(spec, engine=engine)
    import torch
    import transformers

    threads = settings.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    device = _hf.resolve_device(spec.device, engine=engine, model=spec.name)
    dtype = _hf.resolve_dtype(spec.dtype, engine=engine, model=spec.name)
    tok = _hf.load_tokenizer(path, engine=engine, model=spec.name)
    cls = transformers.AutoModelForCausalLM if spec.task == "generate" else transformers.AutoModel
    try:
        model = cls.from_pretrained(str(path), dtype=dtype)
        model.to(device)
        model.eval()
    except Exception as exc:
        raise ModelLoadError(
            f"model {spec.name!r}: cannot load {path} with {cls.__name__}: {_hf.first_line(exc)}",
            engine=engine, model=spec.name,
        ) from exc
    if spec.task == "embed":
        # Encoders number positions from the left edge: left padding would shift every position.
        tok.padding_side = "right"
    eos: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tok):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(int(v) for v in value)
    return HfParts(path, tok, model, device, _hf.context_length(model.config, spec, tok), frozenset(eos))


@dataclass(slots=True)
class Backend:
    """What an engine of the family serves with: the forward pass (generate) or the encoder (embed)."""

    forward: Forward | None = None
    encode: Encode | None = None
    model: Any = None
    """The torch module that serves, when one does (None for ONNX Runtime, which serves from its session)."""
    device: Any = None
    """Where the loop's small tensors (ids, masks) go; default: the parts' device."""
    info: dict[str, Any] = field(default_factory=dict)
    """Engine-specific facts merged into ``status()``."""
    keep: Any = None
    """Anything the forward pass needs kept alive (DeepSpeed's InferenceEngine)."""


class HfEngine(Engine):
    """The shell every Hugging Face engine shares; subclasses implement ``available`` and ``_backend``.

    Per-model options (``ModelSpec.options``, falling back to settings): ``kv_cache`` (``KvCacheConfig`` dict:
    enabled, budget_bytes, idle_ttl_s; or a ``ConversationCache`` shared by several models, one budget for all)
    turns on multi-turn reuse; ``inject_delay_s`` sleeps before each inference.
    """

    def __init__(self, settings: Mapping[str, Any] | None = None, *, clock: Callable[[], float] = time.monotonic):
        super().__init__(settings)
        self._clock = clock
        self._parts: HfParts | None = None
        self._backend_: Backend | None = None
        self._loop: DecodeLoop | None = None
        self._conversations: Conversations | None = None
        self._inject_delay_s = 0.0
        # One model, one forward pass at a time, whichever thread calls.
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------ what differs
    def _load_spec(self, spec: ModelSpec) -> ModelSpec:
        """The spec the parts are loaded with (an engine that places the model itself loads it on the CPU)."""
        return spec

    def _backend(self, parts: HfParts, spec: ModelSpec) -> Backend:
        """Turn the loaded parts into what serves; raise ``ModelLoadError`` (cause kept) when it cannot."""
        raise NotImplementedError

    def _prepare(self, batch: Sequence[GenerationRequest]) -> list[GenerationRequest]:
        """Adjust a batch on the worker thread before it runs (DeepSpeed's ranks agree on seeds here)."""
        return list(batch)

    # ------------------------------------------------------------------------------------------ lifecycle
    def load(self, spec: ModelSpec) -> None:
        if self.loaded:
            self.unload()
        ok = self.available(self.settings)
        if not ok:
            raise EngineUnavailableError(ok.reason, engine=self.name, model=spec.name)
        parts = load_parts(self._load_spec(spec), self.settings, engine=self.name)
        try:
            cache = ConversationCache.from_options(_hf.option(spec, self.settings, "kv_cache"), clock=self._clock)
        except ValueError as exc:
            raise ModelLoadError(f"model {spec.name!r}: {exc}", engine=self.name, model=spec.name,
                                 retryable=False) from exc
        backend = self._backend(parts, spec)
        device = backend.device if backend.device is not None else parts.device
        conversations = Conversations(cache, spec.name) if cache is not None and spec.task == "generate" else None
        loop = None
        if spec.task == "generate" and backend.forward is not None:
            loop = DecodeLoop(backend.forward, parts.tokenizer, device=device, eos=parts.eos,
                              context_length=parts.context_length, conversations=conversations, engine=self.name,
                              model=spec.name)
        with self._lock:
            # The parts keep no model: what serves is the backend's (ORT drops the torch model here).
            self._parts, self._backend_, self._loop = replace(parts, model=None), replace(backend, device=device), loop
            self._conversations = conversations
            self._inject_delay_s = float(_hf.option(spec, self.settings, "inject_delay_s", 0.0) or 0.0)
            self.capabilities = replace(type(self).capabilities, conversation_cache=conversations is not None)
            self.spec = spec
        log.info("%s engine loaded %s from %s on %s (%s)", self.name, spec.name, parts.path, device, spec.dtype)

    def unload(self) -> None:
        with self._lock:
            parts, backend = self._parts, self._backend_
            self._parts = self._backend_ = self._loop = None
            if self._conversations is not None:
                self._conversations.clear()
            self._conversations = None
            self.spec = None
        device = backend.device if backend is not None else None
        if parts is not None and getattr(device, "type", "") == "cuda":
            import torch

            del parts, backend
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------ runtime knobs
    def reconfigure(self, **changes: Any) -> None:
        """Apply runtime changes: ``inject_delay_s``, ``kv_cache_budget_bytes``, ``kv_cache_idle_ttl_s``.

        Shrinking the budget evicts down to it at once. The cache is one object the owner passes in (shared by every
        model's engine, one budget for all), so an engine started without one stays without: a budget change then
        is logged and ignored rather than growing a private cache per engine. Unknown keys are ignored (other
        engines have other knobs).
        """
        if "inject_delay_s" in changes:
            self._inject_delay_s = max(0.0, float(changes["inject_delay_s"] or 0.0))
        conv = self._conversations
        if conv is None:
            if "kv_cache_budget_bytes" in changes or "kv_cache_idle_ttl_s" in changes:
                log.info("model %s: the conversation cache is off for this engine; ignoring %s",
                         self._model_name, sorted(k for k in changes if k.startswith("kv_cache_")))
            return
        if "kv_cache_budget_bytes" in changes:
            conv.set_budget(int(changes["kv_cache_budget_bytes"]))
        if "kv_cache_idle_ttl_s" in changes:
            conv.set_idle_ttl(changes["kv_cache_idle_ttl_s"])

    def end_conversation(self, conversation_id: str) -> bool:
        conv = self._conversations
        return conv.end(conversation_id) if conv is not None else False

    @property
    def conversations(self) -> Conversations | None:
        """This model's conversation cache (None when it is off)."""
        return self._conversations

    def cache_stats(self) -> CacheStats | None:
        """This model's conversation-cache counters and bytes (None when the cache is off)."""
        conv = self._conversations
        return conv.stats() if conv is not None else None

    def stats(self) -> dict[str, float]:
        st = self.cache_stats()
        if st is None:
            return {}
        return {f"kv_cache_{k}": float(v) for k, v in st.as_dict().items()}

    def status(self) -> dict[str, Any]:
        out = super().status()
        backend = self._backend_
        if self.spec is not None and self._parts is not None:
            out.update(device=str(backend.device if backend else self._parts.device), dtype=self.spec.dtype,
                       task=self.spec.task, context_length=self._parts.context_length,
                       inject_delay_s=self._inject_delay_s)
        if backend is not None:
            out.update(backend.info)
        st = self.cache_stats()
        out["kv_cache"] = st.as_dict() if st is not None else None
        return out

    @property
    def tokenizer(self) -> Any:
        parts = self._parts
        return parts.tokenizer if parts is not None else None

    @property
    def model(self) -> Any:
        """The torch module that serves (None when nothing is loaded, or ONNX Runtime serves)."""
        backend = self._backend_
        return backend.model if backend is not None else None

    # ------------------------------------------------------------------------------------------ inference
    def _generate_sync(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        batch = self._prepare(batch)
        self._before_inference()
        try:
            with self._lock:
                return self._require_loop().generate(batch)
        except EngineError:
            raise
        except Exception as exc:
            raise self._failure("generation", exc) from exc

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """A chunk per generated token (text held back only while it may be the start of a stop sequence)."""
        stream: ThreadStream[StreamChunk] = ThreadStream(self._closed_error)

        def work(out: ThreadStream[StreamChunk]) -> None:
            self._stream_sync(request, out)

        try:
            future = asyncio.get_running_loop().run_in_executor(self._worker(), stream.produce_sync(work))
        except RuntimeError as exc:  # closed between taking the worker and submitting to it
            raise self._closed_error() from exc
        stream.watch(future)
        async for chunk in stream.items():
            yield chunk

    def _stream_sync(self, request: GenerationRequest, out: ThreadStream[StreamChunk]) -> None:
        (request,) = self._prepare([request])
        self._before_inference()
        try:
            with self._lock:
                self._require_loop().stream(request, out.put, out.cancelled)
        except EngineError:
            raise
        except Exception as exc:
            raise self._failure("streaming", exc) from exc

    def _embed_sync(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        self._before_inference()
        try:
            with self._lock:
                backend, parts = self._backend_, self._parts
                self._require_loaded("embed")
                assert backend is not None and parts is not None and backend.encode is not None
                return embed_texts(backend.encode, parts.tokenizer, texts, device=backend.device,
                                   context_length=parts.context_length, engine=self.name, model=self._model_name)
        except EngineError:
            raise
        except Exception as exc:
            raise self._failure("embedding", exc) from exc

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def _model_name(self) -> str:
        return self.spec.name if self.spec is not None else "?"

    def _require_loop(self) -> DecodeLoop:
        self._require_loaded("generate")
        assert self._loop is not None
        return self._loop

    def _require_loaded(self, op: str) -> None:
        if self._backend_ is None or self.spec is None:
            # A call queued behind the last batch can run after unload(): it gets the same answer as one
            # close() cancelled (503), not an engine failure.
            raise EngineUnavailableError(f"{self.name} engine: no model loaded ({op})", engine=self.name)
        if op == "generate" and self.spec.task != "generate":
            raise InvalidRequestError(f"model {self.spec.name!r} is an embedding model; it does not generate",
                                      engine=self.name, model=self.spec.name)
        if op == "embed" and self.spec.task != "embed":
            raise InvalidRequestError(f"model {self.spec.name!r} is a generation model; it does not embed",
                                      engine=self.name, model=self.spec.name)

    def _failure(self, what: str, exc: Exception) -> InferenceError:
        """An error of the forward pass as our error; running out of memory is this batch's failure, not the
        engine's, so it is not retryable (see the module docstring)."""
        oom = _hf.is_out_of_memory(exc)
        backend = self._backend_
        if oom and backend is not None and getattr(backend.device, "type", "") == "cuda":
            import torch

            torch.cuda.empty_cache()  # give the failed batch's blocks back before the next one
        fault = None if oom else _hf.device_fault(exc)
        if fault is not None:
            device = str(backend.device) if backend is not None else "unknown"
            return DeviceFaultError(f"model {self._model_name}: {what} failed on {device}: {fault}", device=device,
                                    engine=self.name, model=self._model_name)
        return InferenceError(f"model {self._model_name}: {what} failed: {_hf.first_line(exc)}",
                              engine=self.name, model=self._model_name, retryable=not oom)

    def _before_inference(self) -> None:
        delay = self._inject_delay_s
        if delay > 0:
            time.sleep(delay)
