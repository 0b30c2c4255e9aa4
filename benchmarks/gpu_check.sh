#!/usr/bin/env bash
# The GPU work, in parts that each fit one device slot (a command may run 10 minutes; each part
# is bounded at 8 minutes by the timeouts of its steps). Every part builds the extension first
# (about 40 s on an H200, SSAM_BUILD_EXT=1, sm_90: it fails loudly if the build fails), then runs its
# steps, each under its own `timeout`, logging to LOG_DIR/<step>.log. Results land in
# benchmarks/results/<device>/ (step rows merge by model, so the step parts add up to one
# table) and are packed into LOG_DIR/results.tgz after every step (a run the device's time limit
# cuts short still brings back what it measured), to bring back and commit (a device
# run returns at most 8 files: one log per step and one archive stay within that in every part
# but `all`, whose logs a machine without a time limit keeps).
# The whole part runs within GPU_CHECK_BUDGET_S (default 480): a step gets at most what is left,
# and an optional step (`first`'s last ones) runs only where its whole timeout is left. Each part's
# required steps' declared timeouts, the build's included, fit 480 s on their own (the tests check).
# A device session with less than a part's 480 s plus the machine's start left: set
# GPU_CHECK_BUDGET_S to the device time left less about 60 s.
#
# Usage, from the repository root:  bash benchmarks/gpu_check.sh PART LOG_DIR
#                                    bash benchmarks/gpu_check.sh --help
# GPU_CHECK_DRY_RUN=1 prints each step with its timeout (and the one it declares) instead of running
# it (the tests sum them).
# A copy without .git (the device machine's) stamps results "unknown": name the commit with
# SSAM_COMMIT=<stamp> in the command that starts the run: what `python3 benchmarks/stamp.py` prints in
# the checkout the copy is made from (the hash, "-dirty" where tracked code has uncommitted changes,
# which the copy carries), written out (a $(...) in that command runs on the copy, where it finds no
# repository). Each part prints its stamp first, with a warning where it is "unknown".
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
usage: bash benchmarks/gpu_check.sh PART LOG_DIR

Each part builds the extension for sm_90 and prints `ssam_kernels.backend_info("cuda")` (timeout
120 s; the build took 32-44 s on an H200), then:

  build          nothing more
  first          a first look at everything in one slot, for a session with one GPU call: the cuda
                 tier (timeout 140 s), the 2:4 GEMM table cut at 60 s (it writes as it goes, bf16
                 MLP shapes first: its timeout is planned, not a failure, and keeps its rows), the optimizer
                 overhead on the ResNet-18 and GPT-2 small lists (60 s: SAM and SSAM, each kernel
                 backend), and SAM / SSAM-F at 50% and 90%, dense and exact, on ResNet-18 CIFAR,
                 each step eager and replayed from a CUDA graph (90 s, as step-graphs; with the
                 build's 120 s, 470 s of the part's 480); then, each where its whole timeout is
                 left, the perturbation cycle on the GPT-2-medium list (60 s) and SAM / SSAM-F on
                 GPT-2 small 8k (110 s). Its rows merge into the results files (by model and contender, by shape
                 for the GEMM table, by list for the perturbation table), replacing only those it
                 measured; `all` leaves it out (the other parts cover it)
  tests          the cuda test tier, pytest -n 8 (timeout 160 s; 49 s measured on an H200 before the
                 training recipes of tests/test_cuda_recipes.py came), and its kernel tests (marked
                 memcheck) under compute-sanitizer's memcheck (timeout 200 s; 4 of them took 7.6 s
                 at 4344f0b, 48 are marked now, CUDA graph captures among them). compute-sanitizer
                 refuses the GPU of a gVisor machine (nvidia-h200 was one): run this part on
                 nvidia-h100-x1
  step-resnet18  ssam-bench step on ResNet-18 CIFAR b128: every optimizer, sparsity and mode
                 (timeout 320 s; 15 of these contenders took 31 s on an H200)
  step-large     ssam-bench step on WRN-28-10, ViT-S/16 and GPT-2 small 8k, one command each (timeout
                 110 s each, so a slow model costs only its own rows): SGD, SAM, SSAM-F at 50% and
                 90%, dense and exact, budget masks (8 contenders a model with SGD; the three took 129 s)
  step-large-d   the same for SSAM-D (SGD and SAM again: the ratios come from one process)
  step-graphs    step-large's contenders on ResNet-18 CIFAR, WRN-28-10 and ViT-S/16, each timed eager
                 and replayed from a CUDA graph of the whole step (--graphs eager captured: the GPU's
                 time without the host's launches), one command each (timeout 90 s for ResNet-18, 130 s
                 for the others: twice their step-large time, about 43 s, and the captures)
  step-24        ssam-bench step on GPT-2 small 8k at 2:4, every ascent mode (timeout 320 s; did not
                 finish in 50 s on an H200 at 4344f0b)
  sparse24       the 2:4 sparse GEMMs alone: their cuda tests (the planned cuSPARSELt path included;
                 timeout 90 s) and the ascent-backward GEMM table, bench_ascent_linear (timeout 240 s;
                 not timed alone yet; it writes its rows after each shape, bf16 MLP shapes first, so
                 a timeout keeps what it measured)
  ops            the perturbation cycle on every parameter list (timeout 90 s, first: issue 22's
                 table), ssam-bench ops (every other op and top-k; the 2:4 GEMM table is sparse24's;
                 timeout 150 s) and ssam-bench overhead on the ResNet-18 and GPT-2 small lists
                 (timeout 120 s; about 40 s measured)
  masks          ssam-bench masks on ResNet-18 CIFAR and GPT-2 small 2k, one command each (timeout
                 160 s each; ResNet-18 took 31 s, GPT-2 did not finish in 30 s at 4344f0b)
  profile        where the step time goes (torch.profiler, profile_step): SGD, SAM, SSAM-F 50% dense /
                 exact / exact budget, 90% exact budget on ResNet-18 CIFAR and WRN-28-10 (timeout
                 300 s; not timed yet); the text is the log

