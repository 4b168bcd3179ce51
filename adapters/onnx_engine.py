"""ONNX Runtime: the PyTorch model converted with the dynamo exporter, validated, then served by ORT.

How a model gets here (``load``):

1. The torch engine's loading code loads the model (so a bad path fails exactly as it does there).
2. The model is exported with ``torch.onnx.export(..., dynamo=True)``: a causal LM as one *decoder graph with past
   key values* (``input_ids, attention_mask, position_ids, past.{i}.key/value -> logits, present.{i}.key/value``,
   eager attention, logits of the last position only); an encoder as ``input_ids, attention_mask ->
   last_hidden_state``. The legacy TorchScript exporter is never used: it exports these models without an error
   but with wrong numbers. The result is cached on disk, keyed by the model files' content and the
   torch/onnx/onnxscript versions, so a restart loads it in well under a second.
3. Before serving, the ORT session is **validated** against the PyTorch model on sample inputs (a left-padded
   prefill batch and one decode step with the past it produced; for encoders a padded batch): the largest absolute
   logit (hidden state) difference must stay under ``validation_tolerance``. A failed export or validation
   raises ``ModelLoadError``, and the fallback chain serves the model with PyTorch instead.

Serving reuses the torch engine's decode loop unchanged (left padding, per-request sampling, stop sequences,
streaming, token counts, the conversation KV cache): the ORT session stands in for the model behind a small
object that takes the same keyword arguments and returns logits and a ``DynamicCache`` built on the ORT outputs
(zero-copy ``torch.from_numpy``). So the two engines differ in the forward pass and nothing else, and their greedy
outputs agree token for token.

Execution providers: ``settings["providers"]`` in order, filtered by ``onnxruntime.get_available_providers()``;
the provider ORT actually runs on is in ``status()["provider"]``. Spinning threads are off
(``session.intra_op.allow_spinning = 0``): ORT's spinning workers otherwise slow PyTorch in the same process 10-30x.

onnxruntime, onnx, onnxscript and torch are imported only inside methods.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from adapters import _hf
from adapters.base import Availability, EngineError, ModelLoadError, ModelSpec
from adapters.torch_engine import TorchEngine

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PROVIDERS", "GRAPH_FORMAT", "OnnxEngine", "OnnxValidationError", "choose_providers"]

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GRAPH_FORMAT = "muai-onnx-1"
"""Bumped whenever the exported graph's inputs/outputs change, so old cache entries are never reused."""
DEFAULT_TOLERANCE = 1e-3
_VALIDATION_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world",
    "A model server keeps models loaded and answers requests in order.",
)
_HASH_CHUNK = 1 << 20


class OnnxValidationError(ModelLoadError):
    """The converted model disagrees with PyTorch by more than the tolerance; it is not served."""


def choose_providers(wanted: Sequence[str], available: Sequence[str]) -> list[str]:
    """The configured providers, in their order, that this onnxruntime build offers."""
    offered = set(available)
    return [p for p in wanted if p in offered]


