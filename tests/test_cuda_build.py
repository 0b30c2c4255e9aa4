"""Build checks of the extension on machines without a GPU (CI): the torch-free CUDA kernels
compile with plain nvcc for sm_80 and sm_90 (plus PTX) with no stack frame or spill, the tensor
glue compiles warning-free (-Werror) against the installed torch's headers plus the CUDA runtime
headers, and setup.py finds the CUDA toolkit where nvcc is a wrapper script. Nothing runs on a
GPU here; the cuda tier runs the kernels. CI also builds and loads the whole extension against a
CUDA torch wheel (.ci/cuda_ext.sh)."""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_extension

pytestmark = pytest.mark.cpu

ROOT = os.path.join(os.path.dirname(__file__), "..")
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
# torch >= 2.14's headers require C++20 (torch builds extensions with it); older ones accept it
CXX_STD = "-std=c++20"


def _setup_module():
    spec = importlib.util.spec_from_file_location("ssam_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


@needs_nvcc
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))))
def test_kernels_compile_for_sm80_and_sm90_without_stack_or_spills(source, tmp_path):
    cmd = [NVCC, CXX_STD, "-O3", "--fmad=false", "-Xptxas", "-v",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-gencode", "arch=compute_90,code=compute_90",
           "-I", os.path.join(ROOT, "csrc"), "-c", source, "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr.lower(), out.stderr
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", out.stderr)
    assert len(frames) == len(entries) > 0, out.stderr
    assert {arch for _, arch in entries} == {"80", "90"}
    heavy = [(name, arch, f) for (name, arch), f in zip(entries, frames) if f != ("0", "0", "0")]
    assert not heavy, f"kernels with a stack frame or spills (local memory): {heavy}"


def _cuda_include() -> str:
    home, looked = _setup_module().cuda_home()
    if home is None:
        pytest.skip(f"CUDA runtime headers not found (looked in {looked})")
    return os.path.join(home, "include")


@needs_nvcc
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))))
def test_glue_compiles_without_warnings_against_torch_headers(source, tmp_path):
    # a real compile (-O2 -c), not -fsyntax-only: GCC finds dangling pointers to temporaries
    # only while optimising; torch's and CUDA's own headers are system headers here
    system = cpp_extension.include_paths() + [_cuda_include(), sysconfig.get_paths()["include"]]
    cmd = ["g++", CXX_STD, "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", *[f"-isystem{i}" for i in system],
           f"-I{os.path.join(ROOT, 'csrc')}", "-c", source, "-o", str(tmp_path / "glue.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


_LAUNCH_TABLE_HARNESS = r"""
#include <cstdio>
#include "cuda/launch_table.h"
// stdin: chunk, then cases of "T C numel[T] column values[C*T]"; stdout per case: chunks, key, content
int main() {
  long long chunk, t, c;
  if (std::scanf("%lld", &chunk) != 1) return 2;
  while (std::scanf("%lld %lld", &t, &c) == 2) {
    std::vector<int64_t> numels(t);
    std::vector<std::vector<int64_t>> columns(c, std::vector<int64_t>(t));
    for (auto& n : numels) { long long v; std::scanf("%lld", &v); n = v; }
    for (auto& column : columns) for (auto& x : column) { long long v; std::scanf("%lld", &v); x = v; }
    const auto key = ssam::cuda::launch_table_key(numels, columns);
    std::printf("%lld\n", (long long)ssam::cuda::launch_table_chunks(numels, chunk));
    for (int64_t v : key) std::printf("%lld ", (long long)v);
    std::printf("\n");
    for (int64_t v : ssam::cuda::launch_table_content(key, chunk)) std::printf("%lld ", (long long)v);
    std::printf("\n");
  }
  return 0;
}
"""


def test_launch_table_layout_from_its_key(tmp_path):
    """The CUDA list ops' tables (csrc/cuda/launch_table.h) are cached by a key of O(tensors)
    values and built from it only on a miss: the content built from the key is the layout the
    kernels read (per chunk its tensor and first element, per tensor its numel and first chunk,
    then the columns), checked here against a reference on random sizes (empty tensors, exact
    multiples of the chunk, one element past), and two layouts with the same flattened values
    (2 tensors x 2 columns, 3 tensors x 1 column) get different keys."""
    import random

    (tmp_path / "harness.cpp").write_text(_LAUNCH_TABLE_HARNESS)
    out = subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{os.path.join(ROOT, 'csrc')}",
                          str(tmp_path / "harness.cpp"), "-o", str(tmp_path / "harness")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    chunk, rng = 8, random.Random(7)
    cases = [([5, 1, 2], [[9, 8, 7]]), ([5, 1], [[2, 9], [8, 7]]), ([0, 0], [[1, 2]])]
    for _ in range(20):
        t = rng.randint(1, 9)
        numels = [rng.choice([0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk, rng.randint(0, 5 * chunk)]) for _ in range(t)]
        cases.append((numels, [[rng.randint(-2**62, 2**62) for _ in range(t)] for _ in range(rng.randint(0, 3))]))
    text = f"{chunk}\n" + "".join(
        f"{len(n)} {len(cols)} {' '.join(map(str, n + [x for col in cols for x in col]))}\n" for n, cols in cases)
    run = subprocess.run([str(tmp_path / "harness")], input=text, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3 * len(cases)
    keys = []
    for i, (numels, cols) in enumerate(cases):
        chunk_tensor = [t for t, n in enumerate(numels) for _ in range(0, n, chunk)]
        chunk_start = [s for n in numels for s in range(0, n, chunk)]
        first = [sum(-(-m // chunk) for m in numels[:t]) for t in range(len(numels))]
        flat = [x for col in cols for x in col]
        assert int(lines[3 * i]) == len(chunk_start)
        key = [int(v) for v in lines[3 * i + 1].split()]
        assert key == [len(numels), len(cols), *numels, *flat]
        keys.append(tuple(key))
        content = [int(v) for v in lines[3 * i + 2].split()]
        assert content == chunk_tensor + chunk_start + numels + first + flat, (numels, cols)
    assert keys[0][2:] == keys[1][2:] and keys[0] != keys[1]  # same values, different layouts


def _fake_toolkit(tmp_path, monkeypatch):
    """A toolkit at an odd place, reachable only through a wrapper script named nvcc that
    reports the real root the way nvcc's dry run does."""
    root = tmp_path / "toolkit"
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    nvcc = wrappers / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={root}/bin/..' >&2\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    return root


def test_setup_finds_the_toolkit_behind_a_wrapper_nvcc(tmp_path, monkeypatch):
    root = _fake_toolkit(tmp_path, monkeypatch)
    home, looked = _setup_module().cuda_home()
    assert home == str(root)
    assert looked[0] == str(tmp_path)  # torch's guess (the wrapper's grandparent) came first and failed


def test_setup_cuda_home_env_wins_and_a_wrong_one_is_reported(tmp_path, monkeypatch):
    root = _fake_toolkit(tmp_path, monkeypatch)
    setup = _setup_module()
    monkeypatch.setenv("CUDA_HOME", str(root))
    assert setup.cuda_home() == (str(root), [str(root)])
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    home, looked = setup.cuda_home()
    assert home == str(root)
    assert looked[0] == f"CUDA_HOME={tmp_path / 'nowhere'}"
    monkeypatch.setenv("CUDA_PATH", str(root))  # (the bad CUDA_HOME passed over stays listed: the build warns)
    assert setup.cuda_home() == (str(root), [f"CUDA_HOME={tmp_path / 'nowhere'}", str(root)])


# the fp32 kernels that load and store tensor elements (mangled names): perturb, restore, and the
# planned perturb, restore and restore + SGD
_STORING_FP32_KERNELS = ("MoveIffLb1EE", "MoveIffLb0EE", "plan_perturb_kernelIffE", "plan_restore_kernelIfE",
                         "plan_restore_sgd_kernelIfE")


def _loads_before_a_store(body: str) -> int:
    """The most fp32 element loads the PTX ``body`` issues in a row before a store (a store
    ends a run; branches and labels do not)."""
    run = most = 0
    for line in body.splitlines():
        line = re.sub(r"^\s*(@!?%p\d+\s+)?", "", line)
        if re.match(r"ld(\.global)?\.f32\s", line):
            run += 1
        elif re.match(r"st(\.global)?\.", line):
            most, run = max(most, run), 0
    return most


@needs_nvcc
def test_storing_kernels_keep_a_batch_of_loads_in_flight(tmp_path):
    """The tensors' addresses come from tables, so the compiler must assume a store may alias the
    next load: element by element, a thread waited for one load at a time (load, store, load,
    store...), latency-bound far below the memory bandwidth. Each storing kernel loads a batch
    of 8 fp32 elements (16 loads where it reads two tensors) before it stores any."""
    ptx = tmp_path / "kernels.ptx"
    cmd = [NVCC, CXX_STD, "-O3", "--fmad=false", "-arch=sm_90", "-I", os.path.join(ROOT, "csrc"), "-ptx",
           os.path.join(ROOT, "csrc", "cuda", "kernels.cu"), "-o", str(ptx)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    bodies = dict(re.findall(r"\.entry\s+(\w+)\((.*?)\n\}", ptx.read_text(), re.S))
    for kernel in _STORING_FP32_KERNELS:
        found = [body for name, body in bodies.items() if kernel in name]
        assert len(found) == 1, (kernel, len(found))
        assert _loads_before_a_store(found[0]) >= 8, kernel


# A stand-in for libcusparseLt.so.0 that keeps count of its live objects: an init marks the
# object with a fresh token, a destroy must find a live token (else it counts a bad destroy).
# cusparseLtMatmulAlgSetAttribute refuses the algorithm id 99, cusparseLtMatmulPlanInit the id 98,
# cusparseLtSpMMACompressedSize2 a k of 8000: the failures part way through a plan or descriptor.
_FAKE_CUSPARSELT = r"""
#include <cstdint>
#include <cstring>
#include <set>
extern "C" {
std::set<uint64_t> fake_live;
uint64_t fake_next = 1, fake_made = 0, fake_bad_destroys = 0;
static int last_alg_id = 0;
static int make(void* o) {
  const uint64_t t = fake_next++;
  std::memcpy(o, &t, sizeof(t));
  fake_live.insert(t);
  ++fake_made;
  return 0;
}
static int unmake(const void* o) {
  uint64_t t;
  std::memcpy(&t, o, sizeof(t));
  if (fake_live.erase(t) != 1) ++fake_bad_destroys;
  return 0;
}
int cusparseLtInit(void*) { return 0; }
int cusparseLtGetProperty(int what, int* v) { *v = what == 1 ? 8 : 0; return 0; }
const char* cusparseLtGetErrorString(int) { return "fake failure"; }
int cusparseLtDenseDescriptorInit(const void*, void* d, int64_t, int64_t, int64_t, uint32_t, int, int) { return make(d); }
static int64_t last_k = 0;
int cusparseLtStructuredDescriptorInit(const void*, void* d, int64_t, int64_t k, int64_t, uint32_t, int, int, int) {
  last_k = k;
  return make(d);
}
int cusparseLtMatDescriptorDestroy(const void* d) { return unmake(d); }
int cusparseLtMatmulDescriptorInit(const void*, void*, int, int, const void*, const void*, const void*, const void*,
                                   int) { return 0; }
int cusparseLtMatmulAlgSelectionInit(const void*, void* a, const void*, int) { return make(a); }
int cusparseLtMatmulAlgSelectionDestroy(const void* a) { return unmake(a); }
int cusparseLtMatmulAlgSetAttribute(const void*, void*, int attribute, const void* data, size_t) {
  if (attribute == 0) std::memcpy(&last_alg_id, data, sizeof(int));
  return attribute == 0 && last_alg_id == 99 ? 7 : 0;
}
int cusparseLtMatmulAlgGetAttribute(const void*, const void*, int, void*, size_t) { return 0; }
int cusparseLtMatmulPlanInit(const void*, void* p, const void*, const void*) { return last_alg_id == 98 ? 7 : make(p); }
int cusparseLtMatmulPlanDestroy(const void* p) { return unmake(p); }
int cusparseLtMatmulGetWorkspace(const void*, const void*, size_t* w) { *w = 0; return 0; }
int cusparseLtMatmul(...) { return 0; }
int cusparseLtMatmulSearch(...) { return 0; }
int cusparseLtSpMMACompressedSize2(const void*, const void*, size_t* size, size_t* buffer) {
  *size = *buffer = 64;
  return last_k == 8000 ? 7 : 0;
}
int cusparseLtSpMMACompress2(...) { return 0; }
}
"""

# Includes cusparselt.cpp itself (its helpers are file-local) and drives its keeping and undoing
# against the stand-in; no CUDA device or runtime is touched.
_CUSPARSELT_HARNESS = r"""
#include "cuda/cusparselt.cpp"
#include <cstdio>
#include <set>
#define EXPECT(cond) do { if (!(cond)) { std::printf("FAILED line %d: %s\n", __LINE__, #cond); return 1; } } while (0)
int main(int, char** argv) {
  using namespace ssam;
  cslt_load(argv[1]);
  void* fake = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);  // the same library, for its counters
  auto& live = *static_cast<std::set<uint64_t>*>(dlsym(fake, "fake_live"));
  auto& made = *static_cast<uint64_t*>(dlsym(fake, "fake_made"));
  auto& bad = *static_cast<uint64_t*>(dlsym(fake, "fake_bad_destroys"));
  DeviceState st;
  // compression descriptors: one per (dtype, m, k), at most kMaxKept kept, the least recently used
  // destroyed; a kept one is found again without a new descriptor
  for (int64_t i = 1; i <= 300; ++i) {
    compression(st, at::kHalf, CUDA_R_16F, 16, 16 * i);
    if (i == 200) compression(st, at::kHalf, CUDA_R_16F, 16, 16);  // the first shape, used again
  }
  EXPECT(st.compressions.size() == kMaxKept && live.size() == kMaxKept && made == 300 && bad == 0);
  EXPECT(st.compressions.count({static_cast<int>(at::kHalf), 16, 16}) == 1);  // recently used: kept
  EXPECT(st.compressions.count({static_cast<int>(at::kHalf), 16, 32}) == 0);  // the oldest: evicted
  compression(st, at::kHalf, CUDA_R_16F, 16, 16 * 300);
  EXPECT(made == 300 && live.size() == kMaxKept);
  compression(st, at::kHalf, CUDA_R_16F, 16, 32);  // evicted, made again
  EXPECT(made == 301 && live.size() == kMaxKept && st.compressions.size() == kMaxKept && bad == 0);
  // the compressed size refused after the descriptor was made: destroyed, nothing kept
  const size_t kept = live.size();
  bool threw = false;
  try {
    compression(st, at::kHalf, CUDA_R_16F, 32, 8000);
  } catch (const c10::Error&) {
    threw = true;
  }
  EXPECT(threw && live.size() == kept && st.compressions.size() == kMaxKept && bad == 0);
  // plans that fail part way (an algorithm id refused: descriptors and the algorithm selection
  // made; the plan refused: all but the plan made) leave nothing behind, nor does a search
  const Operands o{at::Tensor(), 16, 32, 16, false};
  for (int64_t alg_id : {99, 98}) {
    threw = false;
    try {
      MatmulPlan p;
      Undo<MatmulPlan> undo(&p);
      init_plan(st.handle, &p, o, CUDA_R_16F, false, alg_id, 1, -1);
    } catch (const c10::Error&) {
      threw = true;
    }
    EXPECT(threw && live.size() == kept && bad == 0);
  }
  {
    MatmulPlan p;
    Undo<MatmulPlan> undo(&p);
    init_plan(st.handle, &p, o, CUDA_R_16F, true, 0, 1, -1);
    EXPECT(live.size() == kept + 5);  // a, b, c, the algorithm selection and the plan
  }
  EXPECT(live.size() == kept && bad == 0);
  // kept plans: at most kMaxKept, the least recently used destroyed with its descriptors
  for (int64_t n = 8; n <= 8 * 300; n += 8) {
    auto fresh = std::make_unique<MatmulPlan>();
    Undo<MatmulPlan> undo(fresh.get());
    init_plan(st.handle, fresh.get(), Operands{at::Tensor(), 16, 32, n, false}, CUDA_R_16F, false, 0, 1, -1);
    if (st.plans.size() >= kMaxKept) evict_least_recently_used(st.plans);
    auto found = st.plans.emplace(MatmulKey{0, 16, 32, n, false, false, 0, 1, -1}, std::move(fresh)).first;
    undo.release();
    found->second->last_used = ++st.clock;
  }
  EXPECT(st.plans.size() == kMaxKept && live.size() == kept + 5 * kMaxKept && bad == 0);
  std::printf("ok\n");
  return 0;
}
"""


def test_cusparselt_keeps_at_most_256_descriptors_and_plans_and_leaks_none_on_failure(tmp_path):
    """cusparselt.cpp's keeping, against a stand-in cuSPARSELt that counts its live objects: 300
    compressed shapes keep 256 descriptors (the least recently used destroyed, made again when
    needed), 300 plans keep 256, and a descriptor or plan whose making fails part way (a size
    query refused, an algorithm id refused, a plan refused), or a searched plan, leaves none."""
    system = cpp_extension.include_paths() + [_cuda_include(), sysconfig.get_paths()["include"]]
    (tmp_path / "fake.cpp").write_text(_FAKE_CUSPARSELT)
    (tmp_path / "harness.cpp").write_text(_CUSPARSELT_HARNESS)
    fake = tmp_path / "libfakecusparselt.so"
    out = subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", str(tmp_path / "fake.cpp"), "-o", str(fake)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    libs = cpp_extension.library_paths()
    cmd = ["g++", CXX_STD, "-O1", *[f"-isystem{i}" for i in system], f"-I{os.path.join(ROOT, 'csrc')}",
           str(tmp_path / "harness.cpp"), "-o", str(tmp_path / "harness"), *[f"-L{d}" for d in libs],
           *[f"-Wl,-rpath,{d}" for d in libs], "-lc10", "-ltorch_cpu", "-ldl"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    run = subprocess.run([str(tmp_path / "harness"), str(fake)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.endswith("ok\n"), run.stdout + run.stderr