The 2:4 benchmarks (sparse24's table, step-24) run again with SSAM_CUSPARSELT_PLANNED=0 (torch's
cuSPARSELt path only) if they crash, inside the same timeout; the step is reported FAILED even when
the rerun succeeds (exit 3; its log says CRASH). A step that times out is reported
FAILED with its log; the part goes on with its other steps and exits non-zero. `all` runs every
part in turn (for a machine without a time limit).
EOF
}

parts="build first tests step-resnet18 step-large step-large-d step-graphs step-24 sparse24 ops masks profile"
if [ "$#" -ne 2 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  usage
  [ "$#" -eq 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; } && exit 0
  exit 2
fi
part=$1
log=$2
case " $parts all " in
  *" $part "*) ;;
  *) echo "gpu_check: unknown part '$part'; one of: $parts all" >&2; exit 2 ;;
esac
mkdir -p "$log"
export PYTHONUNBUFFERED=1
# the CPU-side reference steps of pytest -n 8 workers: 16 cores, not 8 x 16 threads (on pytest's
# command lines only: the benchmarks' CPU-side official baselines keep every core)
pytest="env OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python3 -m pytest"
bench="python3 -m ssam_bench.cli"  # (not the console script: its folder may not be on PATH)
# a hung test fails alone instead of taking its whole step (pytest-timeout, in the device image)
per_test_timeout=$(python3 -c 'import pytest_timeout' 2>/dev/null && echo "--timeout 60")
status=0
optional=""  # set for an optional step's own line
budget=${GPU_CHECK_BUDGET_S:-480}
[ "$part" = all ] && budget=${GPU_CHECK_BUDGET_S:-86400}  # (a machine without a time limit)
spent=0  # a dry run's: each step as if it ran to its timeout
left() { if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then echo $((budget - spent)); else echo $((budget - SECONDS)); fi; }

