// 2:4 sparse GEMMs on sparse tensor cores through cuSPARSELt, with its plans kept
// (`torch.ops.ssam_cslt.*`, used by ssam_kernels/sparse_gemm.py).
//
// Why not torch._cslt_sparse_mm: every call initialises four descriptors and a plan
// (cusparseLtMatmulPlanInit, where cuSPARSELt picks and prepares its kernel) and destroys them,
// and torch._cslt_compress does the same with its descriptor. On the H200 every 2:4 GEMM of the
// ascent backward took 0.56-1.18 ms whatever its size (768x768x8k and 3072x768x32k alike),
// 0.11-0.38x the dense GEMM: the mark of per-call host work, not of the sparse tensor cores. Here the descriptors and the plan of each
// shape, dtype, operand layout and configuration are made once (per thread and device) and kept:
// a call is one workspace allocation from torch's caching allocator and one cusparseLtMatmul (or
// cusparseLtSpMMACompress2) on the current stream, so it can also be captured in a CUDA graph.
//
// cuSPARSELt is opened at run time (dlopen, see cusparselt_abi.h): the extension builds without
// its headers and loads without the library; `load` says why it cannot run. Kept handles,
// descriptors and plans are never destroyed through cuSPARSELt (their memory goes with their
// thread): destroying them at thread or process exit could run after the CUDA context is gone.
// Past kMaxKept plans, or kMaxKept compression descriptors, per thread and device, the least
// recently used is destroyed while running (a new token count is a new plan, and for
// MVUE(dY^T) @ X a new compressed shape: variable sequence lengths would otherwise keep one each).
// What a call makes and does not keep (a searched plan, a plan or descriptor whose making failed
// part way) is destroyed when the call returns or throws (Undo).

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <cstdint>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "cusparselt_abi.h"

