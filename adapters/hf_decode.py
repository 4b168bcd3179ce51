"""The decode loop every Hugging Face engine (torch, ONNX Runtime, DeepSpeed) runs, over a small forward interface.

Generation is our own loop over a forward pass rather than ``model.generate``, because three things need control of
it: the KV cache (a conversation's state is kept between turns and only new tokens are fed), streaming (a chunk per
token, so time to first token means something) and per-request sampling in one batch (each request has its own
temperature/top-p/seed/stop sequences). Greedy outputs equal ``model.generate``'s.

The engines differ only in the forward pass, which is all the loop sees (``Forward``): token ids, attention mask
and position ids in, the last position's logits and the extended state out. The state is a transformers
``DynamicCache`` whatever runs the forward (ORT's outputs are wrapped without a copy), because the conversation
cache crops it to a shared prefix and counts its bytes.

Batches are left-padded with attention masks and position ids counted from each row's first real token, so a
padded row computes what it would alone. Requests that carry a ``conversation_id`` while the conversation cache is
on run one at a time (a batch of one): their cached states have different lengths, and keeping them apart keeps
the cache bookkeeping simple; the other requests of the batch still run together.

Streaming and stop sequences need the text of the completion after every token. It is decoded incrementally
(``Detokenizer``: decode the last few tokens with one token of context before them and keep the new part), so a
step costs the same at token 10 and token 10,000; the text equals a full decode of the tokens.

torch and transformers are imported only inside functions.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from adapters import _hf
from adapters.base import (
    EmbeddingResult,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    SamplingParams,
    StreamChunk,
)
from adapters.kvcache import CacheEntry, CacheStats, ConversationCache, tensor_bytes

log = logging.getLogger(__name__)

__all__ = ["Conversations", "DecodeLoop", "Detokenizer", "Encode", "Forward", "Row", "TorchEncode", "TorchForward",
           "embed_texts", "preallocated_layer", "reserve"]


class Forward(Protocol):
    """One forward pass of a causal LM with a KV cache."""

    def empty_state(self) -> Any:
        """The state before a prefill (nothing computed yet)."""

    def __call__(self, input_ids: Any, attention_mask: Any, position_ids: Any, state: Any) -> tuple[Any, Any]:
        """Logits of each row's last position (batch x vocab) and ``state`` extended by ``input_ids``."""


class Encode(Protocol):
    """One forward pass of an encoder: ids and mask (batch x seq) in, the last hidden state (batch x seq x dim) out."""

    def __call__(self, input_ids: Any, attention_mask: Any) -> Any: ...


class TorchForward:
    """A transformers causal LM (or the module DeepSpeed wraps around one) as a ``Forward``.

    Its state is a ``DynamicCache`` whose full-attention layers write into preallocated buffers
    (``preallocated_layer``) instead of growing by ``torch.cat``: a cat copies the whole past of every layer on every
    forward, which on a 12-layer model with a 400-token history cost about a third of a reused turn's first token.
    ``preallocate=False`` keeps transformers' own layers.
    """

    def __init__(self, model: Any, *, preallocate: bool = True) -> None:
        self.model = model
        self.preallocate = preallocate

    def empty_state(self) -> Any:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        if self.preallocate:
            layer = preallocated_layer()
            # Sliding-window and other special layers keep their own logic (they drop or cap what they hold).
            cache.layers = [layer() if type(each) is DynamicLayer else each for each in cache.layers]
        return cache

    def __call__(self, input_ids: Any, attention_mask: Any, position_ids: Any, state: Any) -> tuple[Any, Any]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=state, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], out.past_key_values


def reserve(state: Any, positions: int) -> None:
    """Tell a state's preallocated layers how many positions it will hold (other states ignore it)."""
    for layer in getattr(state, "layers", ()) or ():
        want = getattr(layer, "reserve", None)
        if want is not None:
            want(positions)