class OnnxEngine(TorchEngine):
    """ONNX Runtime serving of a model converted from PyTorch and validated against it.

    Settings (``OnnxEngineConfig``): ``providers`` (preference order), ``validation_tolerance`` (largest absolute
    difference accepted), ``cache_dir`` (converted models; default ``$MUAI_CACHE_DIR/onnx``), ``intra_op_threads``.
    ``_corrupt_for_test`` (tests only) perturbs the weights of the converted model after export, in memory, so a
    test can prove the validation gate turns it away.
    """

    name = "onnxruntime"

    def __init__(self, settings: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._session: Any = None
        self._onnx_info: dict[str, Any] = {}

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

    # ------------------------------------------------------------------------------------------ lifecycle
    def load(self, spec: ModelSpec) -> None:
        if self.loaded:
            self.unload()
        # ORT places the model itself (execution providers); the torch side of the loop only moves small tensors.
        super().load(replace(spec, device="cpu"))
        started = time.monotonic()
        try:
            session, info = self._convert_and_validate(spec)
        except EngineError:
            self.unload()
            raise
        except Exception as exc:  # the exporter and ORT raise many types; all mean "cannot serve it this way"
            self.unload()
            raise ModelLoadError(
                f"model {spec.name!r}: ONNX conversion failed: {_hf.first_line(exc)}", engine=self.name,
                model=spec.name,
            ) from exc
        info["load_seconds"] = round(time.monotonic() - started, 3)
        wrapper = (
            _OrtCausalLM(session, self.model.config)
            if spec.task == "generate"
            else _OrtEncoder(session, self.model.config)
        )
        with self._lock:
            self._model = wrapper  # the torch model is dropped here: ORT serves from now on
            self._session = session
            self._onnx_info = info
            self.spec = spec
        log.info(
            "onnxruntime serving %s on %s (validation max |diff| %.2e <= %.1e; %s in %.1fs)",
            spec.name, info["provider"], info["validation_max_abs_diff"], info["validation_tolerance"],
            "cache hit" if info["cache_hit"] else "exported", info["load_seconds"],
        )

    def unload(self) -> None:
        super().unload()
        self._session = None

    def status(self) -> dict[str, Any]:
        out = super().status()
        out.update({k: v for k, v in self._onnx_info.items() if k != "outputs"})
        return out

    # ------------------------------------------------------------------------------------------ conversion
    def _convert_and_validate(self, spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
        import onnxruntime as ort

        model = self.model
        path = _hf.check_model_dir(spec, engine=self.name)
        tolerance = float(self.settings.get("validation_tolerance") or DEFAULT_TOLERANCE)
        wanted = list(self.settings.get("providers") or DEFAULT_PROVIDERS)
        providers = choose_providers(wanted, ort.get_available_providers())
        if not providers:
            raise ModelLoadError(
                f"none of the configured execution providers {wanted} is offered here "
                f"({ort.get_available_providers()})", engine=self.name, model=spec.name,
            )
        onnx_path, cache_hit, export_s = self._cached_export(spec, path, model)
        source: Any = str(onnx_path)
        if self.settings.get("_corrupt_for_test"):
            source = _corrupted(onnx_path)
            log.warning("onnxruntime: %s: weights deliberately perturbed (_corrupt_for_test)", spec.name)
        session = ort.InferenceSession(source, self._session_options(), providers=providers)
        if spec.task == "generate":
            diff = _validate_decoder(session, model, self.tokenizer)
        else:
            diff = _validate_encoder(session, model, self.tokenizer)
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
            "cache_hit": cache_hit,
            "export_seconds": round(export_s, 3),
            "validation_max_abs_diff": diff,
            "validation_tolerance": tolerance,
            "onnxruntime_version": ort.__version__,
        }
        return session, info

    def _session_options(self) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        # ORT's workers spin between ops by default; in a process that also runs PyTorch they steal its cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        threads = self.settings.get("intra_op_threads")
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

    def _cached_export(self, spec: ModelSpec, path: Path, model: Any) -> tuple[Path, bool, float]:
        key = cache_key(path, task=spec.task, dtype=spec.dtype)
        root = self._cache_root()
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name)[:48] or "model"
        target = root / f"{slug}-{key[:20]}"
        onnx_file = target / "model.onnx"
        if onnx_file.is_file() and (target / "meta.json").is_file():
            log.info("onnxruntime: %s: using cached conversion %s", spec.name, target)
            return onnx_file, True, 0.0
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{slug}-", dir=root))
        try:
            log.info("onnxruntime: %s: exporting with torch.onnx.export(dynamo=True) ...", spec.name)
            started = time.monotonic()
            program = _export(model, spec.task, self.tokenizer)
            program.save(str(tmp / "model.onnx"))
            elapsed = time.monotonic() - started
            log.info("onnxruntime: %s: exported in %.1fs", spec.name, elapsed)
            meta = {"key": key, "model": spec.name, "path": str(path), "task": spec.task, "dtype": spec.dtype,
                    "format": GRAPH_FORMAT, "versions": _versions(), "export_seconds": round(elapsed, 3)}
            # meta.json is written last: its presence marks a complete entry.
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            try:
                tmp.rename(target)
            except OSError:
                if not (target / "meta.json").is_file():  # another process won the race with a complete entry
                    shutil.rmtree(target, ignore_errors=True)
                    tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return onnx_file, False, elapsed