namespace ssam {
namespace {

using cslt::AlgSelection;
using cslt::Api;
using cslt::Handle;
using cslt::MatDescr;
using cslt::MatmulDescr;
using cslt::Plan;

struct Library {
  std::mutex mutex;
  void* handle = nullptr;
  Api api{};
  std::vector<int64_t> version;
};

Library& library() {
  static Library lib;
  return lib;
}

template <class F>
bool bind(void* lib, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  return fn != nullptr;
}

// Opens cuSPARSELt (`path`, or "" for libcusparseLt.so.0 wherever the loader finds it: torch's
// CUDA build has usually loaded it already) and binds its functions; returns its version
// [major, minor, patch]. Loading once is enough; later calls return the version.
std::vector<int64_t> cslt_load(const std::string& path) {
  Library& lib = library();
  std::lock_guard<std::mutex> lock(lib.mutex);
  if (lib.handle != nullptr) return lib.version;
  const std::string name = path.empty() ? "libcusparseLt.so.0" : path;
  void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    TORCH_CHECK(false, "cuSPARSELt: cannot open ", name, ": ", why != nullptr ? why : "unknown error");
  }
  Api api{};
  std::string missing;
#define CSLT_BIND(field) \
  if (!bind(handle, "cusparseLt" #field, api.field)) missing += " cusparseLt" #field;
  CSLT_BIND(Init)
  CSLT_BIND(GetProperty)
  CSLT_BIND(GetErrorString)
  CSLT_BIND(DenseDescriptorInit)
  CSLT_BIND(StructuredDescriptorInit)
  CSLT_BIND(MatDescriptorDestroy)
  CSLT_BIND(MatmulDescriptorInit)
  CSLT_BIND(MatmulAlgSelectionInit)
  CSLT_BIND(MatmulAlgSelectionDestroy)
  CSLT_BIND(MatmulAlgSetAttribute)
  CSLT_BIND(MatmulAlgGetAttribute)
  CSLT_BIND(MatmulPlanInit)
  CSLT_BIND(MatmulPlanDestroy)
  CSLT_BIND(MatmulGetWorkspace)
  CSLT_BIND(Matmul)
  CSLT_BIND(MatmulSearch)
  CSLT_BIND(SpMMACompressedSize2)
  CSLT_BIND(SpMMACompress2)
#undef CSLT_BIND
  int major = -1, minor = -1, patch = -1;
  if (missing.empty()) {
    api.GetProperty(MAJOR_VERSION, &major);
    api.GetProperty(MINOR_VERSION, &minor);
    api.GetProperty(PATCH_LEVEL, &patch);
  }
  const bool old = major < cslt::kMinVersion[0] || (major == cslt::kMinVersion[0] && minor < cslt::kMinVersion[1]);
  if (!missing.empty() || old) {
    dlclose(handle);
    TORCH_CHECK(missing.empty(), "cuSPARSELt: ", name, " lacks", missing);
    TORCH_CHECK(false, "cuSPARSELt: ", name, " is version ", major, ".", minor, ".", patch, "; ssam_kernels needs >= ",
                cslt::kMinVersion[0], ".", cslt::kMinVersion[1]);
  }
  lib.api = api;
  lib.version = {major, minor, patch};
  lib.handle = handle;
  return lib.version;
}

const Api& api() {
  Library& lib = library();
  std::lock_guard<std::mutex> lock(lib.mutex);
  TORCH_CHECK(lib.handle != nullptr, "cuSPARSELt is not loaded: call torch.ops.ssam_cslt.load first");
  return lib.api;
}

void check(int status, const char* what) {
  TORCH_CHECK(status == cslt::kSuccess, "cuSPARSELt ", what, " failed: ", api().GetErrorString(status), " (status ",
              status, ")");
}

cudaStream_t current_stream(const at::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}

cudaDataType value_type(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK_VALUE(false, what, ": cuSPARSELt here takes float16 or bfloat16, got ", t.scalar_type());
  }
  return CUDA_R_16F;  // not reached
}

// The 1-D form older torch's _cslt_compress returned (before 2.10) held m * k * 9 / 16 elements:
// the kept half plus 2 bits of position per kept value. Read back only to find m.
int64_t legacy_compressed_numel(int64_t m, int64_t k) { return m * k * 9 / 16; }

// The has_* flags say which cuSPARSELt objects were made (an init that fails part way leaves the
// rest unmade): destroy() destroys those alone, once.
struct Compression {
  MatDescr descr;
  size_t size = 0, buffer = 0;
  uint64_t last_used = 0;
  bool has_descr = false;
};

// A plan makes and owns its descriptors (it must not outlive those it was made from); no plan
// refers to a Compression's descriptor, so either is evicted without the other.
struct MatmulPlan {
  MatDescr a, b, c;
  MatmulDescr matmul;  // no destroy function: its memory is this object's
  AlgSelection alg;
  Plan plan;
  size_t workspace = 0;
  uint64_t last_used = 0;
  bool has_a = false, has_b = false, has_c = false, has_alg = false, has_plan = false;
};

// plans, and compression descriptors, kept per thread and device
constexpr size_t kMaxKept = 256;

// Destroying a plan and its descriptors right after its last cusparseLtMatmul was enqueued is
// what torch's _cslt_sparse_mm does on every call: they are host objects, and the launched kernel
// does not read them. The same holds for a descriptor after cusparseLtSpMMACompress2 was enqueued.
// api() does not throw here: the library was loaded to make them, and is never unloaded.
void destroy(MatmulPlan& p) {
  const Api& f = api();
  if (p.has_plan) f.MatmulPlanDestroy(&p.plan);
  if (p.has_alg) f.MatmulAlgSelectionDestroy(&p.alg);
  if (p.has_a) f.MatDescriptorDestroy(&p.a);
  if (p.has_b) f.MatDescriptorDestroy(&p.b);
  if (p.has_c) f.MatDescriptorDestroy(&p.c);
  p.has_plan = p.has_alg = p.has_a = p.has_b = p.has_c = false;
}

void destroy(Compression& c) {
  if (c.has_descr) api().MatDescriptorDestroy(&c.descr);
  c.has_descr = false;
}

// Destroys what it holds when the scope is left, unless released (then someone else owns it):
// a plan or descriptor being made, if its making or keeping throws; a searched plan, always.
template <class T>
class Undo {
 public:
  explicit Undo(T* held) : held_(held) {}
  Undo(const Undo&) = delete;
  Undo& operator=(const Undo&) = delete;
  ~Undo() {
    if (held_ != nullptr) destroy(*held_);
  }
  void release() { held_ = nullptr; }