step() {  # step NAME TIMEOUT_S COMMAND...: run under a timeout, keep its log, go on after a failure
  local name=$1 limit=$2 declared=$2 start=$SECONDS rc left
  shift 2
  left=$(left)
  if [ "$left" -lt 20 ]; then
    echo "== $name SKIPPED: ${left} s of the part's ${budget} s left"
    status=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  # the declared limit too: one capped by the time left shows (the tests check required steps are not)
  echo "== $name (timeout ${limit} s of ${declared} s declared${optional:+, optional}): $*"
  if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then spent=$((spent + limit)); return; fi
  timeout --kill-after=10 "$limit" "$@" > "$log/$name.log" 2>&1
  rc=$?
  if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ -n "${until_limit:-}" ]; then
    echo "   stopped at its time limit, as planned (its rows so far are written)"
  elif [ "$rc" -ne 0 ]; then
    status=1
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "   FAILED: timed out"; else echo "   FAILED: exit $rc"; fi
    echo "   (see $log/$name.log)"
  fi
  echo "   took $((SECONDS - start)) s"
  tail -n 3 "$log/$name.log"
  pack  # after every step: a run cut short (the device's time spent) still brings back what it measured
}

device=""  # the results folder's name, found once the build has made torch importable
pack() {  # one file: a device run returns at most 8 (unpack with tar xzf into benchmarks/results/)
  [ -n "${GPU_CHECK_DRY_RUN:-}" ] && return
  [ -z "$device" ] && device=$(python3 -c 'import torch; from ssam_bench.common import device_slug; print(device_slug(torch.device("cuda")))' 2>/dev/null)
  if [ -n "$device" ] && [ -d "benchmarks/results/$device" ]; then
    tar czf "$log/results.tgz" -C benchmarks/results "$device"
  fi
}

optional_step() {  # as step, where its whole timeout is left (else a note, not a failure): a step cut
  local left      # short would spend device time and, writing at its end, keep nothing
  left=$(left)
  if [ "$left" -lt "$2" ]; then
    echo "== $1 not run: ${left} s of the part's ${budget} s left (optional)"
    return
  fi
  optional=1 step "$@"
}

# run a command; if it dies by a signal (a crash, e.g. in the planned cuSPARSELt path, not yet run
# on a GPU) or fails with a CUDA error or a cuSPARSELt failure in its output (a sticky CUDA error
# ends the process with exit 1), say so and run it again on torch's cuSPARSELt path only, so its
# table still lands; the step fails either way (exit 3 when the rerun succeeds), so the crash is
# not hidden
unplanned_after_crash() {
  local out rc
  out=$(mktemp)
  "$@" 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  if { [ "$rc" -gt 128 ] && [ "$rc" -ne 137 ]; } ||
     { [ "$rc" -ne 0 ] && grep -qE "CUDA error|illegal memory access|cuSPARSELt .* failed" "$out"; }; then
    echo "gpu_check: CRASH: exit $rc; again with SSAM_CUSPARSELT_PLANNED=0"
    SSAM_CUSPARSELT_PLANNED=0 "$@" && rc=3 || rc=$?
  fi
  rm -f "$out"
  return $rc
}
export -f unplanned_after_crash

build() {
  # sm_90 only, 16 jobs: the configuration the H200 build was timed in (the default also builds sm_80);
  # then what runs where, in the same log (a device run returns at most 8 files)
  step build 120 bash -c 'SSAM_BUILD_EXT=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    python3 -m pip install --no-deps --no-build-isolation -e . &&
    python3 -c "import pprint, ssam_kernels; pprint.pprint(ssam_kernels.backend_info(\"cuda\"))"'
}