def _versions() -> dict[str, str]:
    import onnx
    import onnxscript
    import torch
    import transformers

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "transformers": transformers.__version__}


def cache_key(path: str | os.PathLike[str], *, task: str, dtype: str) -> str:
    """sha256 over the graph format, the exporter's versions, and the content of the model's config and weights."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": GRAPH_FORMAT, "task": task, "dtype": dtype, **_versions()}, sort_keys=True).encode())
    root = Path(path)
    for f in sorted(root.iterdir()):
        if not f.is_file() or not (f.name == "config.json" or f.name.endswith((".safetensors", ".bin"))):
            continue
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- export
def _kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder's cache, from its config."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def _export(model: Any, task: str, tokenizer: Any) -> Any:
    import torch

    model.eval()
    if task == "generate":
        module, args, dynamic, names, outputs = _decoder_export_args(model)
    else:
        module, args, dynamic, names, outputs = _encoder_export_args(model, tokenizer)
    original = getattr(model.config, "_attn_implementation", None)
    if task == "generate" and original != "eager":
        # The with-past decoder graph exports correctly only from eager attention.
        model.set_attn_implementation("eager")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=dynamic, input_names=names, output_names=outputs,
                optimize=True, verbose=False, report=False,
            )
    finally:
        if task == "generate" and original and original != "eager":
            model.set_attn_implementation(original)


def _decoder_export_args(model: Any) -> tuple[Any, ...]:
    import torch
    from transformers import DynamicCache

    layers, kv_heads, head_dim = _kv_shape(model.config)
    dtype = next(model.parameters()).dtype

    class Decoder(torch.nn.Module):
        """Flat tensors in and out: what an ONNX graph can carry in place of a DynamicCache."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.inner.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            present = out.past_key_values
            result = [out.logits]
            for i in range(layers):
                result += [present.layers[i].keys, present.layers[i].values]
            return tuple(result)

    b, s, p = 2, 3, 4  # sample sizes > 1, so the exporter keeps every dimension symbolic
    ids = torch.randint(4, 64, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    past = tuple(torch.randn(b, kv_heads, p, head_dim, dtype=dtype) for _ in range(2 * layers))
    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               tuple({0: batch, 2: past_len} for _ in range(2 * layers)))
    names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")
    ]
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return Decoder(model), (ids, mask, pos, *past), dynamic, names, outputs


def _encoder_export_args(model: Any, tokenizer: Any) -> tuple[Any, ...]:
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    enc = _encoder_batch(tokenizer, _VALIDATION_PROMPTS[:2])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    return (Encoder(model), (enc[0], enc[1]), ({0: batch, 1: seq}, {0: batch, 1: seq}),
            ["input_ids", "attention_mask"], ["last_hidden_state"])


def _corrupted(onnx_path: Path) -> bytes:
    """The model at ``onnx_path`` with every float weight matrix perturbed (tests of the validation gate)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    rng = np.random.default_rng(0)
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and arr.ndim >= 2:
            noisy = (arr + rng.normal(0.0, 0.5, arr.shape)).astype(arr.dtype)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    return proto.SerializeToString()


# ---------------------------------------------------------------------------------------------- validation
def _encoder_batch(tokenizer: Any, texts: Sequence[str]) -> tuple[Any, Any]:
    """Right-padded ids and mask, as the torch engine's embed path builds them."""
    import torch

    rows = [_hf.encode(tokenizer, t) for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _validate_decoder(session: Any, model: Any, tokenizer: Any) -> float:
    """Largest |logit difference| over a left-padded prefill and one decode step fed with its own past."""
    import numpy as np
    import torch
    from transformers import DynamicCache

    ort_model = _OrtCausalLM(session, model.config)
    enc = _hf.left_pad([_hf.encode(tokenizer, p) for p in _VALIDATION_PROMPTS], tokenizer.pad_token_id or 0)
    worst = 0.0
    with torch.inference_mode():
        ref = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids,
                    past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
        got = ort_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids,
                        past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
        worst = max(worst, _max_diff(ref.logits[:, -1], got.logits[:, -1]))
        nxt = ref.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([enc.attention_mask, enc.attention_mask.new_ones((nxt.shape[0], 1))], dim=1)
        pos = enc.position_ids[:, -1:] + 1
        ref2 = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=ref.past_key_values,
                     use_cache=True, logits_to_keep=1)
        got2 = ort_model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=got.past_key_values,
                         use_cache=True, logits_to_keep=1)
        worst = max(worst, _max_diff(ref2.logits[:, -1], got2.logits[:, -1]))
    return float(worst) if np.isfinite(worst) else float("inf")