 private:
  T* held_;
};

// (dtype, m, k, n, B transposed, result transposed, alg id, split-k, split-k mode)
using MatmulKey = std::tuple<int, int64_t, int64_t, int64_t, bool, bool, int64_t, int64_t, int64_t>;

struct DeviceState {
  Handle handle;
  std::map<std::tuple<int, int64_t, int64_t>, std::unique_ptr<Compression>> compressions;  // (dtype, m, k)
  std::map<MatmulKey, std::unique_ptr<MatmulPlan>> plans;
  uint64_t clock = 0;  // counts look-ups of plans and descriptors, for last_used
};

// st.plans or st.compressions, not empty: its least recently used entry destroyed and dropped
// (never the one a running call holds: that was looked up last, or is not kept yet)
template <class Map>
void evict_least_recently_used(Map& kept) {
  auto oldest = kept.begin();
  for (auto it = kept.begin(); it != kept.end(); ++it) {
    if (it->second->last_used < oldest->second->last_used) oldest = it;
  }
  destroy(*oldest->second);
  kept.erase(oldest);
}

// one cuSPARSELt handle per thread and device (as torch keeps them: a handle is not shared
// between threads), with its descriptors and plans, kept for the thread's life: the main thread
// and autograd's device threads live as long as the process (a short-lived thread that multiplies
// leaves its handle and up to 256 plans behind, host memory)
DeviceState& state(const at::Device& device) {
  thread_local std::map<int, std::unique_ptr<DeviceState>> states;
  auto& slot = states[device.index()];
  if (!slot) {
    c10::DeviceGuard guard(device);
    auto fresh = std::make_unique<DeviceState>();
    check(api().Init(&fresh->handle), "init");
    slot = std::move(fresh);
  }
  return *slot;
}

void check_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.dim() == 2, name, " must be a 2-D CUDA tensor, got ", t.dim(), "-D on ",
                    t.device());
}

// The descriptors promise cuSPARSELt 16-byte aligned operands; a view at an odd offset is not.
bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// t itself, or an aligned copy in the same layout
at::Tensor aligned_copy(const at::Tensor& t) { return aligned16(t) ? t : t.clone(); }

// *made is set once the descriptor exists (a failed init makes none)
void init_sparse_descr(const Handle& h, MatDescr* descr, bool* made, int64_t m, int64_t k, cudaDataType type) {
  check(api().StructuredDescriptorInit(&h, descr, m, k, k, 16, type, cslt::kOrderRow, cslt::kSparsity50),
        "structured descriptor init");
  *made = true;
}

// The descriptor and sizes of a compressed [m, k] operand of this type (made once per shape, and
// again after its eviction). The reference holds until the next call of compression on st.
Compression& compression(DeviceState& st, at::ScalarType dtype, cudaDataType type, int64_t m, int64_t k) {
  const std::tuple<int, int64_t, int64_t> key{static_cast<int>(dtype), m, k};
  auto found = st.compressions.find(key);
  if (found == st.compressions.end()) {
    auto fresh = std::make_unique<Compression>();
    Undo<Compression> undo(fresh.get());
    init_sparse_descr(st.handle, &fresh->descr, &fresh->has_descr, m, k, type);
    check(api().SpMMACompressedSize2(&st.handle, &fresh->descr, &fresh->size, &fresh->buffer), "compressed size");
    if (st.compressions.size() >= kMaxKept) evict_least_recently_used(st.compressions);
    found = st.compressions.emplace(key, std::move(fresh)).first;
    undo.release();
  }
  found->second->last_used = ++st.clock;
  return *found->second;
}

