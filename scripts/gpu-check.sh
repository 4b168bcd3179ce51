#!/usr/bin/env bash
# The GPU-marked tests, in one run, for whoever has a machine with an NVIDIA GPU for a few minutes:
#   scripts/gpu-check.sh            # installs what the tests need (as `make test` does), then runs `pytest -m gpu`
#   scripts/gpu-check.sh -k nvml    # extra pytest arguments pass through
# What runs: NVML read by the sidecar, the orchestrator's inventory, replicas placed on real GPUs, a real CUDA error
# told as a device fault, and (only with vLLM's CUDA build installed) a vLLM rank pinned to the last GPU.
# It prints what NVML sees first, so a report says which device it ran on. With no GPU the tests skip (and say why);
# the exit status is pytest's, so a skipped-only run exits 0 and a failure exits 1.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/bootstrap.sh test
export XDG_CACHE_HOME="$root/.cache" HF_HOME="$root/.cache/huggingface" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       VLLM_CACHE_ROOT="$root/.cache/vllm" VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 MUAI_CACHE_DIR="$root/.cache/muai"
.venv/bin/python - <<'PY'
try:
    import pynvml

    pynvml.nvmlInit()
    n = pynvml.nvmlDeviceGetCount()
    print(f"[gpu-check] NVML driver {pynvml.nvmlSystemGetDriverVersion()}, {n} GPU(s)")
    for i in range(n):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        print(f"[gpu-check]   {i}: {pynvml.nvmlDeviceGetName(h)} {mem.total / 2**30:.0f} GiB")
except Exception as exc:  # no driver: the tests will skip and say so
    print(f"[gpu-check] NVML sees no GPU here ({exc})")
PY
exec .venv/bin/python -m pytest -q -p no:cacheprovider -m gpu -rs "$@"
