"""Plain PyTorch / transformers: the engine every other one falls back to.

Generation is our own loop over the model's forward pass rather than ``model.generate``, because three things need
control of it: the KV cache (a conversation's ``DynamicCache`` is kept between turns and only new tokens are fed),
streaming (a chunk per token, so time to first token means something) and per-request sampling in one batch
(each request has its own temperature/top-p/seed/stop sequences). Greedy outputs equal ``model.generate``'s.

Batches are left-padded with attention masks and position ids counted from each row's first real token, so a
padded row computes what it would alone. Requests that carry a ``conversation_id`` while the conversation cache is
on run one at a time (a batch of one): their cached states have different lengths, and keeping them apart keeps
the cache bookkeeping simple; the other requests of the batch still run together.

Streaming and stop sequences need the text of the completion after every token. It is decoded incrementally
(the "prefix offset" trick: decode the last few tokens with one token of context before them and keep the new
part), so a step costs the same at token 10 and token 10,000; the text equals a full decode of the tokens.

Failures: an out-of-memory error (CUDA or CPU allocator) fails the batch with a non-retryable ``InferenceError``:
the engine is fine and the next engine would run out too, so the fallback chain gives the error to the caller
instead of moving the model. Any other error is retryable: the chain moves the model to the next engine.

torch and transformers are imported only inside methods.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from adapters import _hf
from adapters.base import (
    Availability,
    Capabilities,
    EmbeddingResult,
    Engine,
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    InvalidRequestError,
    ModelLoadError,
    ModelSpec,
    SamplingParams,
    StreamChunk,
)
from adapters.kvcache import CacheStats, ConversationCache, tensor_bytes

log = logging.getLogger(__name__)

_DONE = object()


@dataclass(slots=True)
class _Row:
    """One request's progress through the decode loop."""

    sampling: SamplingParams
    prompt_len: int
    generator: Any = None
    tokens: list[int] = field(default_factory=list)
    tracker: _hf.StopTracker = field(default_factory=_hf.StopTracker)
    finish: str | None = None
    text: str = ""
    delta: str = ""
    """Text decoded since a stream last took it."""
    decoded: str = ""
    """Incremental decode: the text of ``tokens[:read_offset]``."""
    prefix_offset: int = 0
    """Incremental decode: where the context window (one token before ``read_offset``) starts."""
    read_offset: int = 0