// a (dense-stored [m, k], 2:4 along k, row-major) -> its compressed form for `mm`: the bytes
// cuSPARSELt asks for (more than the kept half and its metadata for small operands, which it
// pads), as [m, ceil(bytes / (m * element size))] elements of a's dtype: torch's _cslt_compress
// layout since torch 2.10, whose m is size(0)
at::Tensor cslt_compress(const at::Tensor& a_in) {
  check_operand(a_in, "a");
  const cudaDataType type = value_type(a_in, "compress");
  const at::Tensor a = aligned_copy(a_in.contiguous());
  const int64_t m = a.size(0), k = a.size(1);
  TORCH_CHECK_VALUE(m > 0 && k > 0 && m % 16 == 0 && k % 16 == 0,
                    "compress: a's shape must be positive multiples of 16, got [", m, ", ", k, "]");
  c10::DeviceGuard guard(a.device());
  DeviceState& st = state(a.device());
  const Compression& entry = compression(st, a.scalar_type(), type, m, k);
  const int64_t row_bytes = m * a.element_size();
  // zeroed (one memset): cuSPARSELt need not write every byte of its padded size, nor the tail past
  // it (at most one row), and two compressions of one operand are then equal as tensors, whatever
  // the allocator handed out
  auto out = at::zeros({m, (static_cast<int64_t>(entry.size) + row_bytes - 1) / row_bytes}, a.options());
  auto buffer = at::empty({static_cast<int64_t>(entry.buffer) + 1}, a.options().dtype(at::kByte));
  check(api().SpMMACompress2(&st.handle, &entry.descr, 1, cslt::kOpNonTranspose, a.data_ptr(), out.data_ptr(),
                             buffer.data_ptr(), current_stream(a.device())),
        "compress");
  return out;
}

struct Operands {
  at::Tensor b;
  int64_t m, k, n;
  bool b_transposed;
};

// packed: compress's output or torch._cslt_compress's ([m, ...] since torch 2.10, 1-D before),
// contiguous; its size is checked against cuSPARSELt's for [m, k] by checked_operands
Operands operands(const at::Tensor& packed, const at::Tensor& b_in) {
  check_operand(b_in, "b");
  TORCH_CHECK_VALUE(packed.is_cuda() && (packed.dim() == 1 || packed.dim() == 2) && packed.is_contiguous() &&
                        packed.device() == b_in.device() && packed.scalar_type() == b_in.scalar_type(),
                    "packed must be a compressed operand (compress's or torch._cslt_compress's output), on b's device "
                    "and in b's dtype");
  TORCH_CHECK_VALUE(aligned16(packed), "packed must start 16-byte aligned (compress's output does; a view at an "
                    "offset does not)");
  // B row-major as it is, or the transpose of a row-major tensor (read with opB = T)
  const bool transposed = !b_in.is_contiguous() && b_in.t().is_contiguous();
  const at::Tensor b = aligned_copy((transposed || b_in.is_contiguous()) ? b_in : b_in.contiguous());
  const int64_t k = b.size(0), n = b.size(1);
  int64_t m = 0;
  if (packed.dim() == 2) {
    m = packed.size(0);
  } else {
    TORCH_CHECK_VALUE(k > 0 && packed.numel() * 16 % (9 * k) == 0, "packed holds ", packed.numel(),
                      " elements, not a compressed [m, ", k, "] operand");
    m = packed.numel() * 16 / (9 * k);
    TORCH_CHECK_VALUE(legacy_compressed_numel(m, k) == packed.numel(), "packed holds ", packed.numel(),
                      " elements, not a compressed [m, ", k, "] operand");
  }
  TORCH_CHECK_VALUE(m > 0 && k > 0 && n > 0 && m % 16 == 0 && k % 16 == 0 && n % 8 == 0,
                    "cuSPARSELt needs m, k positive multiples of 16 and n of 8, got m ", m, ", k ", k, ", n ", n);
  return {b, m, k, n, transposed};
}

