"""The echo engine: a real implementation of our engine interface with no machine learning in it.

It answers instantly and deterministically, so the server benchmark measures the server rather than a model, and
its fault injection drives the real fallback and server code paths (no mocks): it can report itself unavailable,
fail to load, or fail a number of inference calls, and the fault can be cleared while the process runs.

- ``generate``: the completion is the prompt's last ``max_new_tokens`` whitespace-separated words (all of them
  when there are fewer), trimmed at stop sequences; tokens are counted by whitespace split.
- ``embed``: a deterministic unit vector of ``dim`` (default 8) floats derived from the text's SHA-256.
- ``generate_stream``: one chunk per word.

Settings (engine settings, overridden per model by ``ModelSpec.options``): ``inject_delay_s`` (sleep before each
inference), ``dim``, ``fail_load`` (bool), ``fail_generate_times`` (int: that many inference calls raise),
``unavailable`` (str: ``available()`` says no, with this reason), or ``faults``: an ``EchoFaults`` object shared by
reference, which a test (or drill) mutates to start and clear faults across engine instances.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapters import _hf
from adapters.base import (
    Availability,
    Capabilities,
    EmbeddingResult,
    DeviceFaultError,
    Engine,
    EngineUnavailableError,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    InvalidRequestError,
    ModelLoadError,
    ModelSpec,
    StreamChunk,
)


@dataclass
class EchoFaults:
    """Mutable fault switches shared by every echo engine built with the same settings.

    ``unavailable``: reason reported by ``available()`` (None: available). ``fail_load``: ``load`` raises
    ModelLoadError. ``fail_generate_times``: the next that many inference calls raise a retryable
    InferenceError (counted down). ``fail_generate_always``: every inference call raises until cleared.
    ``hold_stream``: an ``asyncio.Event`` each stream waits for after its first chunk (a test holds a stream open
    mid-way, then releases it). ``fail_stream_close``: a stream closed before its end raises while closing, as
    an engine whose cleanup breaks would. ``fault_devices``: inference on an engine loaded on one of these devices
    raises ``DeviceFaultError``, as a CUDA context poisoned by an illegal memory access would.
    """

    unavailable: str | None = None
    fail_load: bool = False
    fail_generate_times: int = 0
    fail_generate_always: bool = False
    hold_stream: Any = None
    fail_stream_close: bool = False
    fault_devices: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def clear(self) -> None:
        self.unavailable = None
        self.fail_load = False
        self.fail_generate_times = 0
        self.fail_generate_always = False
        self.hold_stream = None
        self.fail_stream_close = False
        self.fault_devices = set()

    def consume_inference_failure(self) -> bool:
        with self._lock:
            if self.fail_generate_always:
                return True
            if self.fail_generate_times > 0:
                self.fail_generate_times -= 1
                return True
            return False


def _faults_from(settings: Mapping[str, Any]) -> EchoFaults:
    shared = settings.get("faults")
    if isinstance(shared, EchoFaults):
        return shared
    return EchoFaults(
        unavailable=settings.get("unavailable") or None,
        fail_load=bool(settings.get("fail_load", False)),
        fail_generate_times=int(settings.get("fail_generate_times", 0) or 0),
    )


class EchoEngine(Engine):
    """Echoes prompts back; deterministic hash embeddings; fault injection for drills and fallback tests."""

    name = "echo"
    capabilities = Capabilities(streaming=True, max_batch_size=1024)

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(settings)
        self.faults = _faults_from(self.settings)
        self._delay = float(self.settings.get("inject_delay_s", 0.0) or 0.0)
        self._dim = int(self.settings.get("dim", 8))
        self.calls = 0
        """Inference calls served (for tests and the benchmark)."""

    @classmethod
    def available(cls, settings: Mapping[str, Any] | None = None) -> Availability:
        reason = _faults_from(settings or {}).unavailable
        return Availability(False, reason) if reason else Availability(True)

    def load(self, spec: ModelSpec) -> None:
        merged = {**self.settings, **dict(spec.options)}
        if any(k in spec.options for k in ("faults", "fail_load", "fail_generate_times", "unavailable")):
            self.faults = _faults_from(merged)
        if self.faults.unavailable:
            raise EngineUnavailableError(f"echo engine unavailable: {self.faults.unavailable}", engine=self.name,
                                         model=spec.name)
        if self.faults.fail_load:
            raise ModelLoadError(f"model {spec.name!r}: injected load failure (echo fail_load)", engine=self.name,
                                 model=spec.name)
        self._delay = float(merged.get("inject_delay_s", 0.0) or 0.0)
        self._dim = int(merged.get("dim", 8))
        if self._dim < 1:
            raise ModelLoadError(f"echo dim must be >= 1, got {self._dim}", engine=self.name, model=spec.name,
                                 retryable=False)
        self.spec = spec

    def unload(self) -> None:
        self.spec = None

    def reconfigure(self, **changes: Any) -> None:
        """Runtime changes: ``inject_delay_s``; other keys are ignored."""
        if "inject_delay_s" in changes:
            self._delay = max(0.0, float(changes["inject_delay_s"] or 0.0))

    def status(self) -> dict[str, Any]:
        out = super().status()
        out.update(inject_delay_s=self._delay, calls=self.calls)
        return out

    # -------------------------------------------------------------------------------------------- inference
    def _check(self, op: str) -> None:
        if self.spec is None:
            # A call queued behind the last batch can run after unload(): it gets the same answer as one
            # close() cancelled (503), not an engine failure.
            raise EngineUnavailableError(f"echo engine: no model loaded ({op})", engine=self.name)
        if self._delay > 0:
            time.sleep(self._delay)
        if self.spec.device in self.faults.fault_devices:
            raise DeviceFaultError(f"model {self.spec.name!r}: CUDA error: an illegal memory access was encountered "
                                   f"(echo fault on {self.spec.device})", device=self.spec.device, engine=self.name,
                                   model=self.spec.name)
        if self.faults.consume_inference_failure():
            raise InferenceError(f"model {self.spec.name!r}: injected {op} failure (echo fault)", engine=self.name,
                                 model=self.spec.name)
        self.calls += 1

    def _one(self, req: GenerationRequest) -> GenerationResult:
        sp = req.sampling
        words = req.prompt.split()
        if sp.max_new_tokens < 1:
            err = InvalidRequestError(f"max_new_tokens must be at least 1, got {sp.max_new_tokens}",
                                      engine=self.name, model=self.spec.name if self.spec else "")
            return GenerationResult("", len(words), 0, "error", error=err)
        out = words[-sp.max_new_tokens:]
        text = " ".join(out)
        finish = "length" if len(words) >= sp.max_new_tokens else "stop"
        cut = _hf.trim_at_stop(text, sp.stop)
        if cut is not None:
            text, finish = cut, "stop"
            out = text.split()
        return GenerationResult(text, len(words), len(out), finish)  # type: ignore[arg-type]

    def _generate_sync(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self._check("generate")
        return [self._one(req) for req in batch]

    def _embed_sync(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        self._check("embed")
        return [EmbeddingResult(hash_vector(t, self._dim), len(t.split())) for t in texts]

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        (result,) = await self.generate([request])
        if result.error is not None:
            raise result.error
        words = result.text.split(" ") if result.text else []
        try:
            for i, word in enumerate(words[:-1]):
                yield StreamChunk(word + " ", None, result.prompt_tokens, i + 1)
                hold = self.faults.hold_stream
                if i == 0 and hold is not None:
                    await hold.wait()
            yield StreamChunk(words[-1] if words else "", result.finish_reason, result.prompt_tokens,
                              result.completion_tokens)
        except GeneratorExit:
            if self.faults.fail_stream_close:
                raise RuntimeError("echo fault: the stream's cleanup failed") from None
            raise


def hash_vector(text: str, dim: int = 8) -> list[float]:
    """A deterministic L2-normalised vector for ``text`` (SHA-256 stretched to ``dim`` floats in [-1, 1])."""
    values: list[float] = []
    counter = 0
    while len(values) < dim:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        for i in range(0, len(digest), 4):
            values.append(int.from_bytes(digest[i:i + 4], "big") / 2**31 - 1.0)
        counter += 1
    values = values[:dim]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
