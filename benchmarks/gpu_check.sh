#!/usr/bin/env bash
# Every GPU check in one call (one CUDA machine, under 8 minutes): the `gpu` tests, then the GPU
# benchmarks. Rows go to results/benchmarks/gpu_*.jsonl (one JSON object per line).
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: no CUDA device here; nothing to check" >&2; exit 2; }
out=results/benchmarks
mkdir -p "$out"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
start=$(date +%s)
row() {  # name, exit code, seconds, log file
  python - "$@" <<'PY'
import json, sys
name, code, seconds, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tail = open(log, errors="replace").read().strip().splitlines()[-3:]
print(json.dumps({"check": name, "exit_code": code, "seconds": seconds, "tail": tail}))
PY
}
run() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  local log; log=$(mktemp)
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" >"$log" 2>&1
  local code=$?
  cat "$log"
  row "$name" "$code" "$(( $(date +%s) - t0 ))" "$log" | sed "s/^{/{\"commit\": \"$commit\", /" >>"$out/gpu_check.jsonl"
  grep -h '^{' "$log" | sed "s/^{/{\"check\": \"$name\", /" >>"$out/gpu_${name}.jsonl" || true
}
run tests 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rA
run microadam 90 python benchmarks/gpu_microadam.py --steps 20
run cifar10_step 120 python benchmarks/gpu_cifar10_step.py
echo "gpu_check: done in $(( $(date +%s) - start )) s; rows in $out/gpu_*.jsonl" >&2