// operands(), with packed holding at least the bytes cuSPARSELt reads for a compressed [m, k]
// operand (a 1-D operand of older torch, or any other tensor, may not)
Operands checked_operands(DeviceState& st, const at::Tensor& packed, const at::Tensor& b_in, cudaDataType type) {
  Operands o = operands(packed, b_in);
  const Compression& c = compression(st, o.b.scalar_type(), type, o.m, o.k);
  TORCH_CHECK_VALUE(static_cast<size_t>(packed.numel() * packed.element_size()) >= c.size, "packed holds ",
                    packed.numel() * packed.element_size(), " bytes; cuSPARSELt reads ", c.size,
                    " for a compressed [", o.m, ", ", o.k, "] operand");
  return o;
}

// descriptors, algorithm (id, split-k and its mode where set) and plan of one product; on a
// throw (an algorithm id cuSPARSELt refuses, say) p's flags say what was made, for destroy(*p)
void init_plan(const Handle& h, MatmulPlan* p, const Operands& o, cudaDataType type, bool transpose_result,
               int64_t alg_id, int64_t split_k, int64_t split_k_mode) {
  const Api& f = api();
  init_sparse_descr(h, &p->a, &p->has_a, o.m, o.k, type);
  if (o.b_transposed) {
    check(f.DenseDescriptorInit(&h, &p->b, o.n, o.k, o.k, 16, type, cslt::kOrderRow), "dense descriptor init");
  } else {
    check(f.DenseDescriptorInit(&h, &p->b, o.k, o.n, o.n, 16, type, cslt::kOrderRow), "dense descriptor init");
  }
  p->has_b = true;
  check(f.DenseDescriptorInit(&h, &p->c, o.m, o.n, transpose_result ? o.m : o.n, 16, type,
                              transpose_result ? cslt::kOrderCol : cslt::kOrderRow),
        "result descriptor init");
  p->has_c = true;
  check(f.MatmulDescriptorInit(&h, &p->matmul, cslt::kOpNonTranspose,
                               o.b_transposed ? cslt::kOpTranspose : cslt::kOpNonTranspose, &p->a, &p->b, &p->c, &p->c,
                               cslt::kCompute32F),
        "matmul descriptor init");
  check(f.MatmulAlgSelectionInit(&h, &p->alg, &p->matmul, cslt::kAlgDefault), "algorithm selection init");
  p->has_alg = true;
  const int id = static_cast<int>(alg_id), splits = static_cast<int>(split_k), mode = static_cast<int>(split_k_mode);
  check(f.MatmulAlgSetAttribute(&h, &p->alg, cslt::kAlgConfigId, &id, sizeof(id)), "setting the algorithm id");
  if (splits != 1) check(f.MatmulAlgSetAttribute(&h, &p->alg, cslt::kSplitK, &splits, sizeof(splits)), "setting split-k");
  if (mode > 0) check(f.MatmulAlgSetAttribute(&h, &p->alg, cslt::kSplitKMode, &mode, sizeof(mode)), "setting the split-k mode");
  check(f.MatmulPlanInit(&h, &p->plan, &p->matmul, &p->alg), "plan init");
  p->has_plan = true;
  check(f.MatmulGetWorkspace(&h, &p->plan, &p->workspace), "workspace size");
}

