#!/usr/bin/env bash
# Everything that needs a GPU, in one go: build with the CUDA extension (failing loudly if it
# does not build), run the cuda and interpret test tiers, and run ssam-bench (its result files
# land in benchmarks/results/<device>/, to be committed; plots can be drawn later with
# `ssam-bench plot`, since the GPU machines lack matplotlib). Usage, from the repository root:
#   bash benchmarks/gpu_check.sh [LOG_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-/tmp/ssam-gpu-check}
mkdir -p "$log"
status=0
run() {  # run a step, keep its log, remember a failure but go on
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@" > "$log/$name.log" 2>&1; then status=1; echo "   FAILED (see $log/$name.log)"; fi
  tail -n 3 "$log/$name.log"
}
export PYTHONUNBUFFERED=1
run build env SSAM_BUILD_EXT=1 python3 -m pip install --no-deps --no-build-isolation -e .
run cuda-tests python3 -m pytest -m cuda -rs tests
run interpret-tests env TRITON_INTERPRET=1 python3 -m pytest -m interpret -q tests
run ssam-bench ssam-bench
run bench-perturb-bf16 python3 -m ssam_bench.bench_perturb --dtype bfloat16 --out "benchmarks/results/$(python3 -c 'import torch; from ssam_bench.common import device_slug; print(device_slug(torch.device("cuda")))')/bf16"
exit $status
