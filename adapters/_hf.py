"""Helpers shared by the engines that run Hugging Face models (torch, ONNX Runtime, DeepSpeed).

Everything here imports torch / transformers inside the functions, so importing this module stays cheap. What it
gives the engines, so they behave the same way:

- ``check_model_dir``: a path that does not exist or holds no model becomes one clear ``ModelLoadError``;
- ``resolve_device`` / ``resolve_dtype``: ``auto`` / ``cpu`` / ``cuda:N`` and dtype names from config;
- ``load_tokenizer``: left padding and a pad token, always;
- ``encode_batch`` / ``left_pad``: left-padded ids, attention mask and the matching position ids (decoders);
  ``right_pad``: right-padded ids and mask (encoders);
- ``context_length`` / ``check_lengths``: the model's context and the request's fit in it;
- ``StopTracker``: stop-sequence trimming that also works token by token (holds back a possible stop prefix);
- ``choose_next_token``: greedy, or temperature + top-p sampling with a per-request generator; ``greedy_tokens``:
  the argmax of every row of a batch in one transfer;
- ``is_out_of_memory``: the allocator ran out (a per-request failure, not a broken engine);
- ``mean_pool``: mean pooling + L2 normalisation for encoder embeddings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.base import (
    EngineError,
    GenerationRequest,
    InvalidRequestError,
    ModelLoadError,
    ModelSpec,
    SamplingParams,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}
# Weight files that mark a directory as holding a model (config.json alone is not enough for loading).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf")


def check_model_dir(spec: ModelSpec, *, engine: str) -> Path:
    """Resolve ``builtin:`` names and check that ``spec.path`` is a model directory; ModelLoadError otherwise.

    These errors are ``fatal``: no engine can load what is not there, so the fallback chain stops at them.
    """
    path = spec.path
    if path.startswith("builtin:"):
        from adapters.tiny import resolve_model_path

        try:
            path = resolve_model_path(path)
        except (FileNotFoundError, RuntimeError) as exc:
            raise ModelLoadError(str(exc), engine=engine, model=spec.name, retryable=False, fatal=True) from exc
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"model {spec.name!r}: path {path} does not exist", engine=engine, model=spec.name, retryable=False,
            fatal=True,
        )
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelLoadError(
            f"model {spec.name!r}: {path} holds no model (expected a save_pretrained directory with config.json)",
            engine=engine, model=spec.name, retryable=False, fatal=True,
        )
    if not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in p.iterdir()):
        raise ModelLoadError(
            f"model {spec.name!r}: {path} has a config.json but no weights (*.safetensors / *.bin)",
            engine=engine, model=spec.name, retryable=False, fatal=True,
        )
    return p


def resolve_device(device: str, *, engine: str = "", model: str = "") -> Any:
    """``auto`` -> ``cuda:0`` when CUDA is usable, else ``cpu``; ``cuda`` -> ``cuda:0``; checks the index exists."""
    import torch

    dev = (device or "auto").strip().lower()
    if dev == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if dev == "cpu":
        return torch.device("cpu")
    if dev.startswith("cuda"):
        index = int(dev.split(":", 1)[1]) if ":" in dev else 0
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here", engine=engine,
                                 model=model)
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible",
                engine=engine, model=model,
            )
        return torch.device(f"cuda:{index}")
    raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N", engine=engine, model=model,
                         retryable=False)


def resolve_dtype(name: str, *, engine: str = "", model: str = "") -> Any:
    import torch

    key = _DTYPES.get((name or "float32").lower())
    if key is None:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of {sorted(set(_DTYPES.values()))}", engine=engine,
                             model=model, retryable=False)
    return getattr(torch, key)


def load_tokenizer(path: str | os.PathLike[str], *, engine: str = "", model: str = "") -> Any:
    """AutoTokenizer with left padding and a pad token (eos, then unk, when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises OSError/ValueError/... depending on what is missing
        raise ModelLoadError(f"model {model!r}: cannot load tokenizer from {path}: {first_line(exc)}",
                             engine=engine, model=model, retryable=False) from exc
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def context_length(model_config: Any, spec: ModelSpec | None = None, tokenizer: Any = None) -> int:
    """The longest prompt + completion the model accepts: spec.max_model_len, else the model config's."""
    if spec is not None and spec.max_model_len:
        return int(spec.max_model_len)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**9:
        return limit
    return 2048


def check_lengths(prompt_tokens: int, sampling: SamplingParams, ctx: int, *, engine: str, model: str) -> None:
    """Raise InvalidRequestError when the prompt plus the requested completion does not fit the context."""
    if sampling.max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be at least 1, got {sampling.max_new_tokens}",
                                  engine=engine, model=model)
    if prompt_tokens + sampling.max_new_tokens > ctx:
        raise InvalidRequestError(
            f"prompt of {prompt_tokens} tokens plus max_new_tokens={sampling.max_new_tokens} exceeds the context "
            f"length of model {model!r} ({ctx} tokens)", engine=engine, model=model,
        )


def check_sampling(sampling: SamplingParams, *, engine: str, model: str) -> None:
    if sampling.temperature < 0:
        raise InvalidRequestError(f"temperature must be >= 0, got {sampling.temperature}", engine=engine, model=model)
    if not 0.0 < sampling.top_p <= 1.0:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {sampling.top_p}", engine=engine, model=model)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one prompt, special tokens (bos) included, exactly as a batch of one would see them."""
    return list(tokenizer(text)["input_ids"])


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(encode(tokenizer, text))