def _validate_encoder(session: Any, model: Any, tokenizer: Any) -> float:
    """Largest |hidden state difference| over the real (unpadded) tokens of a right-padded batch."""
    import torch

    ids, mask = _encoder_batch(tokenizer, _VALIDATION_PROMPTS)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask)
        ref = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        got = _OrtEncoder(session, model.config)(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        return _max_diff(ref[real], got[real])


def _max_diff(a: Any, b: Any) -> float:
    d = (a.float() - b.float()).abs().max().item()
    return d if d == d and d != float("inf") else float("inf")  # NaN / inf fail the gate


# ---------------------------------------------------------------------------------------------- serving
class _OrtCausalLM:
    """An ORT decoder session behind the call the torch engine's decode loop makes on a causal LM.

    Takes ``input_ids, attention_mask, position_ids, past_key_values`` (a ``DynamicCache``, empty on prefill)
    and returns an object with ``logits`` (last position) and ``past_key_values`` (a new ``DynamicCache`` over
    the ORT outputs, no copy), so conversation caching and cropping work on it as on torch's own.
    """

    def __init__(self, session: Any, config: Any) -> None:
        import numpy as np

        self.session = session
        self.config = config
        self.layers, self.kv_heads, self.head_dim = _kv_shape(config)
        self._dtype = np.float16 if "float16" in session.get_inputs()[3].type else np.float32
        self._outputs = [o.name for o in session.get_outputs()]
        self._inputs = {i.name for i in session.get_inputs()}

    def __call__(self, *, input_ids: Any, attention_mask: Any, position_ids: Any = None, past_key_values: Any = None,
                 use_cache: bool = True, logits_to_keep: int | None = None, **_: Any) -> Any:
        import numpy as np
        import torch
        from transformers import DynamicCache

        batch = int(input_ids.shape[0])
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        feed = {
            "input_ids": _np(input_ids, np.int64),
            "attention_mask": _np(attention_mask, np.int64),
            "position_ids": _np(position_ids, np.int64),
        }
        empty = past_key_values is None or past_key_values.get_seq_length() == 0
        for i in range(self.layers):
            if empty:
                k = v = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self._dtype)
            else:
                layer = past_key_values.layers[i]
                k, v = _np(layer.keys, self._dtype), _np(layer.values, self._dtype)
            feed[f"past.{i}.key"], feed[f"past.{i}.value"] = k, v
        outs = self.session.run(self._outputs, feed)
        cache = DynamicCache(config=self.config)
        for i in range(self.layers):
            cache.update(torch.from_numpy(outs[1 + 2 * i]), torch.from_numpy(outs[2 + 2 * i]), i)
        return SimpleNamespace(logits=torch.from_numpy(outs[0]), past_key_values=cache)


class _OrtEncoder:
    """An ORT encoder session behind the call the torch engine's embed path makes."""

    def __init__(self, session: Any, config: Any) -> None:
        self.session = session
        self.config = config

    def __call__(self, *, input_ids: Any, attention_mask: Any, **_: Any) -> Any:
        import numpy as np
        import torch

        (hidden,) = self.session.run(["last_hidden_state"], {"input_ids": _np(input_ids, np.int64),
                                                             "attention_mask": _np(attention_mask, np.int64)})
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))


def _np(tensor: Any, dtype: Any) -> Any:
    import numpy as np

    arr = tensor.detach().cpu().numpy()
    return np.ascontiguousarray(arr, dtype=dtype)
