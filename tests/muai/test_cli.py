import os
import subprocess
import sys
from pathlib import Path

import pytest

from muai.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MUAI_") or "__" not in k}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "muai", *args], capture_output=True, text=True, env=full_env,
                          cwd=ROOT, timeout=120)


def test_config_check_names_bad_env_key():
    result = run_cli("config", "check", env={"MUAI_SERVER__PORT": "notaport"})
    assert result.returncode != 0
    assert "server.port" in result.stderr and "notaport" in result.stderr and "MUAI_SERVER__PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_refuses_misspelt_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("telemetry:\n  tracing:\n    sampling_ration: 0.5\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode == 2
    assert "did you mean 'sampling_ratio'" in result.stderr


def test_config_check_prints_effective_config_with_env_override():
    result = run_cli("config", "check", env={"MUAI_SERVER__PORT": "8123"})
    assert result.returncode == 0, result.stderr
    assert "port: 8123" in result.stdout


def test_config_show_profile():
    result = run_cli("config", "show", "--profile", "multi-gpu")
    assert result.returncode == 0, result.stderr
    assert "tensor_parallel_size: 2" in result.stdout


@pytest.mark.parametrize("command", [[], ["serve"], ["sidecar"], ["up"], ["config", "check"], ["models", "make-tiny"], ["bench"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: muai" in capsys.readouterr().out


def test_bench_list_and_unknown(capsys):
    assert main(["bench", "--list"]) == 0
    assert "kv_cache" in capsys.readouterr().out
    assert main(["bench", "nope"]) == 2


def test_make_tiny_builds_loadable_models(tmp_path):
    result = run_cli("models", "make-tiny", str(tmp_path))
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("tiny-llama", "tiny-gpt2"):
        tok = AutoTokenizer.from_pretrained(tmp_path / name)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert tok.padding_side == "left" and tok.pad_token is not None
        assert model.config.hidden_size == 128


def test_make_tiny_is_deterministic(tmp_path):
    from adapters.tiny import build_tiny_model

    a = build_tiny_model("tiny-llama", tmp_path / "a", seed=7)
    b = build_tiny_model("tiny-llama", tmp_path / "b", seed=7)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