@dataclass(slots=True)
class EncodedBatch:
    input_ids: Any
    attention_mask: Any
    position_ids: Any
    lengths: list[int]
    """Unpadded prompt length of each row."""


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> EncodedBatch:
    """Left-pad token id rows into one batch with the attention mask and position ids that go with it.

    Position ids count from 0 at each row's first real token, so a padded row computes exactly what it would alone.
    """
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if device is not None:
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    return EncodedBatch(ids, mask, pos, [len(r) for r in rows])


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[Any, Any]:
    """Right-padded ids and attention mask: encoders number positions from the left edge, so they pad on the right."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def encode_batch(tokenizer: Any, prompts: Sequence[str], device: Any = None) -> EncodedBatch:
    return left_pad([encode(tokenizer, p) for p in prompts], tokenizer.pad_token_id, device)


class StopTracker:
    """Finds stop sequences in a growing completion, and says how much text is safe to emit so far.

    ``update(text)`` takes the whole completion decoded so far. Text that could still turn out to be the start of
    a stop sequence is held back, so a stream never shows part of a stop sequence; a trailing U+FFFD (an
    incomplete UTF-8 sequence from a byte-level tokenizer) is held back too.
    """

    __slots__ = ("stops", "text", "stopped", "_emitted")

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.stopped = False
        self._emitted = 0

    def update(self, text: str) -> str:
        """Feed the completion so far; returns the new text safe to emit (after trimming, when a stop is found)."""
        if self.stopped:
            return ""
        cut = trim_at_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            self.text = cut
            return self._emit(len(cut))
        self.text = text
        safe = len(text) - _held_back(text, self.stops)
        while safe > self._emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._emit(safe)

    def flush(self) -> str:
        """At the end of generation: everything not emitted yet (no stop can complete any more)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        out = self.text[self._emitted:upto]
        self._emitted = upto
        return out


def trim_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """``text`` cut before the earliest stop sequence, or None when none occurs."""
    best = -1
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i != -1 and (best == -1 or i < best):
            best = i
    return None if best == -1 else text[:best]


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop sequence."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def make_generator(sampling: SamplingParams, device: Any) -> Any:
    """A torch.Generator for one request: seeded when ``seed`` is set (reproducible), else from fresh entropy."""
    import torch

    if sampling.greedy:
        return None
    gen = torch.Generator(device=device)
    if sampling.seed is not None:
        gen.manual_seed(int(sampling.seed))
    else:
        gen.seed()
    return gen


def choose_next_token(logits: Any, sampling: SamplingParams, generator: Any = None) -> int:
    """Next token id from one row of logits: argmax when greedy, else temperature + nucleus (top-p) sampling."""
    import torch

    if sampling.greedy:
        return int(torch.argmax(logits).item())
    scaled = logits.float() / max(sampling.temperature, 1e-5)
    probs = torch.softmax(scaled, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest set whose mass reaches top_p: drop a token when the mass before it already does.
        drop = (cumulative - sorted_probs) >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def greedy_tokens(logits: Any) -> list[int]:
    """The argmax of every row of ``logits`` (batch x vocab), with one device-to-host transfer for the batch."""
    return logits.argmax(dim=-1).tolist()


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` says an allocator ran out of memory: ``torch.OutOfMemoryError`` (CUDA and other
    accelerators), ``MemoryError``, or the RuntimeError torch's CPU allocator (or ONNX Runtime's arena) raises.
    Checked by name and message, so nothing is imported."""
    if isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                       "not enough memory", "failed to allocate memory"))
    return False


# What CUDA (and NVML, through torch) say when the context is poisoned: every later call on the device fails too,
# so the model must leave it. Lower-cased substrings of the messages.
_DEVICE_FAULTS = (
    "illegal memory access", "illegal instruction", "uncorrectable ecc", "ecc error", "device-side assert",
    "unspecified launch failure", "gpu is lost", "gpu has fallen off the bus", "cuda error: unknown error",
    "misaligned address", "cudaerrorlaunchfailure",
)


def device_fault(exc: BaseException) -> str | None:
    """The first line of ``exc`` when it says the device itself is broken (see ``_DEVICE_FAULTS``), else None.
    Checked by message, so nothing is imported."""
    text = str(exc)
    lowered = text.lower()
    if any(s in lowered for s in _DEVICE_FAULTS):
        return first_line(exc)
    return None


def mean_pool(last_hidden: Any, attention_mask: Any) -> Any:
    """Mean over real tokens, then L2 normalisation (the sentence-transformers recipe for MiniLM)."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    summed = (last_hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=-1)


def validate_requests(
    tokenizer: Any, batch: Sequence[GenerationRequest], ctx: int, *, engine: str, model: str
) -> tuple[list[list[int] | None], list[EngineError | None]]:
    """Encode each prompt and check it; a bad request gets its own error and leaves its neighbours alone."""
    ids: list[list[int] | None] = []
    errors: list[EngineError | None] = []
    for req in batch:
        try:
            check_sampling(req.sampling, engine=engine, model=model)
            row = encode(tokenizer, req.prompt)
            if not row:
                raise InvalidRequestError("the prompt encodes to no tokens", engine=engine, model=model)
            check_lengths(len(row), req.sampling, ctx, engine=engine, model=model)
        except EngineError as exc:
            ids.append(None)
            errors.append(exc)
        else:
            ids.append(row)
            errors.append(None)
    return ids, errors


def option(spec: ModelSpec | None, settings: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A per-model option (``spec.options``) falling back to the engine's settings."""
    if spec is not None and key in spec.options:
        return spec.options[key]
    return settings.get(key, default)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")