class TorchEngine(Engine):
    """transformers ``AutoModelForCausalLM`` (generate) or ``AutoModel`` (embed: mean pooling + L2 norm).

    Settings (``TorchEngineConfig``): ``threads`` sets ``torch.set_num_threads`` (process-wide) at load.
    Per-model options (``ModelSpec.options``, falling back to settings): ``kv_cache`` (``KvCacheConfig`` dict:
    enabled, budget_bytes, idle_ttl_s; or a ``ConversationCache`` shared by several models, one budget for all)
    turns on multi-turn reuse; ``inject_delay_s`` sleeps before each inference.
    """

    name = "torch"
    capabilities = Capabilities(streaming=True, max_batch_size=32)

    def __init__(self, settings: Mapping[str, Any] | None = None, *, clock: Callable[[], float] = time.monotonic):
        super().__init__(settings)
        self._clock = clock
        self._model: Any = None
        self._tok: Any = None
        self._device: Any = None
        self._ctx = 0
        self._eos: frozenset[int] = frozenset()
        self._inject_delay_s = 0.0
        self._kv: ConversationCache | None = None
        # One model, one forward pass at a time, whichever thread calls; the cache has its own short lock so
        # admin calls (budget, end conversation) never wait for a generation.
        self._lock = threading.RLock()
        self._kv_lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._ended_in_flight: set[str] = set()

    # ------------------------------------------------------------------------------------------ lifecycle
    @classmethod
    def available(cls, settings: Mapping[str, Any] | None = None) -> Availability:
        for mod in ("torch", "transformers"):
            if importlib.util.find_spec(mod) is None:
                return Availability(False, f"{mod} is not installed: pip install 'muai[torch]'")
        return Availability(True)

    def load(self, spec: ModelSpec) -> None:
        if self.loaded:
            self.unload()
        ok = self.available(self.settings)
        if not ok:
            raise EngineUnavailableError(ok.reason, engine=self.name, model=spec.name)
        path = _hf.check_model_dir(spec, engine=self.name)
        import torch
        import transformers

        threads = self.settings.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        device = _hf.resolve_device(spec.device, engine=self.name, model=spec.name)
        dtype = _hf.resolve_dtype(spec.dtype, engine=self.name, model=spec.name)
        tok = _hf.load_tokenizer(path, engine=self.name, model=spec.name)
        try:
            cls = transformers.AutoModelForCausalLM if spec.task == "generate" else transformers.AutoModel
            model = cls.from_pretrained(str(path), dtype=dtype)
            model.to(device)
            model.eval()
        except Exception as exc:
            raise ModelLoadError(
                f"model {spec.name!r}: cannot load {path} with {cls.__name__}: {_hf.first_line(exc)}",
                engine=self.name, model=spec.name,
            ) from exc
        if spec.task == "embed":
            # Encoders number positions from the left edge: left padding would shift every position.
            tok.padding_side = "right"
        try:
            kv = ConversationCache.from_options(_hf.option(spec, self.settings, "kv_cache"), clock=self._clock)
        except ValueError as exc:
            raise ModelLoadError(f"model {spec.name!r}: {exc}", engine=self.name, model=spec.name,
                                 retryable=False) from exc
        eos = set()
        for source in (getattr(model, "generation_config", None), model.config, tok):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value)
        with self._lock:
            self._model, self._tok, self._device = model, tok, device
            self._ctx = _hf.context_length(model.config, spec, tok)
            self._eos = frozenset(eos)
            self._inject_delay_s = float(_hf.option(spec, self.settings, "inject_delay_s", 0.0) or 0.0)
            with self._kv_lock:
                self._kv = kv if spec.task == "generate" else None
            self.capabilities = replace(type(self).capabilities, conversation_cache=self._kv is not None)
            self.spec = spec
        log.info("torch engine loaded %s from %s on %s (%s)", spec.name, path, device, spec.dtype)

    def unload(self) -> None:
        with self._lock:
            model, self._model, self._tok = self._model, None, None
            with self._kv_lock:
                if self._kv is not None and self.spec is not None:
                    self._kv.clear(namespace=self.spec.name)
            self.spec = None
        if model is not None and self._device is not None and self._device.type == "cuda":
            import torch

            del model
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
        with self._kv_lock:
            kv = self._kv
            if kv is None:
                if "kv_cache_budget_bytes" in changes or "kv_cache_idle_ttl_s" in changes:
                    log.info("model %s: the conversation cache is off for this engine; ignoring %s",
                             self._model_name, sorted(k for k in changes if k.startswith("kv_cache_")))
                return
            if "kv_cache_budget_bytes" in changes:
                kv.set_budget(int(changes["kv_cache_budget_bytes"]))
            if "kv_cache_idle_ttl_s" in changes:
                kv.set_idle_ttl(changes["kv_cache_idle_ttl_s"])

    def end_conversation(self, conversation_id: str) -> bool:
        with self._kv_lock:
            if self._kv is None:
                return False
            if conversation_id in self._in_flight:
                # Its state is being extended right now; drop it when the turn ends instead of storing it.
                self._ended_in_flight.add(conversation_id)
                return True
            return self._kv.release(self._key(conversation_id))

    def cache_stats(self) -> CacheStats | None:
        """This model's conversation-cache counters and bytes (None when the cache is off)."""
        with self._kv_lock:
            if self._kv is None or self.spec is None:
                return None
            self._kv.expire()
            return self._kv.stats(namespace=self.spec.name)

    def _key(self, conversation_id: str) -> str:
        # Namespaced by model, so one cache (one budget) can be shared by every model's engine.
        return f"{self._model_name}\x00{conversation_id}"

    def stats(self) -> dict[str, float]:
        st = self.cache_stats()
        if st is None:
            return {}
        return {f"kv_cache_{k}": float(v) for k, v in st.as_dict().items()}

    def status(self) -> dict[str, Any]:
        out = super().status()
        if self.spec is not None:
            out.update(device=str(self._device), dtype=self.spec.dtype, task=self.spec.task,
                       context_length=self._ctx, inject_delay_s=self._inject_delay_s)
        st = self.cache_stats()
        out["kv_cache"] = st.as_dict() if st is not None else None
        return out

    @property
    def tokenizer(self) -> Any:
        return self._tok

    @property
    def model(self) -> Any:
        return self._model

    # ------------------------------------------------------------------------------------------ generate
    def _generate_sync(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self._before_inference("generate")
        try:
            with self._lock:
                return self._generate_locked(batch)
        except EngineError:
            raise
        except Exception as exc:
            raise self._failure("generation", exc) from exc

    def _generate_locked(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self._require_loaded("generate")
        ids, errors = _hf.validate_requests(self._tok, batch, self._ctx, engine=self.name, model=self._model_name)
        results: list[GenerationResult | None] = [None] * len(batch)
        plain: list[int] = []
        for i, (req, row, err) in enumerate(zip(batch, ids, errors)):
            if err is not None:
                results[i] = GenerationResult("", 0, 0, "error", error=err)
            elif req.conversation_id is not None and self._kv is not None:
                conv_row = self._new_row(req.sampling, len(row))
                results[i] = self._generate_conversation(req, row, conv_row)
            else:
                plain.append(i)
        if plain:
            rows = [self._new_row(batch[i].sampling, len(ids[i])) for i in plain]
            self._decode([ids[i] for i in plain], rows)
            for i, row in zip(plain, rows):
                results[i] = self._result(row)
        return results  # type: ignore[return-value]

    def _generate_conversation(
        self,
        req: GenerationRequest,
        ids: list[int],
        row: _Row,
        on_step: Callable[[list[_Row]], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """One turn of a cached conversation: reuse the cached state for the longest common token prefix.

        The cached state covers exactly the token ids stored with it (the last turn's prompt and all its generated
        tokens but the last, which was never fed). A next turn normally starts with them; when it diverges (the
        client edited the history, or re-tokenising the previous completion merged differently at the boundary)
        the state is cropped back to the common prefix, and only the rest is fed. A common prefix of nothing but
        the BOS token is a miss: the state is dropped and the prompt computed in full.
        """
        assert self._kv is not None
        cid = req.conversation_id
        assert cid is not None
        ns, key = self._model_name, self._key(cid)
        with self._kv_lock:
            payload = self._kv.take(key)
            self._in_flight.add(cid)
        past, reuse = None, 0
        if payload is not None:
            cached_ids, kv = payload
            common = _common_prefix(cached_ids, ids)
            # At least one token must be fed to get logits for the next one.
            common = min(common, len(ids) - 1)
            floor = 1 if ids and ids[0] == self._tok.bos_token_id else 0
            if common > floor:
                try:
                    if common < len(cached_ids):
                        kv.crop(-(len(cached_ids) - common))
                    past, reuse = kv, common
                except (RuntimeError, ValueError) as exc:
                    # Some cache layouts cannot roll back (a full sliding window): recompute instead.
                    log.debug("conversation %s: cannot crop the cached state (%s); recomputing", cid, exc)
            del payload, kv
        try:
            with self._kv_lock:
                self._kv.record(past is not None, namespace=ns)
            kv = self._decode([ids], [row], past=past, past_len=reuse, on_step=on_step, cancel=cancel)
            covered = tuple(ids) + tuple(row.tokens[:-1])
            result = self._result(row)
            result.cache_hit, result.cached_tokens = past is not None, reuse
        finally:
            with self._kv_lock:
                self._in_flight.discard(cid)
                ended = cid in self._ended_in_flight
                self._ended_in_flight.discard(cid)
        if not ended:
            nbytes = tensor_bytes(kv)
            with self._kv_lock:
                if self._kv is not None:
                    self._kv.put(key, (covered, kv), nbytes, namespace=ns)
        return result

    def _new_row(self, sampling: SamplingParams, prompt_len: int) -> _Row:
        generator = _hf.make_generator(sampling, self._device)
        return _Row(sampling, prompt_len, generator, tracker=_hf.StopTracker(sampling.stop))

    def _result(self, row: _Row) -> GenerationResult:
        finish = row.finish or "length"
        return GenerationResult(row.text, row.prompt_len, len(row.tokens), finish)  # type: ignore[arg-type]

    def _decode(
        self,
        prompts: list[list[int]],
        rows: list[_Row],
        *,
        past: Any = None,
        past_len: int = 0,
        on_step: Callable[[list[_Row]], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Any:
        """The decode loop: prefill, then one token per row per step until every row finished.

        With ``past`` (a batch of one), ``prompts[0][past_len:]`` is fed on top of the cached state. Returns the
        ``DynamicCache``, which covers each prompt plus every generated token but the last.
        """
        import torch
        from transformers import DynamicCache

        model, tok, device = self._model, self._tok, self._device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        with torch.inference_mode():
            if past is not None:
                new = prompts[0][past_len:]
                input_ids = torch.tensor([new], dtype=torch.long, device=device)
                positions = torch.arange(past_len, past_len + len(new), device=device).unsqueeze(0)
                mask = torch.ones((1, past_len + len(new)), dtype=torch.long, device=device)
                kv = past
            else:
                enc = _hf.left_pad(prompts, pad, device)
                input_ids, mask, positions = enc.input_ids, enc.attention_mask, enc.position_ids
                kv = DynamicCache(config=model.config)
            stream = on_step is not None
            while True:
                out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            past_key_values=kv, use_cache=True, logits_to_keep=1)
                kv = out.past_key_values
                logits = out.logits[:, -1, :]
                # One argmax and one transfer for the batch's greedy rows, not a sync per row.
                best = _hf.greedy_tokens(logits) if any(r.finish is None and r.sampling.greedy for r in rows) \
                    else None
                nxt = []
                for i, row in enumerate(rows):
                    if row.finish is not None:
                        nxt.append(pad)
                        continue
                    if row.sampling.greedy and best is not None:
                        token = int(best[i])
                    else:
                        token = _hf.choose_next_token(logits[i], row.sampling, row.generator)
                    row.tokens.append(token)
                    nxt.append(token)
                    self._advance(row, token, stream or bool(row.tracker.stops))
                if on_step is not None:
                    on_step(rows)
                if all(r.finish is not None for r in rows) or (cancel is not None and cancel.is_set()):
                    break
                input_ids = torch.tensor(nxt, dtype=torch.long, device=device).unsqueeze(1)
                positions = positions[:, -1:] + 1
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        for row in rows:
            if not row.tracker.stopped:
                row.delta += row.tracker.update(self._decode_text(row.tokens))
            row.delta += row.tracker.flush()
            row.text = row.tracker.text
            if row.finish is None:
                row.finish = "length"
        return kv

    def _advance(self, row: _Row, token: int, incremental: bool) -> None:
        """Record one generated token: EOS and completed stop sequences finish the row, so does the length."""
        if token in self._eos:
            row.finish = "stop"
        elif incremental:
            row.delta += row.tracker.update(self._decode_so_far(row))
            if row.tracker.stopped:
                row.finish = "stop"
        if row.finish is None and len(row.tokens) >= row.sampling.max_new_tokens:
            row.finish = "length"

    def _decode_text(self, tokens: list[int]) -> str:
        return self._tok.decode(tokens, skip_special_tokens=True)

    def _decode_so_far(self, row: _Row) -> str:
        """``_decode_text(row.tokens)``, decoding only the tokens since the last complete character (plus one token
        of context, so tokenizers that treat the first token of a decode specially still join up right).

        The window ``tokens[prefix_offset:]`` is decoded and the part after ``tokens[prefix_offset:read_offset]``
        kept; the offsets move on once that part ends in a complete character (no trailing U+FFFD). Tokenizers
        that clean up spaces across token boundaries, or a window that does not extend its prefix, take the full
        decode: the text must equal it exactly.
        """
        tokens = row.tokens
        if getattr(self._tok, "clean_up_tokenization_spaces", False):
            return self._decode_text(tokens)
        prefix = self._decode_text(tokens[row.prefix_offset:row.read_offset])
        window = self._decode_text(tokens[row.prefix_offset:])
        if not window.startswith(prefix):
            return self._decode_text(tokens)
        new = window[len(prefix):]
        if not new or new.endswith("\ufffd"):
            return row.decoded + new  # an incomplete character: keep the window until it completes
        row.decoded += new
        row.prefix_offset, row.read_offset = row.read_offset, len(tokens)
        return row.decoded

    # ------------------------------------------------------------------------------------------ streaming
    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """A chunk per generated token (text held back only while it may be the start of a stop sequence)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                self._stream_sync(request, emit, cancel)
                emit(_DONE)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                emit(exc)

        try:
            future = loop.run_in_executor(self._ensure_executor(), work)
        except RuntimeError as exc:  # closed between the two lines above
            raise self._closed_error() from exc

        def dropped(f: asyncio.Future[Any]) -> None:
            # ``close()`` cancels work still queued behind the running batch: ``work`` never runs and would never
            # put anything on the queue, so the consumer gets the error from here instead of waiting forever.
            if f.cancelled():
                queue.put_nowait(self._closed_error())
            else:
                f.exception()  # retrieved, so an error the consumer already saw is not logged again

        future.add_done_callback(dropped)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()

    def _stream_sync(self, request: GenerationRequest, emit: Callable[[Any], None], cancel: threading.Event) -> None:
        self._before_inference("generate")
        try:
            with self._lock:
                self._require_loaded("generate")
                ids, errors = _hf.validate_requests(self._tok, [request], self._ctx, engine=self.name,
                                                    model=self._model_name)
                if errors[0] is not None:
                    raise errors[0]
                row_ids = ids[0]
                assert row_ids is not None
                prompt_len = len(row_ids)
                row = self._new_row(request.sampling, prompt_len)

                def on_step(rows: list[_Row]) -> None:
                    # The row's last chunk goes out below, with the finish reason and final counts.
                    if row.delta and row.finish is None:
                        emit(StreamChunk(row.delta, None, prompt_len, len(row.tokens)))
                        row.delta = ""

                if request.conversation_id is not None and self._kv is not None:
                    result = self._generate_conversation(request, row_ids, row, on_step=on_step, cancel=cancel)
                else:
                    self._decode([row_ids], [row], on_step=on_step, cancel=cancel)
                    result = self._result(row)
                if not cancel.is_set():
                    emit(StreamChunk(row.delta, result.finish_reason, result.prompt_tokens, result.completion_tokens))
        except EngineError:
            raise
        except Exception as exc:
            raise self._failure("streaming", exc) from exc

    def _ensure_executor(self) -> Any:
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"muai-{self.name}")
        return self._executor

    # ------------------------------------------------------------------------------------------ embed
    def _embed_sync(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        self._before_inference("embed")
        try:
            with self._lock:
                return self._embed_locked(texts)
        except EngineError:
            raise
        except Exception as exc:
            raise self._failure("embedding", exc) from exc

    def _embed_locked(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        import torch

        self._require_loaded("embed")
        results: list[EmbeddingResult | None] = [None] * len(texts)
        good: list[int] = []
        rows: list[list[int]] = []
        for i, text in enumerate(texts):
            row = _hf.encode(self._tok, text)
            if len(row) > self._ctx:
                results[i] = EmbeddingResult([], len(row), error=InvalidRequestError(
                    f"input of {len(row)} tokens exceeds the context length of model {self._model_name} "
                    f"({self._ctx} tokens)", engine=self.name, model=self._model_name))
            else:
                good.append(i)
                rows.append(row)
        if good:
            width = max(len(r) for r in rows)
            pad = self._tok.pad_token_id or 0
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, row in enumerate(rows):
                ids[j, : len(row)] = torch.tensor(row)
                mask[j, : len(row)] = 1
            ids, mask = ids.to(self._device), mask.to(self._device)
            with torch.inference_mode():
                out = self._model(input_ids=ids, attention_mask=mask)
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                vectors = _hf.mean_pool(hidden, mask).float().cpu().tolist()
            for i, row, vec in zip(good, rows, vectors):
                results[i] = EmbeddingResult(vec, len(row))
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def _model_name(self) -> str:
        return self.spec.name if self.spec is not None else "?"

    def _require_loaded(self, op: str) -> None:
        if self._model is None or self.spec is None:
            # A call queued behind the last batch can run after unload(): it gets the same answer as one
            # close() cancelled (503), not an engine failure.
            raise EngineUnavailableError(f"torch engine: no model loaded ({op})", engine=self.name)
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
        if oom and self._device is not None and self._device.type == "cuda":
            import torch

            torch.cuda.empty_cache()  # give the failed batch's blocks back before the next one
        return InferenceError(f"model {self._model_name}: {what} failed: {_hf.first_line(exc)}",
                              engine=self.name, model=self._model_name, retryable=not oom)

    def _before_inference(self, op: str) -> None:
        delay = self._inject_delay_s
        if delay > 0:
            time.sleep(delay)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
