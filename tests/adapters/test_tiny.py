"""The tiny models: deterministic builds that load back through the real loading code."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from adapters import tiny  # noqa: E402


def test_fixture_models_load_back(tiny_llama_dir, tiny_gpt2_dir):
    from transformers import AutoConfig, AutoTokenizer

    for path, model_type in ((tiny_llama_dir, "llama"), (tiny_gpt2_dir, "gpt2")):
        assert AutoConfig.from_pretrained(path).model_type == model_type
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.padding_side == "left" and tok.pad_token == "<pad>"
        assert tok("hello").input_ids[0] == tok.bos_token_id
        assert json.loads((path / "muai-tiny.json").read_text())["kind"] == f"tiny-{model_type}"


def test_same_seed_same_bytes(tmp_path, tiny_llama_dir):
    again = tiny.build_tiny_model("tiny-llama", tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny_llama_dir / "model.safetensors").read_bytes()


def test_resolve_builtin_paths(tmp_path, minilm_dir):
    assert tiny.resolve_model_path("/some/dir") == "/some/dir"
    assert tiny.resolve_model_path("builtin:all-minilm-l6-v2") == str(minilm_dir)
    with pytest.raises(FileNotFoundError, match="builtins: tiny-llama, tiny-gpt2, bench-llama, all-minilm-l6-v2"):
        tiny.resolve_model_path("builtin:gpt-5")
    with pytest.raises(ValueError, match="unknown tiny model"):
        tiny.build_tiny_model("tiny-bert", tmp_path / "x")


def test_bench_model_is_llama_shaped_and_about_100m_parameters():
    # Its config only: building it writes 340 MB, too much for a test. On the meta device nothing is allocated.
    import torch
    import transformers

    ids = {"bos": 1, "eos": 2, "pad": 0}
    config = tiny._model_config("bench-llama", transformers, 512, ids)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 12, 768)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    assert 70e6 < params < 130e6
    assert "bench-llama" in tiny.builtin_names() and "bench-llama" not in tiny.TINY_GENERATORS
