"""The DeepSpeed engine on its CPU accelerator: in-process with one rank, and tensor parallel over two local ranks
started by the real ``deepspeed`` launcher."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from adapters.base import GenerationRequest, ModelLoadError, ModelSpec, SamplingParams  # noqa: E402
from adapters.deepspeed_engine import DeepSpeedEngine  # noqa: E402
from adapters.parallel import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DIST_SCRIPT = Path(__file__).parent / "dist" / "ds_tp.py"
PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog, and then it runs away",
    "Tell me a story about a small robot",
]


def _greedy(n: int = 12) -> list[GenerationRequest]:
    return [GenerationRequest(p, SamplingParams(max_new_tokens=n)) for p in PROMPTS]


def _shape(results):
    assert all(r.error is None for r in results), [r.error for r in results]
    return [[r.text, r.prompt_tokens, r.completion_tokens, r.finish_reason] for r in results]


@pytest.fixture(scope="module")
def ds_llama(tiny_llama_dir):
    engine = DeepSpeedEngine({"tensor_parallel_size": 1, "replace_with_kernel_inject": False, "dtype": "float32"})
    engine.load(ModelSpec("tiny-llama", str(tiny_llama_dir)))
    yield engine
    engine.close()


def test_single_rank_runs_in_process_and_reports_its_setup(ds_llama):
    status = ds_llama.status()
    assert status["engine"] == "deepspeed"
    assert status["tensor_parallel_size"] == 1 and status["world_size"] == 1
    assert status["accelerator"] in ("cpu", "cuda")
    assert status["communication_backend"] in ("gloo", "ccl", "nccl")
    assert ds_llama.capabilities.tensor_parallel


def test_greedy_matches_torch(ds_llama, torch_llama):
    assert _shape(ds_llama._generate_sync(_greedy())) == _shape(torch_llama._generate_sync(_greedy()))


def test_streaming_and_async_generate(ds_llama, torch_llama):
    (want,) = torch_llama._generate_sync(_greedy()[1:2])

    async def run():
        (got,) = await ds_llama.generate(_greedy()[1:2])
        chunks = [c async for c in ds_llama.generate_stream(_greedy()[1])]
        return got, chunks

    got, chunks = asyncio.run(run())
    assert got.text == want.text
    assert "".join(c.text for c in chunks) == want.text
    assert chunks[-1].completion_tokens == want.completion_tokens


def test_tensor_parallel_without_the_launcher_is_refused_before_loading(tiny_llama_dir):
    engine = DeepSpeedEngine({"tensor_parallel_size": 2})
    with pytest.raises(ModelLoadError, match="deepspeed launcher") as info:
        engine.load(ModelSpec("tiny-llama", str(tiny_llama_dir)))
    assert not info.value.retryable and not engine.loaded


def test_kernel_injection_on_cpu_is_a_clear_load_error(tiny_llama_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("kernel injection is supported with a GPU")
    engine = DeepSpeedEngine({"replace_with_kernel_inject": True})
    with pytest.raises(ModelLoadError, match="kernel_inject"):
        engine.load(ModelSpec("tiny-llama", str(tiny_llama_dir)))


def test_missing_model_is_a_clear_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        DeepSpeedEngine({}).load(ModelSpec("ghost", str(tmp_path / "nowhere")))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_tensor_parallel_two_local_ranks_give_the_single_rank_output(tiny_llama_dir, torch_llama, tmp_path):
    out = tmp_path / "tp2.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(DIST_SCRIPT), "--model", str(tiny_llama_dir), "--out", str(out),
           "--max-new-tokens", "12"]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    # The first run on a machine compiles DeepSpeed's shared-memory op (~1 min) into TORCH_EXTENSIONS_DIR.
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["status"]["tensor_parallel_size"] == 2 and payload["status"]["world_size"] == 2
    assert payload["results"] == _shape(torch_llama._generate_sync(_greedy()))
