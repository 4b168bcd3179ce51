"""Converting a Hugging Face model to ONNX for the ONNX Runtime engine, and the on-disk cache of conversions.

``torch.onnx.export(..., dynamo=True)``: a causal LM becomes one *decoder graph with past key values*
(``input_ids, attention_mask, position_ids, past.{i}.key/value -> logits, present.{i}.key/value``, eager attention,
logits of the last position only); an encoder becomes ``input_ids, attention_mask -> last_hidden_state``. The
legacy TorchScript exporter is never used: it exports these models without an error but with wrong numbers.
Conversions are cached on disk, keyed by the model files' content and the torch/onnx/onnxscript versions
(``cache_key``), so a restart loads one in well under a second.

onnx, onnxscript and torch are imported only inside functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from adapters import _hf

log = logging.getLogger(__name__)

__all__ = ["GRAPH_FORMAT", "VALIDATION_PROMPTS", "cache_key", "cached_export", "corrupted", "fused", "kv_shape"]

GRAPH_FORMAT = "muai-onnx-1"
"""Bumped whenever the exported graph's inputs/outputs change, so old cache entries are never reused."""
VALIDATION_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world",
    "A model server keeps models loaded and answers requests in order.",
)
_HASH_CHUNK = 1 << 20


def cached_export(root: Path, name: str, path: Path, model: Any, tokenizer: Any, *, task: str,
                  dtype: str) -> tuple[Path, bool, float]:
    """The model's conversion under ``root`` (exported now when not cached): (model.onnx, cache hit, seconds)."""
    key = cache_key(path, task=task, dtype=dtype)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:48] or "model"
    target = root / f"{slug}-{key[:20]}"
    onnx_file = target / "model.onnx"
    if onnx_file.is_file() and (target / "meta.json").is_file():
        log.info("onnxruntime: %s: using cached conversion %s", name, target)
        return onnx_file, True, 0.0
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{slug}-", dir=root))
    try:
        log.info("onnxruntime: %s: exporting with torch.onnx.export(dynamo=True) ...", name)
        started = time.monotonic()
        program = _export(model, task, tokenizer)
        program.save(str(tmp / "model.onnx"))
        elapsed = time.monotonic() - started
        log.info("onnxruntime: %s: exported in %.1fs", name, elapsed)
        meta = {"key": key, "model": name, "path": str(path), "task": task, "dtype": dtype,
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


def fused(onnx_path: Path) -> Path | None:
    """``onnx_path`` with ONNX Runtime's transformer fusions applied (RMS/layer norms and their residual adds become
    one kernel each), cached beside it as ``model.fused.onnx``; None when the optimizer fails (the plain export then
    serves: the fusions are a speed-up, never a requirement).

    A decode step of a small model is a couple of hundred tiny kernels, and ORT pays a fixed cost per kernel, so
    fewer kernels is most of what can be won there: on the tiny Llama one step went from about 150 to 138 us.
    The validation gate checks the fused graph, not the plain one.
    """
    target = onnx_path.with_name("model.fused.onnx")
    if target.is_file():
        return target
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
            # "gpt2" selects the generic fusions (norms, residual adds, GELU); heads/hidden 0 leave attention alone.
            model = optimize_model(str(onnx_path), model_type="gpt2", num_heads=0, hidden_size=0, opt_level=1)
        fd, tmp = tempfile.mkstemp(prefix=".fused-", suffix=".onnx", dir=onnx_path.parent)
        os.close(fd)
        model.save_model_to_file(tmp)
        os.replace(tmp, target)
    except Exception as exc:  # the optimizer raises many types; any of them means "serve the plain export"
        log.warning("onnxruntime: cannot fuse %s (%s); serving the plain export", onnx_path, _hf.first_line(exc))
        return None
    return target


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
def kv_shape(config: Any) -> tuple[int, int, int]:
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

    layers, kv_heads, head_dim = kv_shape(model.config)
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

    enc = _hf.right_pad([_hf.encode(tokenizer, t) for t in VALIDATION_PROMPTS[:2]], tokenizer.pad_token_id or 0)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    return (Encoder(model), (enc[0], enc[1]), ({0: batch, 1: seq}, {0: batch, 1: seq}),
            ["input_ids", "attention_mask"], ["last_hidden_state"])


def corrupted(onnx_path: Path) -> bytes:
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
