#!/usr/bin/env bash
# Every GPU check of the project in one call (about 6 minutes on an H100/H200): the fast path's correctness
# (bench/gpu_correctness.py), then the throughput benchmark (bench/throughput.py --device cuda).
#
# Prepare once, here (copies what the GPU machine lacks, the jsonargparse wheels, the corpus and MiniMind's
# tokenizer, into the git-ignored folder .carry/, about 3 MB):
#     bash bench/gpu_check.sh --prepare
# Then run it through the device tool: command "bash bench/gpu_check.sh", carry [".carry"], timeout_s 560.
# Writes $OUT/gpu.txt, $OUT/correctness.json, $OUT/throughput.json; the throughput table is printed last.
# Record every figure, the card and the date in bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  grep -qx '/.carry/' .git/info/exclude || echo '/.carry/' >> .git/info/exclude
  mkdir -p .carry/wheels .carry/shared
  cp ../shared/wheels/*.whl .carry/wheels/
  cp -r ../shared/corpus ../shared/minimind .carry/shared/
  du -sh .carry
  exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout 170 python3 bench/gpu_correctness.py --out "$OUT/correctness.json" 2>"$OUT/correctness.log" \
  || echo "gpu_correctness.py: exit $? (see correctness.log)"
timeout 360 python3 bench/throughput.py --device cuda --corpus .carry/shared/corpus \
  --tokenizer .carry/shared/minimind --cache_dir /tmp/bench-cache --out "$OUT/throughput.json" \
  2>"$OUT/throughput.log" || echo "throughput.py: exit $? (see throughput.log)"