@functools.cache
def preallocated_layer() -> type:
    """The class of a ``DynamicLayer`` that keeps its keys and values in buffers of a reserved capacity.

    ``keys``/``values`` are views of the filled part of the buffers, so everything that reads a ``DynamicLayer``
    (masks, ``get_seq_length``, ``adapters.kvcache.tensor_bytes``) reads it unchanged; ``update`` writes the new
    positions in place, and ``crop`` only shortens the views. The buffers are reallocated (one copy) only when an
    update outgrows the capacity, to the larger of what is needed and what was reserved. Greedy outputs are the same
    as with ``DynamicLayer``: attention reads the same numbers, only their storage differs.

    Built on first use, so this module imports no transformers at import time.
    """
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._kbuf: Any = None
            self._vbuf: Any = None
            self._len = 0
            self._want = 0

        def reserve(self, positions: int) -> None:
            self._want = max(self._want, int(positions))

        def capacity(self) -> int:
            return 0 if self._kbuf is None else int(self._kbuf.shape[-2])

        def held_bytes(self) -> int:
            """What the buffers hold, filled or not: the memory this layer keeps alive."""
            if self._kbuf is None:
                return 0
            return (self._kbuf.numel() * self._kbuf.element_size()
                    + self._vbuf.numel() * self._vbuf.element_size())

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self._len
            end = start + int(key_states.shape[-2])
            if end > self.capacity():
                self._grow(key_states, value_states, end)
            self._kbuf[:, :, start:end].copy_(key_states)
            self._vbuf[:, :, start:end].copy_(value_states)
            self._set_length(end)
            return self.keys, self.values

        def _grow(self, key_states: Any, value_states: Any, end: int) -> None:
            cap = max(end, self._want)
            k = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
            v = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
            if self._len:
                k[:, :, :self._len].copy_(self._kbuf[:, :, :self._len])
                v[:, :, :self._len].copy_(self._vbuf[:, :, :self._len])
            self._kbuf, self._vbuf = k, v

        def _set_length(self, length: int) -> None:
            self._len = length
            self.keys = self._kbuf[:, :, :length]
            self.values = self._vbuf[:, :, :length]

        def _adopt(self) -> None:
            """After an operation that replaced keys/values with new tensors: they are the buffers now."""
            if self.keys is None:
                self._kbuf = self._vbuf = None
                self._len = 0
                return
            self._kbuf, self._vbuf = self.keys.contiguous(), self.values.contiguous()
            self._set_length(int(self._kbuf.shape[-2]))

        def get_seq_length(self) -> int:
            return self._len

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove == 0 or self._kbuf is None:
                return
            # transformers' legacy meaning of a positive value: the length to keep.
            keep = tokens_to_remove if tokens_to_remove > 0 else self._len + tokens_to_remove
            self._set_length(max(0, min(self._len, keep)))

        def reset(self) -> None:
            super().reset()
            self._kbuf = self._vbuf = None
            self._len = 0

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            self._adopt()

        def batch_select_indices(self, indices: Any) -> None:
            super().batch_select_indices(indices)
            self._adopt()

    return PreallocatedLayer


