"""The model manager's blocking API (the existing contract, 13.4): ``infer`` for code without an event loop, run
on a private event loop on its own thread (:class:`SyncRunner`), which ``Workflow.execute`` uses too.

Apart from the manager because it is a shell over the async API: it parses the old keyword arguments, hands the
manager's coroutine to the private loop and turns per-request errors back into exceptions.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapters.base import GenerationRequest, SamplingParams
from orchestrator.errors import MuaiError
from orchestrator.inference_spans import OP_EMBED, OP_GENERATE, embed_error

if TYPE_CHECKING:
    from orchestrator.manager import ModelManager

SAMPLING_KEYS = frozenset({"max_new_tokens", "temperature", "top_p", "stop", "seed"})


class SyncRunner:
    """A private event loop on its own thread for the blocking API (``infer``, ``Workflow.execute``)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, coro: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise MuaiError("this call blocks; from async code use the manager's async API (await manager.generate)")
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="muai-manager-sync", daemon=True)
                self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=10)
            loop.close()


def blocking_infer(manager: ModelManager, model_name: str, inputs: str | Sequence[str], **kwargs: Any) -> Any:
    """``ModelManager.infer``: a string in, a string (or an embedding) out; a list in, a list out, run as one engine
    batch; ``engine_preference`` picks the engines for this call."""
    m = manager._ready(model_name)
    single = isinstance(inputs, str)
    items = [inputs] if single else list(inputs)
    preference = kwargs.pop("engine_preference", None)
    unknown = set(kwargs) - SAMPLING_KEYS
    if unknown:
        raise TypeError(f"infer() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    if "stop" in kwargs and kwargs["stop"] is not None:
        kwargs["stop"] = (kwargs["stop"],) if isinstance(kwargs["stop"], str) else tuple(kwargs["stop"])
    target = manager._with_preference(m, preference) if preference else m
    if m.task == "generate":
        sampling = SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
        requests = [GenerationRequest(p, sampling) for p in items]
        results = manager.run_sync(manager._infer(target, OP_GENERATE, requests, [None] * len(requests), None))
        for r in results:
            if r.error is not None:
                raise r.error
        texts = [r.text for r in results]
        return texts[0] if single else texts
    (vectors,) = manager.run_sync(manager._infer(target, OP_EMBED, [items], [None], None))
    err = embed_error(vectors)
    if err is not None:
        raise err
    out = [v.vector for v in vectors]
    return out[0] if single else out


__all__ = ["SyncRunner", "blocking_infer"]
