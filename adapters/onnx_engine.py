"""ONNX Runtime: the PyTorch model converted with the dynamo exporter, validated, then served by ORT.

How a model gets here (``load``):

1. The family's loader loads the model's parts (so a bad path fails exactly as it does for the torch engine).
2. The model is converted (``adapters.onnx_export``: a decoder graph with past key values, or an encoder graph),
   or the cached conversion is used.
3. Before serving, the ORT session is **validated** against the PyTorch model on sample inputs (a left-padded
   prefill batch and one decode step with the past it produced; for encoders a padded batch): the largest absolute
   logit (hidden state) difference must stay under ``validation_tolerance``. A failed export or validation
   raises ``ModelLoadError``, and the fallback chain serves the model with PyTorch instead.

Serving: the ORT session is a ``Forward`` of the shared decode loop (``OrtForward``: ids, mask, positions and the
past in; last logits and an ``OrtState`` holding the ORT outputs as they are out, fed back next step), so left
padding, sampling, stop sequences, streaming, token counts and the conversation cache are the torch engine's, and
greedy outputs agree token for token. The torch model is dropped once the session serves.

Execution providers: ``settings["providers"]`` in order, filtered by ``onnxruntime.get_available_providers()``;
the provider ORT actually runs on is in ``status()["provider"]``. Spinning threads are off
(``session.intra_op.allow_spinning = 0``): ORT's spinning workers otherwise slow PyTorch in the same process 10-30x.

onnxruntime, onnx, onnxscript and torch are imported only inside methods.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from adapters import _hf
from adapters.base import Availability, Capabilities, EngineError, ModelLoadError, ModelSpec
from adapters.hf_decode import Encode, Forward, TorchEncode, TorchForward
from adapters.hf_engine import Backend, HfEngine, HfParts
from adapters.onnx_export import (
    GRAPH_FORMAT,
    VALIDATION_PROMPTS,
    cache_key,
    cached_export,
    corrupted,
    fused,
    kv_shape,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PROVIDERS", "GRAPH_FORMAT", "OnnxEngine", "OnnxValidationError", "OrtEncode", "OrtForward",
           "cache_key", "choose_providers"]

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
DEFAULT_TOLERANCE = 1e-3


class OnnxValidationError(ModelLoadError):
    """The converted model disagrees with PyTorch by more than the tolerance; it is not served."""


def choose_providers(wanted: Sequence[str], available: Sequence[str]) -> list[str]:
    """The configured providers, in their order, that this onnxruntime build offers."""
    offered = set(available)
    return [p for p in wanted if p in offered]


class OnnxEngine(HfEngine):
    """ONNX Runtime serving of a model converted from PyTorch and validated against it.

    Settings (``OnnxEngineConfig``): ``providers`` (preference order), ``validation_tolerance`` (largest absolute
    difference accepted), ``cache_dir`` (converted models; default ``$MUAI_CACHE_DIR/onnx``), ``intra_op_threads``
    (unset: one thread for a model narrower than ``SMALL_HIDDEN``, else ORT's default; see ``_default_threads``).
    ``_corrupt_for_test`` (tests only) perturbs the weights of the converted model after export, in memory, so a
    test can prove the validation gate turns it away.
    """

    name = "onnxruntime"
    capabilities = Capabilities(streaming=True, max_batch_size=32)

    # ------------------------------------------------------------------------------------------ availability
    @classmethod
    def available(cls, settings: Mapping[str, Any] | None = None) -> Availability:
        for mod in ("onnxruntime", "onnx", "onnxscript", "torch", "transformers"):
            if importlib.util.find_spec(mod) is None:
                return Availability(False, f"{mod} is not installed: pip install 'muai[onnx]'")
        try:
            import onnxruntime as ort

            offered = ort.get_available_providers()
        except Exception as exc:  # a broken install must read as "not here", never raise
            return Availability(False, f"onnxruntime cannot be imported: {_hf.first_line(exc)}")
        wanted = list((settings or {}).get("providers") or DEFAULT_PROVIDERS)
        if not choose_providers(wanted, offered):
            return Availability(
                False, f"none of the configured execution providers {wanted} is offered here (offered: {offered})"
            )
        return Availability(True)

    # ------------------------------------------------------------------------------------------ what differs
    def _load_spec(self, spec: ModelSpec) -> ModelSpec:
        # ORT places the model itself (execution providers); the loop's side only moves small tensors.
        return replace(spec, device="cpu")

    def _backend(self, parts: HfParts, spec: ModelSpec) -> Backend:
        started = time.monotonic()
        try:
            session, info = self._convert_and_validate(parts, spec)
        except EngineError:
            raise
        except Exception as exc:  # the exporter and ORT raise many types; all mean "cannot serve it this way"
            raise ModelLoadError(
                f"model {spec.name!r}: ONNX conversion failed: {_hf.first_line(exc)}", engine=self.name,
                model=spec.name,
            ) from exc
        info["load_seconds"] = round(time.monotonic() - started, 3)
        log.info(
            "onnxruntime serving %s on %s (validation max |diff| %.2e <= %.1e; %s in %.1fs)",
            spec.name, info["provider"], info["validation_max_abs_diff"], info["validation_tolerance"],
            "cache hit" if info["cache_hit"] else "exported", info["load_seconds"],
        )
        if spec.task == "generate":
            return Backend(forward=OrtForward(session, parts.model.config), info=info)
        return Backend(encode=OrtEncode(session), info=info)

    # ------------------------------------------------------------------------------------------ conversion
    def _convert_and_validate(self, parts: HfParts, spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
        import onnxruntime as ort

        tolerance = float(self.settings.get("validation_tolerance") or DEFAULT_TOLERANCE)
        wanted = list(self.settings.get("providers") or DEFAULT_PROVIDERS)
        providers = choose_providers(wanted, ort.get_available_providers())
        if not providers:
            raise ModelLoadError(
                f"none of the configured execution providers {wanted} is offered here "
                f"({ort.get_available_providers()})", engine=self.name, model=spec.name,
            )
        onnx_path, cache_hit, export_s = cached_export(self._cache_root(), spec.name, parts.path, parts.model,
                                                       parts.tokenizer, task=spec.task, dtype=spec.dtype)
        fused_path = fused(onnx_path)
        source: Any = str(fused_path or onnx_path)
        if self.settings.get("_corrupt_for_test"):
            source = corrupted(onnx_path)
            log.warning("onnxruntime: %s: weights deliberately perturbed (_corrupt_for_test)", spec.name)
        session = ort.InferenceSession(source, self._session_options(parts.model.config), providers=providers)
        if spec.task == "generate":
            diff = _validate_decoder(TorchForward(parts.model), OrtForward(session, parts.model.config),
                                     parts.tokenizer)
        else:
            diff = _validate_encoder(TorchEncode(parts.model), OrtEncode(session), parts.tokenizer)
        log.info("onnxruntime: %s validated against PyTorch: max |diff| %.3e (tolerance %.1e)", spec.name, diff,
                 tolerance)
        if not diff <= tolerance:  # also catches NaN
            raise OnnxValidationError(
                f"model {spec.name!r}: the ONNX conversion disagrees with PyTorch: max absolute difference "
                f"{diff:.3e} exceeds validation_tolerance {tolerance:.1e}; serving it would change answers",
                engine=self.name, model=spec.name,
            )
        info = {
            "provider": session.get_providers()[0],
            "providers": list(session.get_providers()),
            "providers_offered": list(ort.get_available_providers()),
            "onnx_path": str(onnx_path),
            "fused": fused_path is not None,
            "served_path": str(fused_path or onnx_path),
            "cache_hit": cache_hit,
            "export_seconds": round(export_s, 3),
            "validation_max_abs_diff": diff,
            "validation_tolerance": tolerance,
            "onnxruntime_version": ort.__version__,
        }
        return session, info

    def _session_options(self, config: Any = None) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        # ORT's workers spin between ops by default; in a process that also runs PyTorch they steal its cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        threads = self.settings.get("intra_op_threads") or _default_threads(config)
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        return so

    def _cache_root(self) -> Path:
        configured = self.settings.get("cache_dir")
        if configured:
            return Path(configured)
        from adapters.tiny import default_cache_dir

        return default_cache_dir() / "onnx"


SMALL_HIDDEN = 512
"""Models narrower than this run ORT on one intra-op thread unless ``intra_op_threads`` says otherwise."""


def _default_threads(config: Any) -> int | None:
    """One thread for a small model, else ORT's default (None).

    Without spinning (off, see above) every kernel ORT splits wakes the pool's sleeping workers; a small model's
    kernels are too small for the split to pay for the wake-up, and on a busy machine the worker may not even be
    scheduled. On the tiny Llama (hidden 128), 4 requests of 32 tokens one at a time took 62 ms with ORT's pool and
    48 ms on one thread, a batch of 16 took 37 and 31 ms. Larger models keep the pool: their kernels are worth
    splitting.
    """
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return 1 if isinstance(hidden, int) and hidden < SMALL_HIDDEN else None


# ---------------------------------------------------------------------------------------------- validation
def _validate_decoder(ref: Forward, got: Forward, tokenizer: Any) -> float:
    """Largest |logit difference| over a left-padded prefill and one decode step fed with its own past."""
    import numpy as np
    import torch

    enc = _hf.left_pad([_hf.encode(tokenizer, p) for p in VALIDATION_PROMPTS], tokenizer.pad_token_id or 0)
    with torch.inference_mode():
        ref_logits, ref_past = ref(enc.input_ids, enc.attention_mask, enc.position_ids, ref.empty_state())
        got_logits, got_past = got(enc.input_ids, enc.attention_mask, enc.position_ids, got.empty_state())
        worst = _max_diff(ref_logits, got_logits)
        nxt = ref_logits.argmax(-1, keepdim=True)
        mask = torch.cat([enc.attention_mask, enc.attention_mask.new_ones((nxt.shape[0], 1))], dim=1)
        pos = enc.position_ids[:, -1:] + 1
        ref_logits, _ = ref(nxt, mask, pos, ref_past)
        got_logits, _ = got(nxt, mask, pos, got_past)
        worst = max(worst, _max_diff(ref_logits, got_logits))
    return float(worst) if np.isfinite(worst) else float("inf")


def _validate_encoder(ref: Encode, got: Encode, tokenizer: Any) -> float:
    """Largest |hidden state difference| over the real (unpadded) tokens of a right-padded batch."""
    import torch

    ids, mask = _hf.right_pad([_hf.encode(tokenizer, t) for t in VALIDATION_PROMPTS], tokenizer.pad_token_id or 0)
    with torch.inference_mode():
        real = mask.bool()
        return _max_diff(ref(ids, mask)[real], got(ids, mask)[real])


def _max_diff(a: Any, b: Any) -> float:
    d = (a.float() - b.float()).abs().max().item()
    return d if d == d and d != float("inf") else float("inf")  # NaN / inf fail the gate


# ---------------------------------------------------------------------------------------------- serving
class OrtForward:
    """An ORT decoder session as a ``Forward`` of the decode loop.

    The state is an :class:`OrtState` over the session's ``present.*`` outputs (no copy), which the conversation
    cache crops and measures as it does torch's ``DynamicCache``.
    """

    def __init__(self, session: Any, config: Any) -> None:
        import numpy as np

        self.session = session
        self.config = config
        self.layers, self.kv_heads, self.head_dim = kv_shape(config)
        self._dtype = np.float16 if "float16" in session.get_inputs()[3].type else np.float32
        self._outputs = [o.name for o in session.get_outputs()]

    def empty_state(self) -> Any:
        return None

    def __call__(self, input_ids: Any, attention_mask: Any, position_ids: Any, state: Any) -> tuple[Any, Any]:
        import numpy as np
        import torch

        batch = int(input_ids.shape[0])
        feed = {
            "input_ids": _np(input_ids, np.int64),
            "attention_mask": _np(attention_mask, np.int64),
            "position_ids": _np(position_ids, np.int64),
        }
        empty = state is None or state.get_seq_length() == 0
        for i in range(self.layers):
            if empty:
                k = v = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self._dtype)
            else:
                layer = state.layers[i]
                k, v = np.ascontiguousarray(layer.k), np.ascontiguousarray(layer.v)
            feed[f"past.{i}.key"], feed[f"past.{i}.value"] = k, v
        outs = self.session.run(self._outputs, feed)
        state = OrtState([_OrtLayer(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(self.layers)])
        return torch.from_numpy(outs[0])[:, -1, :], state


class _OrtLayer:
    """One layer's past as ORT returned it (numpy); ``keys``/``values`` are zero-copy torch views for readers that
    measure a cache as transformers' (``adapters.kvcache.tensor_bytes``)."""

    __slots__ = ("k", "v")

    def __init__(self, k: Any, v: Any) -> None:
        self.k, self.v = k, v

    @property
    def keys(self) -> Any:
        import torch

        return torch.from_numpy(self.k)

    @property
    def values(self) -> Any:
        import torch

        return torch.from_numpy(self.v)


class OrtState:
    """The decode loop's state for ONNX Runtime: the session's ``present.*`` outputs, fed back as they are.

    Not a transformers ``DynamicCache``: building one every step cost more than the ORT run itself on small models
    (its config lookups and a ``torch.cat`` per layer), and the next step wants numpy anyway. It offers what the
    loop and the conversation cache use of a cache: ``layers[i].keys/.values``, ``get_seq_length()``, ``crop()``.
    """

    __slots__ = ("layers",)

    def __init__(self, layers: list[_OrtLayer]) -> None:
        self.layers = layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.layers[layer_idx].k.shape[2]) if self.layers else 0

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (negative: drop that many from the end), as ``DynamicCache``."""
        length = self.get_seq_length()
        if max_length < 0:
            max_length = length + max_length
        if max_length >= length:
            return
        for layer in self.layers:
            layer.k, layer.v = layer.k[:, :, :max_length, :], layer.v[:, :, :max_length, :]


class OrtEncode:
    """An ORT encoder session as an ``Encode``."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def __call__(self, input_ids: Any, attention_mask: Any) -> Any:
        import numpy as np
        import torch

        (hidden,) = self.session.run(["last_hidden_state"], {"input_ids": _np(input_ids, np.int64),
                                                             "attention_mask": _np(attention_mask, np.int64)})
        return torch.from_numpy(hidden)


def _np(tensor: Any, dtype: Any) -> Any:
    import numpy as np

    arr = tensor.detach().cpu().numpy()
    return np.ascontiguousarray(arr, dtype=dtype)