class TorchEncode:
    """A transformers encoder (``AutoModel``) as an ``Encode``."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, input_ids: Any, attention_mask: Any) -> Any:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@dataclass(slots=True)
class Row:
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


class Detokenizer:
    """Full and incremental decoding of a row's tokens with one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # Tokenizers that clean up spaces across token boundaries cannot be decoded piecewise.
        self._incremental = not getattr(tokenizer, "clean_up_tokenization_spaces", False)

    def full(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def so_far(self, row: Row) -> str:
        """``full(row.tokens)``, decoding only the tokens since the last complete character (plus one token of
        context, so tokenizers that treat the first token of a decode specially still join up right).

        The window ``tokens[prefix_offset:]`` is decoded and the part after ``tokens[prefix_offset:read_offset]``
        kept; the offsets move on once that part ends in a complete character (no trailing U+FFFD). A window that
        does not extend its prefix takes the full decode: the text must equal it exactly.
        """
        tokens = row.tokens
        if not self._incremental:
            return self.full(tokens)
        prefix = self.full(tokens[row.prefix_offset:row.read_offset])
        window = self.full(tokens[row.prefix_offset:])
        if not window.startswith(prefix):
            return self.full(tokens)
        new = window[len(prefix):]
        if not new or new.endswith("\ufffd"):
            return row.decoded + new  # an incomplete character: keep the window until it completes
        row.decoded += new
        row.prefix_offset, row.read_offset = row.read_offset, len(tokens)
        return row.decoded


class Conversations:
    """One model's view of the (possibly shared) conversation cache, and the turns running right now.

    The cache is one object for every model (one byte budget), so keys are namespaced by model. It has its own short
    lock, so admin calls (budget, end conversation) never wait for a generation.
    """

    def __init__(self, cache: ConversationCache, model: str) -> None:
        self.cache = cache
        self.model = model
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._ended_in_flight: set[str] = set()

    def key(self, conversation_id: str) -> str:
        return f"{self.model}\x00{conversation_id}"

    def peek(self, conversation_id: str) -> CacheEntry | None:
        with self._lock:
            return self.cache.peek(self.key(conversation_id))

    def ids(self) -> list[str]:
        """This model's cached conversations, least recently used first."""
        prefix = f"{self.model}\x00"
        with self._lock:
            return [k[len(prefix):] for k in self.cache.conversations(namespace=self.model) if k.startswith(prefix)]

    def begin(self, conversation_id: str) -> Any | None:
        """Take the cached state of a turn that starts now (None on a miss); the turn is in flight until ``finish``."""
        with self._lock:
            self._in_flight.add(conversation_id)
            return self.cache.take(self.key(conversation_id))

    def record(self, hit: bool) -> None:
        with self._lock:
            self.cache.record(hit, namespace=self.model)

    def finish(self, conversation_id: str, payload: Any | None) -> None:
        """The turn is over: keep ``payload`` (None: the turn failed) unless the conversation ended meanwhile."""
        with self._lock:
            self._in_flight.discard(conversation_id)
            ended = conversation_id in self._ended_in_flight
            self._ended_in_flight.discard(conversation_id)
        if ended or payload is None:
            return
        nbytes = tensor_bytes(payload[1])
        with self._lock:
            self.cache.put(self.key(conversation_id), payload, nbytes, namespace=self.model)

    def end(self, conversation_id: str) -> bool:
        with self._lock:
            if conversation_id in self._in_flight:
                # Its state is being extended right now; drop it when the turn ends instead of storing it.
                self._ended_in_flight.add(conversation_id)
                return True
            return self.cache.release(self.key(conversation_id))

    def stats(self) -> CacheStats:
        with self._lock:
            self.cache.expire()
            return self.cache.stats(namespace=self.model)

    def clear(self) -> None:
        with self._lock:
            self.cache.clear(namespace=self.model)

    def set_budget(self, budget_bytes: int) -> None:
        with self._lock:
            self.cache.set_budget(budget_bytes)

    def set_idle_ttl(self, idle_ttl_s: float | None) -> None:
        with self._lock:
            self.cache.set_idle_ttl(idle_ttl_s)


class DecodeLoop:
    """Generation for one loaded model: validation, batching of plain requests, conversation reuse, streaming.

    Not thread safe: the engine runs one call at a time (its lock).
    """

    def __init__(self, forward: Forward, tokenizer: Any, *, device: Any, eos: frozenset[int], context_length: int,
                 conversations: Conversations | None, engine: str, model: str) -> None:
        self.forward = forward
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer)
        self.device = device
        self.eos = eos
        self.context_length = context_length
        self.conversations = conversations
        self.engine = engine
        self.model = model

    # ------------------------------------------------------------------------------------------ entry points
    def generate(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        ids, errors = _hf.validate_requests(self.tokenizer, batch, self.context_length, engine=self.engine,
                                            model=self.model)
        results: list[GenerationResult | None] = [None] * len(batch)
        plain: list[int] = []
        for i, (req, row, err) in enumerate(zip(batch, ids, errors)):
            if err is not None:
                results[i] = GenerationResult("", 0, 0, "error", error=err)
            elif req.conversation_id is not None and self.conversations is not None:
                results[i] = self._conversation_turn(req, row, self._new_row(req.sampling, len(row)))
            else:
                plain.append(i)
        if plain:
            rows = [self._new_row(batch[i].sampling, len(ids[i])) for i in plain]
            self._decode([ids[i] for i in plain], rows)
            for i, row in zip(plain, rows):
                results[i] = _result(row)
        return results  # type: ignore[return-value]

    def stream(self, request: GenerationRequest, emit: Callable[[StreamChunk], None], cancel: threading.Event) -> None:
        """A chunk per generated token (text held back only while it may be the start of a stop sequence)."""
        ids, errors = _hf.validate_requests(self.tokenizer, [request], self.context_length, engine=self.engine,
                                            model=self.model)
        if errors[0] is not None:
            raise errors[0]
        row_ids = ids[0]
        assert row_ids is not None
        prompt_len = len(row_ids)
        row = self._new_row(request.sampling, prompt_len)

        def on_step(rows: list[Row]) -> None:
            # The row's last chunk goes out below, with the finish reason and final counts.
            if row.delta and row.finish is None:
                emit(StreamChunk(row.delta, None, prompt_len, len(row.tokens)))
                row.delta = ""

        if request.conversation_id is not None and self.conversations is not None:
            result = self._conversation_turn(request, row_ids, row, on_step=on_step, cancel=cancel)
        else:
            self._decode([row_ids], [row], on_step=on_step, cancel=cancel)
            result = _result(row)
        if not cancel.is_set():
            emit(StreamChunk(row.delta, result.finish_reason, result.prompt_tokens, result.completion_tokens))

    # ------------------------------------------------------------------------------------------ conversations
    def _conversation_turn(
        self,
        req: GenerationRequest,
        ids: list[int],
        row: Row,
        on_step: Callable[[list[Row]], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """One turn of a cached conversation: reuse the cached state for the longest common token prefix.

        The cached state covers exactly the token ids stored with it (the last turn's prompt and all its generated
        tokens but the last, which was never fed). A next turn normally starts with them; when it diverges (the
        client edited the history, or re-tokenising the previous completion merged differently at the boundary)
        the state is cropped back to the common prefix, and only the rest is fed. A common prefix of nothing but
        the BOS token is a miss: the state is dropped and the prompt computed in full.
        """
        conv = self.conversations
        assert conv is not None
        cid = req.conversation_id
        assert cid is not None
        payload = conv.begin(cid)
        past, reuse = None, 0
        if payload is not None:
            cached_ids, kv = payload
            common = _common_prefix(cached_ids, ids)
            # At least one token must be fed to get logits for the next one.
            common = min(common, len(ids) - 1)
            floor = 1 if ids and ids[0] == self.tokenizer.bos_token_id else 0
            if common > floor:
                try:
                    if common < len(cached_ids):
                        kv.crop(-(len(cached_ids) - common))
                    past, reuse = kv, common
                except (RuntimeError, ValueError) as exc:
                    # Some cache layouts cannot roll back (a full sliding window): recompute instead.
                    log.debug("conversation %s: cannot crop the cached state (%s); recomputing", cid, exc)
            del payload, kv
        keep = None
        try:
            conv.record(past is not None)
            kv = self._decode([ids], [row], past=past, past_len=reuse, on_step=on_step, cancel=cancel,
                              headroom=True)
            keep = (tuple(ids) + tuple(row.tokens[:-1]), kv)
            result = _result(row)
            result.cache_hit, result.cached_tokens = past is not None, reuse
        finally:
            conv.finish(cid, keep)
        return result

    # ------------------------------------------------------------------------------------------ the loop
    def _new_row(self, sampling: SamplingParams, prompt_len: int) -> Row:
        generator = _hf.make_generator(sampling, self.device)
        return Row(sampling, prompt_len, generator, tracker=_hf.StopTracker(sampling.stop))

    def _decode(
        self,
        prompts: list[list[int]],
        rows: list[Row],
        *,
        past: Any = None,
        past_len: int = 0,
        on_step: Callable[[list[Row]], None] | None = None,
        cancel: threading.Event | None = None,
        headroom: bool = False,
    ) -> Any:
        """Prefill, then one token per row per step until every row finished.

        With ``past`` (a batch of one), ``prompts[0][past_len:]`` is fed on top of the cached state. Returns the
        state, which covers each prompt plus every generated token but the last. The state is reserved for the
        longest prompt plus the most tokens a row may generate; with ``headroom`` (a conversation's state, kept for
        its next turn) for more (``_with_headroom``).
        """
        import torch

        forward, device = self.forward, self.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
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
                kv = forward.empty_state()
            steps = max(r.sampling.max_new_tokens for r in rows)
            need = max(len(p) for p in prompts) + steps
            reserve(kv, min(self.context_length, _with_headroom(need)) if headroom else need)
            # The mask of every step is a prefix of one mask of ones: a step takes a view, not a cat of the mask.
            width = mask.shape[1]
            masks = torch.ones((mask.shape[0], width + steps), dtype=mask.dtype, device=device)
            masks[:, :width] = mask
            stream = on_step is not None
            while True:
                logits, kv = forward(input_ids, mask, positions, kv)
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
                width += 1
                mask = masks[:, :width]
        for row in rows:
            if not row.tracker.stopped:
                row.delta += row.tracker.update(self.detok.full(row.tokens))
            row.delta += row.tracker.flush()
            row.text = row.tracker.text
            if row.finish is None:
                row.finish = "length"
        return kv

    def _advance(self, row: Row, token: int, incremental: bool) -> None:
        """Record one generated token: EOS and completed stop sequences finish the row, so does the length."""
        if token in self.eos and not row.sampling.ignore_eos:
            row.finish = "stop"
        elif incremental:
            row.delta += row.tracker.update(self.detok.so_far(row))
            if row.tracker.stopped:
                row.finish = "stop"
        if row.finish is None and len(row.tokens) >= row.sampling.max_new_tokens:
            row.finish = "length"


def embed_texts(encode: Encode, tokenizer: Any, texts: Sequence[str], *, device: Any, context_length: int,
                engine: str, model: str) -> list[EmbeddingResult]:
    """Mean-pooled, L2-normalised embeddings (``EmbeddingResult`` per text); a too-long text gets its own error."""
    import torch

    results: list[EmbeddingResult | None] = [None] * len(texts)
    good: list[int] = []
    rows: list[list[int]] = []
    for i, text in enumerate(texts):
        row = _hf.encode(tokenizer, text)
        if len(row) > context_length:
            results[i] = EmbeddingResult([], len(row), error=InvalidRequestError(
                f"input of {len(row)} tokens exceeds the context length of model {model} ({context_length} tokens)",
                engine=engine, model=model))
        else:
            good.append(i)
            rows.append(row)
    if good:
        ids, mask = _hf.right_pad(rows, tokenizer.pad_token_id or 0, device)
        with torch.inference_mode():
            vectors = _hf.mean_pool(encode(ids, mask), mask).float().cpu().tolist()
        for i, row, vec in zip(good, rows, vectors):
            results[i] = EmbeddingResult(vec, len(row))
    return results  # type: ignore[return-value]


def _result(row: Row) -> GenerationResult:
    finish = row.finish or "length"
    return GenerationResult(row.text, row.prompt_len, len(row.tokens), finish)  # type: ignore[arg-type]


def _with_headroom(positions: int) -> int:
    """A conversation's reservation: room for a next turn's message and reply (a quarter more, at least 64
    positions, in steps of 64), so that turn writes into the buffers it finds instead of copying the whole history
    into larger ones before its first token."""
    grown = positions + max(64, positions // 4)
    return -(-grown // 64) * 64


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

