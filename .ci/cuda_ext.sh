#!/usr/bin/env bash
# CI: build the whole extension (C++ CPU ops + CUDA ops) against a CUDA build of torch, on a
# machine without a GPU: compile, link, load, every ssam::* op has a CUDA and a CPU kernel, the
# planned cuSPARSELt ops open the cuSPARSELt that torch's wheel brings and bind every function,
# no unresolved symbol (ldd -r), the build tests and the extension's CPU tests pass under that
# torch, and the CPU-only fallback of setup.py works when the CUDA part fails to compile.
# Runs in a throw-away venv on a copy of the tree, so the main install is untouched.
# Usage, from the repository root: bash .ci/cuda_ext.sh  (CUDA_TORCH overrides the torch pin)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
torch_req=${CUDA_TORCH:-torch==2.14.1}  # the newest CUDA build of torch this machine kind serves
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { echo "ci/cuda_ext: $* ($((SECONDS - t0)) s so far)"; }
t0=$SECONDS

python3 -m venv "$work/venv"
py=$work/venv/bin/python
"$py" -m pip install -q "$torch_req" pytest ninja numpy
step "installed $("$py" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"

# the tree as it is (committed or not), without build outputs
tar -C "$root" --exclude=./build --exclude='*.so' --exclude=./.git -cf - . | tar -C "$work" --one-top-level=src -xf -
src=$work/src
t=$SECONDS
(cd "$src" && SSAM_BUILD_EXT=1 "$py" -m pip install -q --no-deps --no-build-isolation -e .)
step "built the CUDA extension in $((SECONDS - t)) s"

so=$(ls "$src"/ssam_kernels/_C*.so)
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
libs=$(find "$site/torch/lib" "$site/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)
# the extension must ask for no more than the CPU-buildable torch headers promise: c10, torch_cpu, cudart
LD_LIBRARY_PATH=$libs ldd -r "$so" > "$work/ldd.txt" 2>&1
if grep -E 'undefined symbol|not found' "$work/ldd.txt"; then
  echo "ci/cuda_ext: $so has unresolved dependencies" >&2
  exit 1
fi
readelf -d "$so" | grep -q 'NEEDED.*libcudart' || { echo "ci/cuda_ext: $so does not link the CUDA runtime" >&2; exit 1; }

check_ops() {  # $1: "cuda" (the full build) or "cpu-only" (the fallback)
  (cd "$work" && "$py" - "$1" <<'EOF'
import sys

import torch

from ssam_kernels._backend import extension_error

expect = sys.argv[1]
assert extension_error() is None, extension_error()
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ssam::"))
assert len(ops) >= 8, ops
for op in ops:
    cpu = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    assert cpu, f"{op} has no CPU kernel"
    assert cuda == (expect == "cuda"), f"{op}: CUDA kernel {'missing' if expect == 'cuda' else 'present'}"
print(f"ci/cuda_ext: {len(ops)} ssam ops load under torch {torch.__version__}, each with a CPU kernel "
      f"and {'a' if expect == 'cuda' else 'no'} CUDA kernel")
# the planned cuSPARSELt ops: CUDA kernels, and cuSPARSELt opened and every function bound
# (dlopen needs no GPU: this is the library a GPU machine runs)
cslt = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ssam_cslt::"))
if expect == "cuda":
    from ssam_kernels.sparse_gemm import planned_unavailable

    assert cslt == ["ssam_cslt::compress", "ssam_cslt::load", "ssam_cslt::mm", "ssam_cslt::search"], cslt
    for op in ("compress", "mm", "search"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ssam_cslt::{op}", "CUDA"), op
    assert planned_unavailable() is None, planned_unavailable()
    print("ci/cuda_ext: planned cuSPARSELt", ".".join(map(str, torch.ops.ssam_cslt.load(""))), "opened and bound")
else:
    assert not cslt, cslt
EOF
  )
}
check_ops cuda

t=$SECONDS
(cd "$src" && SSAM_BUILD_EXT=1 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda_build.py tests/test_ext.py)
step "build and extension tests under the CUDA torch in $((SECONDS - t)) s"

# setup.py's fallback: the CUDA part fails to compile -> the C++ CPU ops alone, linked without CUDA
rm -rf "$src/build" "$so"
t=$SECONDS
# (SSAM_BUILD_EXT unset: a required build, as CI asks for elsewhere, would fail instead of falling back)
(cd "$src" && SSAM_BUILD_EXT= NVCC_APPEND_FLAGS=--no-such-nvcc-flag "$py" -m pip install -v --no-deps --no-build-isolation -e . \
  > "$work/fallback.log" 2>&1) || { tail -n 40 "$work/fallback.log"; exit 1; }
grep -q 'retrying with the C++ CPU ops only' "$work/fallback.log" \
  || { tail -n 40 "$work/fallback.log"; echo "ci/cuda_ext: the CUDA part did not fail as forced" >&2; exit 1; }
so=$(ls "$src"/ssam_kernels/_C*.so)
if readelf -d "$so" | grep -E 'NEEDED.*(libcudart|libc10_cuda|libtorch_cuda)'; then
  echo "ci/cuda_ext: the CPU-only fallback still links CUDA libraries" >&2
  exit 1
fi
check_ops cpu-only
step "the CPU-only fallback built and loaded in $((SECONDS - t)) s"
