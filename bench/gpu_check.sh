#!/usr/bin/env bash
# The project's GPU checks, one device call each (the device tool allows 10 minutes a call):
#   bash bench/gpu_check.sh speed      the fast path's correctness (bench/gpu_correctness.py), then every
#                                      throughput mode (bench/throughput.py --device cuda); about 6 minutes
#   bash bench/gpu_check.sh scaleout   FSDP and DeepSpeed ZeRO-2/3 for pretrain, LoRA and DPO, each checkpoint
#                                      exported and compared with a single-device run (bench/scaleout_check.py)
#
# Prepare once, here (needs the package registry): copies what the GPU image lacks into the git-ignored folder
# .carry/ (jsonargparse and DeepSpeed with its missing needs as wheels, the corpus, MiniMind's tokenizer):
#     bash bench/gpu_check.sh --prepare
# Then through the device tool: command "bash bench/gpu_check.sh speed", carry [".carry"], timeout_s 560.
# Writes its JSON under $OUT and prints a table last. Record every figure, the card and the date in
# bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  python3 -c "import torch" 2>/dev/null || { echo "activate the project's virtual environment first (DeepSpeed's wheel builds against torch)" >&2; exit 1; }
  grep -qsx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> "$(git rev-parse --git-path info/exclude)"
  rm -rf .carry && mkdir -p .carry/wheels .carry/shared
  cp ../shared/wheels/*.whl .carry/wheels/
  cp -r ../shared/corpus ../shared/minimind .carry/shared/
  # DeepSpeed's ops compile on the GPU machine at run time (nvcc and ninja are there): a pure-Python wheel
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation "deepspeed>=0.15" -w .carry/wheels
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d .carry/wheels hjson pydantic pydantic-core annotated-types typing-inspection
  du -sh .carry
  exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
case "${1:-speed}" in
  speed)
    timeout 170 python3 bench/gpu_correctness.py --out "$OUT/correctness.json" 2>"$OUT/correctness.log" \
      || echo "gpu_correctness.py: exit $? (see correctness.log)"
    timeout 360 python3 bench/throughput.py --device cuda --corpus .carry/shared/corpus \
      --tokenizer .carry/shared/minimind --cache_dir /tmp/bench-cache --out "$OUT/throughput.json" \
      2>"$OUT/throughput.log" || echo "throughput.py: exit $? (see throughput.log)"
    ;;
  scaleout)
    timeout 540 python3 bench/scaleout_check.py --corpus .carry/shared/corpus --tokenizer .carry/shared/minimind \
      --out "$OUT/scaleout.json" 2>"$OUT/scaleout.log" || echo "scaleout_check.py: exit $? (see scaleout.log)"
    ;;
  *) echo "usage: bash bench/gpu_check.sh [--prepare | speed | scaleout]" >&2; exit 2 ;;
esac
