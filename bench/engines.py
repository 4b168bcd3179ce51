"""Engines side by side in one run: ONNX Runtime vs PyTorch, and our torch engine vs plain transformers.

Same model (``builtin:tiny-llama`` by default), same prompts, greedy, ``--new-tokens`` per request, in one process:

- ``ort_vs_torch_b1``: requests one at a time (``--b1-requests`` of them), torch engine time / ONNX Runtime
  engine time (above 1: ORT is faster); the torch engine as it serves by default (on bench-llama its linear layers
  packed for oneDNN, ``engines.torch.packed_linear``; the tiny models are below the size where packing pays);
- ``ort_vs_torch_b16``: one left-padded batch of 16 requests, the same ratio;
- ``disabled_vs_plain_transformers``: our torch engine with every optimisation off (no conversation cache, no
  batching: one request per call, no packed linear layers) against a plain ``model.generate`` loop over the same
  prompts: plain time / engine time. Goal ``>= 0.98``: turning the optimisations off costs nothing against plain
  transformers.

Each path is warmed up, then timed ``--repeats`` times, interleaved (so drift in machine load hits every path
alike); each figure is the median. The completions of all paths are checked to be identical.

Prints one JSON line ``{"bench": "engines", "figures", "ratios", "goals"}`` and writes
``bench/results/engines.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench._report import add_output_args, emit

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A model server keeps models loaded and answers requests.",
    "Operators watch latency, throughput, error rates and memory on dashboards.",
    "Requests wait in a bounded queue; when it is full the server says so.",
    "Batching groups compatible requests so one forward pass serves many.",
    "Tell me a story about a small robot who learned to count the stars.",
    "What is the weather like? It is sunny and warm, with a light breeze.",
    "Numbers one two three four five six seven eight nine ten eleven twelve.",
]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muai bench engines", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:tiny-llama", help="model path (default: builtin:tiny-llama)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--batch", type=int, default=16, help="batch size of the batched comparison (default 16)")
    p.add_argument("--b1-requests", type=int, default=4, help="requests per round, one at a time (default 4)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds; figures are medians (default 7)")
    p.add_argument("--threads", type=int, default=None, help="torch and ORT intra-op threads (default: theirs)")
    p.add_argument("--onnx-cache-dir", default=None, help="converted models (default: $MUAI_CACHE_DIR/onnx)")
    add_output_args(p, strict=False)
    return p.parse_args(argv)


def _prompts(n: int) -> list[str]:
    """``n`` distinct prompts of similar length (so padding is small and the same for every engine)."""
    return [f"{_SENTENCES[i % len(_SENTENCES)]} {_SENTENCES[(i * 3 + 1) % len(_SENTENCES)]} ({i})" for i in range(n)]


def _median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


def _time(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from adapters import _hf
    from adapters.base import GenerationRequest, ModelSpec, SamplingParams
    from adapters.onnx_engine import OnnxEngine
    from adapters.tiny import resolve_model_path
    from adapters.torch_engine import TorchEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    spec = ModelSpec("bench", path, device="cpu")
    sp = SamplingParams(max_new_tokens=args.new_tokens)
    batch = [GenerationRequest(p, sp) for p in _prompts(args.batch)]
    singles = batch[: args.b1_requests]

    torch_engine = TorchEngine({})  # as it serves by default, one request per call
    torch_engine.load(spec)
    plain_engine = TorchEngine({"packed_linear": False})  # every optimisation off: no kv_cache option either
    plain_engine.load(spec)
    ort_settings: dict[str, Any] = {"providers": ["CPUExecutionProvider"]}
    if args.onnx_cache_dir:
        ort_settings["cache_dir"] = args.onnx_cache_dir
    if args.threads:
        ort_settings["intra_op_threads"] = args.threads
    ort_engine = OnnxEngine(ort_settings)
    ort_load_s, _ = _time(lambda: ort_engine.load(spec))
    ort_status = ort_engine.status()

    tok = _hf.load_tokenizer(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path).eval()

    def texts(results: list[Any]) -> list[str]:
        for r in results:
            if r.error is not None:
                raise r.error
        return [r.text for r in results]

    def engine_b1(engine: Any) -> Callable[[], list[str]]:
        return lambda: [texts(engine._generate_sync([r]))[0] for r in singles]

    def engine_batch(engine: Any) -> Callable[[], list[str]]:
        return lambda: texts(engine._generate_sync(batch))

    def plain_generate() -> list[str]:
        out = []
        with torch.inference_mode():
            for r in singles:
                enc = tok(r.prompt, return_tensors="pt")
                ids = hf_model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False,
                                        pad_token_id=tok.pad_token_id)
                out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return out

    paths: dict[str, Callable[[], list[str]]] = {
        "torch_b1": engine_b1(torch_engine),
        "ort_b1": engine_b1(ort_engine),
        "torch_b16": engine_batch(torch_engine),
        "disabled_b1": engine_b1(plain_engine),
        "ort_b16": engine_batch(ort_engine),
        "plain_transformers_b1": plain_generate,
    }
    try:
        outputs = {}
        for name, fn in paths.items():  # warm-up, and the outputs to compare
            fn()
            outputs[name] = fn()
        times: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(args.repeats):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for name in order:
                elapsed, _ = _time(paths[name])
                times[name].append(elapsed)
    finally:
        ort_engine.close()
        torch_engine.close()
        plain_engine.close()

    identical = (
        outputs["torch_b1"] == outputs["ort_b1"] == outputs["disabled_b1"] == outputs["plain_transformers_b1"]
        and outputs["torch_b16"] == outputs["ort_b16"]
        and outputs["torch_b16"][: len(singles)] == outputs["torch_b1"]
    )
    med = {name: statistics.median(ts) for name, ts in times.items()}
    figures = {
        "model": args.model,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "b1_requests": args.b1_requests,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "ort_provider": ort_status.get("provider"),
        "ort_load_seconds": round(ort_load_s, 3),
        "ort_conversion_cached": ort_status.get("cache_hit"),
        "ort_validation_max_abs_diff": ort_status.get("validation_max_abs_diff"),
        **{f"{name}_ms": _median_ms(ts) for name, ts in times.items()},
        "outputs_identical": identical,
        "ratio_definition": "ort_vs_torch_bN: torch engine time / ONNX Runtime engine time (same requests); "
                            "disabled_vs_plain_transformers: plain model.generate time / torch engine time with "
                            "every optimisation off (above 1: faster than plain); torch_vs_plain_transformers: the "
                            "same for the torch engine as it serves",
    }
    ratios = {
        "ort_vs_torch_b1": round(med["torch_b1"] / med["ort_b1"], 3),
        "ort_vs_torch_b16": round(med["torch_b16"] / med["ort_b16"], 3),
        "disabled_vs_plain_transformers": round(med["plain_transformers_b1"] / med["disabled_b1"], 3),
        "torch_vs_plain_transformers": round(med["plain_transformers_b1"] / med["torch_b1"], 3),
    }
    return {"bench": "engines", "figures": figures, "ratios": ratios,
            "goals": {"disabled_vs_plain_transformers": ">= 0.98"}}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    report = run(args)
    emit(report, args.results_dir)
    return 0 if report["figures"]["outputs_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