at::Tensor run(const Handle& h, MatmulPlan& p, const at::Tensor& packed, const Operands& o, bool transpose_result,
               bool search) {
  auto out = transpose_result ? at::empty({o.n, o.m}, o.b.options()) : at::empty({o.m, o.n}, o.b.options());
  auto workspace = at::empty({static_cast<int64_t>(p.workspace) + 1}, o.b.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = 0.0f;
  cudaStream_t stream = current_stream(o.b.device());
  const Api& f = api();
  if (search) {
    check(f.MatmulSearch(&h, &p.plan, &alpha, packed.data_ptr(), o.b.data_ptr(), &beta,
                         out.data_ptr(), out.data_ptr(), workspace.data_ptr(), &stream, 1),
          "search");
  } else {
    check(f.Matmul(&h, &p.plan, &alpha, packed.data_ptr(), o.b.data_ptr(), &beta, out.data_ptr(), out.data_ptr(),
                   workspace.data_ptr(), &stream, 1),
          "matmul");
  }
  return out;
}

// A @ b from A compressed by `compress`: [m, n], or [n, m] (A @ b transposed, column-major
// result) with transpose_result; alg_id / split_k / split_k_mode as `search` returns them
// (split_k 1 and mode -1: cuSPARSELt's defaults)
at::Tensor cslt_mm(const at::Tensor& packed, const at::Tensor& b_in, int64_t alg_id, int64_t split_k,
                   int64_t split_k_mode, bool transpose_result) {
  check_operand(b_in, "b");
  const cudaDataType type = value_type(b_in, "mm");
  TORCH_CHECK_VALUE(alg_id >= 0 && split_k >= 1, "mm: alg_id must be >= 0 and split_k >= 1, got ", alg_id, ", ",
                    split_k);
  c10::DeviceGuard guard(b_in.device());
  DeviceState& st = state(b_in.device());
  const Operands o = checked_operands(st, packed, b_in, type);
  const MatmulKey key{static_cast<int>(o.b.scalar_type()), o.m, o.k, o.n, o.b_transposed, transpose_result, alg_id,
                      split_k, split_k_mode};
  auto found = st.plans.find(key);
  if (found == st.plans.end()) {
    auto fresh = std::make_unique<MatmulPlan>();
    Undo<MatmulPlan> undo(fresh.get());
    init_plan(st.handle, fresh.get(), o, type, transpose_result, alg_id, split_k, split_k_mode);
    if (st.plans.size() >= kMaxKept) evict_least_recently_used(st.plans);
    found = st.plans.emplace(key, std::move(fresh)).first;
    undo.release();
  }
  found->second->last_used = ++st.clock;
  return run(st.handle, *found->second, packed, o, transpose_result, false);
}

// cuSPARSELt's own search over its algorithms and split-k for this product (runs it several
// times): [alg_id, split_k, split_k_mode, the largest alg_id it has]
std::vector<int64_t> cslt_search(const at::Tensor& packed, const at::Tensor& b_in, bool transpose_result) {
  check_operand(b_in, "b");
  const cudaDataType type = value_type(b_in, "search");
  c10::DeviceGuard guard(b_in.device());
  DeviceState& st = state(b_in.device());
  const Operands o = checked_operands(st, packed, b_in, type);
  MatmulPlan p;
  Undo<MatmulPlan> undo(&p);  // a searched plan is not kept (mm makes its own for the configuration found)
  init_plan(st.handle, &p, o, type, transpose_result, 0, 1, -1);
  run(st.handle, p, packed, o, transpose_result, true);
  const Api& f = api();
  int id = 0, splits = 1, mode = -1, max_id = -1;
  check(f.MatmulAlgGetAttribute(&st.handle, &p.alg, cslt::kAlgConfigId, &id, sizeof(id)), "reading the algorithm id");
  // split-k and its mode may be unset (cuSPARSELt's default): then the defaults stand
  if (f.MatmulAlgGetAttribute(&st.handle, &p.alg, cslt::kSplitK, &splits, sizeof(splits)) != cslt::kSuccess) splits = 1;
  if (f.MatmulAlgGetAttribute(&st.handle, &p.alg, cslt::kSplitKMode, &mode, sizeof(mode)) != cslt::kSuccess) mode = -1;
  if (f.MatmulAlgGetAttribute(&st.handle, &p.alg, cslt::kAlgConfigMaxId, &max_id, sizeof(max_id)) != cslt::kSuccess) {
    max_id = -1;
  }
  return {id, splits, mode, max_id};
}

}  // namespace

TORCH_LIBRARY(ssam_cslt, m) {
  m.def("load(str path) -> int[]", &cslt_load);
  m.def("compress(Tensor a) -> Tensor");
  m.def("mm(Tensor packed, Tensor b, int alg_id, int split_k, int split_k_mode, bool transpose_result) -> Tensor");
  m.def("search(Tensor packed, Tensor b, bool transpose_result) -> int[]");
}

TORCH_LIBRARY_IMPL(ssam_cslt, CUDA, m) {
  m.impl("compress", &cslt_compress);
  m.impl("mm", &cslt_mm);
  m.impl("search", &cslt_search);
}

}  // namespace ssam