run_part() {
  case $1 in
    build) ;;
    first)
      step first-cuda-tests 140 $pytest -m cuda -rfEs -v --durations=15 -n 8 $per_test_timeout \
        -p no:cacheprovider tests
      until_limit=1 step first-ascent-linear 60 bash -c 'unplanned_after_crash "$@"' _ \
        python3 -m ssam_bench.bench_ascent_linear
      step first-overhead 60 $bench overhead --overhead-models resnet18_cifar gpt2_small_2k
      step first-step-resnet18 90 $bench step --models resnet18_cifar --optimizers sam ssam-f --sparsities 0.5 0.9 \
        --modes dense exact --graphs eager captured
      optional_step first-perturb 60 python3 -m ssam_bench.bench_perturb --lists gpt2-medium-355M
      optional_step first-step-gpt2 110 $bench step --models gpt2_small_8k --optimizers sam ssam-f \
        --sparsities 0.5 0.9 --modes dense exact ;;
    tests)
      step cuda-tests 160 $pytest -m cuda -rfEs -v --durations=15 -n 8 $per_test_timeout -p no:cacheprovider tests
      step memcheck 200 compute-sanitizer --tool memcheck --error-exitcode 1 \
        $pytest -m "cuda and memcheck" -rfEs -v -p no:cacheprovider tests
      if grep -q "Device not supported" "$log/memcheck.log" 2>/dev/null; then
        echo "   memcheck: compute-sanitizer cannot use this machine's GPU (it refuses it under gVisor); run" \
          "this part on a Firecracker machine (nvidia-h100-x1 ran it on 2026-11-04)"
      fi ;;
    step-resnet18)
      step step-resnet18 320 $bench step --models resnet18_cifar ;;
    step-large|step-large-d)  # one command per model: each writes its rows (merged by model and contender)
      optimizer=ssam-f
      [ "$1" = step-large-d ] && optimizer=ssam-d
      for model in wrn28_10 vit_s16 gpt2_small_8k; do
        step "$1-$model" 110 $bench step --models "$model" --optimizers sam $optimizer --sparsities 0.5 0.9 \
          --modes dense exact
      done ;;
    step-graphs)
      for model in resnet18_cifar wrn28_10 vit_s16; do
        limit=130
        [ "$model" = resnet18_cifar ] && limit=90
        step "step-graphs-$model" $limit $bench step --models "$model" --optimizers sam ssam-f --sparsities 0.5 0.9 \
          --modes dense exact --graphs eager captured
      done ;;
    step-24)
      step step-24 320 bash -c 'unplanned_after_crash "$@"' _ \
        $bench step --models gpt2_small_8k --optimizers ssam-f --sparsities 2:4 ;;
    sparse24)
      step sparse24-tests 90 $pytest -m cuda -rfEs -q -p no:cacheprovider tests/test_ascent_linear.py
      step ascent-linear 240 bash -c 'unplanned_after_crash "$@"' _ python3 -m ssam_bench.bench_ascent_linear ;;
    ops)
      step perturb 90 python3 -m ssam_bench.bench_perturb
      step ops 150 $bench ops --skip ascent_linear perturb
      step overhead 120 $bench overhead --overhead-models resnet18_cifar gpt2_small_2k ;;
    masks)
      for model in resnet18_cifar gpt2_small_2k; do  # one command each: rows merge by model
        step "masks-$model" 160 $bench masks --mask-models "$model"
      done ;;
    profile)
      step profile 300 python3 -m ssam_bench.profile_step --models resnet18_cifar wrn28_10 ;;
  esac
}

# the commit the results will be stamped with (benchmarks/stamp.py: ssam_bench's rule, without torch)
stamp=$(python3 benchmarks/stamp.py 2>/dev/null)
stamp=${stamp:-unknown}
say_stamp() {  # say_stamp PART: at the start of each part
  echo "== $1: results stamped commit $stamp"
  if [ "$stamp" = unknown ]; then
    echo "!!!!!!!!!! WARNING: results of this run will be stamped commit \"unknown\" (no .git here and SSAM_COMMIT"
    echo "!!!!!!!!!! unset): start the run with SSAM_COMMIT=<stamp> in its command, written out as"
    echo "!!!!!!!!!! \`python3 benchmarks/stamp.py\` prints it in the checkout the copy came from (a \$(...) runs"
    echo "!!!!!!!!!! where the command runs: on a copy without .git, nothing)"
  fi
}

if [ "$part" = all ]; then
  say_stamp all
  build
  for p in $parts; do [ "$p" = first ] || { say_stamp "$p"; run_part "$p"; }; done  # `first` is a subset of the others
else
  say_stamp "$part"
  build
  run_part "$part"
fi

[ -n "${GPU_CHECK_DRY_RUN:-}" ] && exit 0
pack
if [ -n "$device" ] && [ -f "$log/results.tgz" ]; then
  echo "== results packed into $log/results.tgz ($device/: $(ls "benchmarks/results/$device" | wc -l) files)"
fi
exit $status
