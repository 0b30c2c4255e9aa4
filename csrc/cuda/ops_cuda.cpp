// CUDA implementations of the `ssam` ops: tensor glue around the torch-free kernels of
// kernels.cu. Only torch headers that a CPU build of torch ships are used (the stream comes from
// c10's device-guard interface), so this file also compiles as a check on machines without CUDA
// torch. Every launch's error is checked.
//
// No op waits for the device or copies from pageable host memory in steady state, so a training
// step can run ahead of the GPU and be captured in a CUDA graph: the small tables a launch reads
// are cached on the device by the values they are made from (TableCache), and the set-bit counts
// of masks already checked are remembered per mask tensor and version (MaskCounts). compress_24
// with check=true is the exception: it reads back one flag to reject input that is not 2:4 sparse.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../plan_tables.h"
#include "../ssam_common.h"
#include "kernels.h"
#include "launch_table.h"

namespace ssam {
namespace {

using cuda::ChunkTable;
using cuda::Dtype;

cudaStream_t current_stream(const at::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA call failed: ", cudaGetErrorString(err));
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_launch(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

Dtype dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::F32;
    case at::kDouble: return Dtype::F64;
    case at::kHalf: return Dtype::F16;
    case at::kBFloat16: return Dtype::BF16;
    default:
      TORCH_CHECK(false, what, ": CUDA kernels take float64, float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const at::Device& device, const char* what, const char* name, size_t k) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, what, ": ", name, "[", k, "] is on ", t.device(),
              "; every tensor must be on ", device);
  TORCH_CHECK(t.is_contiguous(), what, ": ", name, "[", k, "] must be contiguous");
}

int64_t address(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

// ---- device tables, cached by what they are made from --------------------------------------

// Device copies of the small int64 tables a launch reads. A table is a function of host values
// only (sizes, data pointers): it is keyed by those values, per tensor, and built (its per-chunk
// columns included) only on a miss, so a hit is exact and costs O(tensors), not O(chunks), and
// a loop that passes the same tensors every step copies nothing after its first step. A miss
// copies from pinned memory without blocking.
// Entries are per (device, stream), so a table is freed only in the order of the stream that
// reads it; entries used while that stream captures a CUDA graph are kept for good (the graph
// keeps reading their addresses), and nothing is evicted during a capture. A table first needed
// during a capture is made for that graph alone (its copy runs only when the graph replays).
//
// A table built during a capture is copied from pinned memory set aside before it (CaptureArena),
// not from a new pinned allocation: torch's pinned-memory allocator queries CUDA events when it
// allocates, which a capture in the default (global) mode refuses in torch builds without
// pytorch#167507 (ssam_kernels/_device_tables.py does the same for the Triton tables). Entries are
// per stream and torch.cuda.graph captures on a side stream, so a captured call builds its tables.
class CaptureArena {
 public:
  // Set the memory aside (outside a capture): once, and again once half of it is taken (the
  // tables cut from the old block keep it alive).
  void reserve() {
    if (!block_.defined() || used_ > kBytes / 2) {
      block_ = at::empty({kBytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      used_ = 0;
    }
  }
  // n int64 values of the arena, 16-byte aligned, never taken back; undefined where it has no room.
  at::Tensor take(int64_t n) {
    const int64_t start = (used_ + 15) / 16 * 16;
    const int64_t end = start + n * static_cast<int64_t>(sizeof(int64_t));
    if (!block_.defined() || end > kBytes) return at::Tensor();
    used_ = end;
    return block_.narrow(0, start, end - start).view(at::kLong);
  }

 private:
  static constexpr int64_t kBytes = int64_t{4} << 20;  // a step's tables are ~24 B per 8k elements
  at::Tensor block_;
  int64_t used_ = 0;
};

class TableCache {
 public:
  // The table of `key` (which must determine its content), from `build(key)` on a miss.
  template <typename Build>
  at::Tensor get(std::vector<int64_t> key_values, const at::Device& device, cudaStream_t stream, const Build& build) {
    const bool in_capture = capturing(stream);
    std::lock_guard<std::mutex> lock(mutex_);
    Key key{device.index(), stream, std::move(key_values)};
    auto it = entries_.find(key);
    if (it == entries_.end()) {
      const std::vector<int64_t> content = build(key.values);
      const auto n = static_cast<int64_t>(content.size());
      at::Tensor host;
      if (in_capture) {
        host = arena_.take(n);  // where it is full (or was never set aside): a pinned allocation,
      } else {                  // which newer torch allows during a capture
        arena_.reserve();       // for a capture that may follow
      }
      if (!host.defined()) host = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
      std::copy(content.begin(), content.end(), host.data_ptr<int64_t>());
      auto dev = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
      dev.copy_(host, /*non_blocking=*/true);
      if (in_capture) {
        // The copy is a node of the graph being captured: the table holds data only once that
        // graph replays. Kept alive for that graph, and never handed out to anyone else.
        made_in_capture_.push_back(Entry{host, dev, true, 0});
        return dev;
      }
      evict();
      it = entries_.emplace(std::move(key), Entry{host, dev, false, 0}).first;
    }
    it->second.keep = it->second.keep || in_capture;
    it->second.last_use = ++clock_;
    return it->second.dev;
  }

 private:
  static constexpr size_t kCapacity = 64;  // evictable entries: a few parameter lists' worth
  struct Key {
    c10::DeviceIndex device;
    cudaStream_t stream;
    std::vector<int64_t> values;  // what the table is made from (see launch_table)
    bool operator==(const Key& o) const { return device == o.device && stream == o.stream && values == o.values; }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const {
      uint64_t h = 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(k.device) ^ reinterpret_cast<uintptr_t>(k.stream);
      for (int64_t v : k.values) h = (h ^ static_cast<uint64_t>(v)) * 0x100000001b3ull;
      return static_cast<size_t>(h ^ (h >> 29));
    }
  };
  struct Entry {
    at::Tensor host, dev;  // the pinned source stays alive: a captured copy may read it again
    bool keep;
    uint64_t last_use;
  };

  void evict() {  // drop the least recently used evictable entry once the cache is full
    size_t evictable = 0;
    auto oldest = entries_.end();
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->second.keep) continue;
      ++evictable;
      if (oldest == entries_.end() || it->second.last_use < oldest->second.last_use) oldest = it;
    }
    if (evictable >= kCapacity) entries_.erase(oldest);
  }

  std::mutex mutex_;
  std::unordered_map<Key, Entry, KeyHash> entries_;
  std::vector<Entry> made_in_capture_;
  CaptureArena arena_;
  uint64_t clock_ = 0;
};

TableCache& table_cache() {
  static TableCache* cache = new TableCache();  // never destroyed: tensors outlive CUDA at exit
  return *cache;
}

// One multi-tensor launch's table on the device: the chunk table (chunk_tensor, chunk_start),
// then per-tensor columns: numel, first chunk, and the launch's own (addresses, sizes).
struct LaunchTable {
  at::Tensor dev;
  int64_t num_chunks = 0, num_tensors = 0;

  const int64_t* at(int64_t offset) const { return dev.data_ptr<int64_t>() + offset; }
  ChunkTable chunks() const { return ChunkTable{at(0), at(num_chunks), at(2 * num_chunks), num_chunks}; }
  // per-tensor column i: 0 = numel, 1 = first chunk, 2.. = the launch's columns in order
  const int64_t* column(int64_t i) const { return at(2 * num_chunks + i * num_tensors); }
};

LaunchTable launch_table(const std::vector<at::Tensor>& ts, const std::vector<std::vector<int64_t>>& columns,
                         const at::Device& device, cudaStream_t stream) {
  std::vector<int64_t> numels;
  numels.reserve(ts.size());
  for (const auto& t : ts) numels.push_back(t.numel());
  LaunchTable out;
  out.num_tensors = static_cast<int64_t>(ts.size());
  out.num_chunks = cuda::launch_table_chunks(numels, cuda::kChunk);
  if (out.num_chunks == 0) return out;
  out.dev = table_cache().get(cuda::launch_table_key(numels, columns), device, stream,
                              [](const std::vector<int64_t>& key) { return cuda::launch_table_content(key, cuda::kChunk); });
  return out;
}

// ---- set-bit counts of masks already checked ----------------------------------------------

// perturb_/restore_ index a compact backup by mask position, so its size must equal the mask's
// count of set bits. Counting needs the device, so each mask tensor is counted (one wait) the
// first time it is seen at a version; after that, its count is checked on the host. An entry
// holds a weak reference to the mask's TensorImpl, so that address cannot be reused for another
// tensor while the entry lives; an in-place write bumps the version and forces a recount.
class MaskCounts {
 public:
  int64_t find(const at::Tensor& bits) {  // -1: unknown at this version
    const int64_t version = version_of(bits);
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(bits.unsafeGetTensorImpl());
    if (it == entries_.end()) return -1;
    const Entry& e = it->second;
    if (e.impl.expired()) {
      entries_.erase(it);
      return -1;
    }
    return version >= 0 && e.version == version && e.data == bits.data_ptr() ? e.count : -1;
  }

  void put(const at::Tensor& bits, int64_t count) {
    const int64_t version = version_of(bits);
    if (version < 0) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (entries_.size() >= kSweepAt) sweep();
    entries_.insert_or_assign(bits.unsafeGetTensorImpl(), Entry{Weak(bits.getIntrusivePtr()), bits.data_ptr(), version, count});
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Weak impl;
    const void* data;
    int64_t version;
    int64_t count;
  };
  static constexpr size_t kSweepAt = 4096;

  static int64_t version_of(const at::Tensor& t) {
    try {
      return static_cast<int64_t>(t._version());
    } catch (const c10::Error&) {  // inference tensors have no version counter: never cached
      return -1;
    }
  }

  void sweep() {
    for (auto it = entries_.begin(); it != entries_.end();) it = it->second.impl.expired() ? entries_.erase(it) : std::next(it);
    if (entries_.size() >= kSweepAt) entries_.clear();
  }

  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
};

MaskCounts& mask_counts() {
  static MaskCounts* counts = new MaskCounts();
  return *counts;
}

// Per chunk of a masked group: the slot of its first kept element in its tensor's compact
// backup (two launches: the counts, then a scan within each tensor). Also checks each backup's
// size against its mask's count (see MaskCounts).
at::Tensor chunk_offsets(const LaunchTable& tb, const int64_t* bits_addr, const std::vector<at::Tensor>& bits,
                         const std::vector<at::Tensor>& backups, const at::Device& device, cudaStream_t stream,
                         const char* what) {
  // [chunk offsets | per-tensor totals]
  auto out = at::empty({tb.num_chunks + tb.num_tensors}, at::TensorOptions().dtype(at::kLong).device(device));
  int64_t* offsets = out.data_ptr<int64_t>();
  check_launch(cuda::count_bits(tb.chunks(), bits_addr, offsets, stream), "count_bits");
  check_launch(cuda::chunk_offsets(tb.column(0), tb.column(1), tb.num_tensors, offsets, offsets + tb.num_chunks, stream),
               "chunk_offsets");
  std::vector<size_t> unknown;
  for (size_t i = 0; i < bits.size(); ++i) {
    const int64_t known = mask_counts().find(bits[i]);
    if (known < 0) {
      unknown.push_back(i);
      continue;
    }
    TORCH_CHECK(known == backups[i].numel(), what, ": a backup holds ", backups[i].numel(),
                " values but its mask sets ", known);
  }
  if (!unknown.empty()) {
    TORCH_CHECK(!capturing(stream), what, ": a mask is first used while a CUDA graph is being captured; its set bits ",
                "are counted, and the backup's size checked, once outside a capture: run a warm-up step first");
    const auto totals = out.narrow(0, tb.num_chunks, tb.num_tensors).cpu();  // one wait
    const int64_t* count = totals.data_ptr<int64_t>();
    for (size_t i : unknown) {
      TORCH_CHECK(count[i] == backups[i].numel(), what, ": a backup holds ", backups[i].numel(),
                  " values but its mask sets ", count[i]);
      mask_counts().put(bits[i], count[i]);
    }
  }
  return out;
}

// ---- ops ----------------------------------------------------------------------------------

at::Tensor grad_norm_cuda(at::TensorList tensors, const c10::List<c10::optional<at::Tensor>>& masks) {
  TORCH_CHECK(!tensors.empty(), "grad_norm: tensors must not be empty");
  TORCH_CHECK(masks.size() == tensors.size(), "grad_norm: ", masks.size(), " mask entries for ", tensors.size(),
              " tensors");
  const at::Device device = tensors[0].device();
  c10::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  bool masked = false, wide = false;  // wide: a float64 norm (some tensor is float64)
  std::map<int, std::vector<size_t>> groups;  // by dtype: one launch each
  for (size_t k = 0; k < tensors.size(); ++k) {
    check_cuda(tensors[k], device, "grad_norm", "tensors", k);
    const c10::optional<at::Tensor> m = masks.get(k);
    if (m.has_value()) {
      check_bits(*m, tensors[k], "grad_norm", k);
      masked = true;
    }
    groups[static_cast<int>(dtype_of(tensors[k], "grad_norm"))].push_back(k);
    wide = wide || tensors[k].scalar_type() == at::kDouble;
  }
  // fp32 sums would round a float64 gradient's squares to fp32 precision: then all in double
  const auto acc = at::TensorOptions().dtype(wide ? at::kDouble : at::kFloat).device(device);
  std::vector<std::pair<Dtype, LaunchTable>> launches;
  int64_t chunks = 0;
  for (const auto& [dtype, idx] : groups) {
    std::vector<at::Tensor> xs;
    std::vector<int64_t> x_addr, bits_addr;  // a bits address of 0: that tensor has no mask
    for (size_t k : idx) {
      xs.push_back(tensors[k]);
      x_addr.push_back(address(tensors[k]));
      const c10::optional<at::Tensor> m = masks.get(k);
      bits_addr.push_back(m.has_value() ? address(*m) : 0);
    }
    LaunchTable tb = masked ? launch_table(xs, {x_addr, bits_addr}, device, stream)
                            : launch_table(xs, {x_addr}, device, stream);
    if (tb.num_chunks == 0) continue;
    chunks += tb.num_chunks;
    launches.emplace_back(static_cast<Dtype>(dtype), std::move(tb));
  }
  // every launch's partial sums in one buffer: then one sum and one square root (no partials,
  // every tensor empty: 0)
  auto partial = at::empty({chunks}, acc);
  int64_t offset = 0;
  for (const auto& [dtype, tb] : launches) {
    const int64_t* bits_col = masked ? tb.column(3) : nullptr;
    check_launch(wide ? cuda::sum_squares(tb.chunks(), dtype, tb.column(2), bits_col, partial.data_ptr<double>() + offset,
                                          stream)
                      : cuda::sum_squares(tb.chunks(), dtype, tb.column(2), bits_col, partial.data_ptr<float>() + offset,
                                          stream),
                 "grad_norm");
    offset += tb.num_chunks;
  }
  return partial.sum().sqrt();
}

void move_cuda(bool perturb, at::TensorList params, at::TensorList grads,
               const c10::List<c10::optional<at::Tensor>>& masks, at::TensorList backups, const at::Tensor* scale) {
  const char* what = perturb ? "perturb_" : "restore_";
  TORCH_CHECK(masks.size() == params.size() && backups.size() == params.size() &&
                  (!perturb || grads.size() == params.size()),
              what, ": params, ", perturb ? "grads, " : "", "masks and backup must have the same length");
  if (params.empty()) return;
  const at::Device device = params[0].device();
  c10::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  cuda::Scale s{nullptr, nullptr, 0.0};
  at::Tensor scale_dev;  // kept alive until the launch
  if (perturb) {
    check_scale(*scale, what);
    if (scale->is_cuda()) {
      TORCH_CHECK(scale->device() == device, what, ": scale is on ", scale->device(), ", params on ", device);
      if (scale->scalar_type() == at::kDouble) {  // read where it is: a double weight takes it unrounded
        scale_dev = *scale;
        s.ptr64 = scale_dev.data_ptr<double>();
      } else {  // float (no copy) or narrower (widened exactly)
        scale_dev = scale->to(at::kFloat);
        s.ptr = scale_dev.data_ptr<float>();
      }
    } else {
      s.value = scale->item<double>();  // a host value: no copy to the device
    }
  }
  // one launch per (weight dtype, grad dtype, masked)
  std::map<std::tuple<int, int, bool>, std::vector<size_t>> groups;
  std::vector<at::Tensor> grad(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    check_cuda(params[k], device, what, "params", k);
    check_cuda(backups[k], device, what, "backup", k);
    TORCH_CHECK(backups[k].scalar_type() == params[k].scalar_type(), what, ": backup[", k, "] is ",
                backups[k].scalar_type(), ", params[", k, "] is ", params[k].scalar_type());
    const c10::optional<at::Tensor> m = masks.get(k);
    if (m.has_value()) {
      check_bits(*m, params[k], what, k);
    } else {
      TORCH_CHECK(backups[k].numel() == params[k].numel(), what, ": backup[", k, "] must hold the whole tensor (",
                  params[k].numel(), " values), it holds ", backups[k].numel());
    }
    int g = 0;
    if (perturb) {
      grad[k] = grads[k].contiguous();
      check_cuda(grad[k], device, what, "grads", k);
      TORCH_CHECK(grad[k].numel() == params[k].numel(), what, ": grads[", k, "] has ", grad[k].numel(),
                  " elements, params[", k, "] has ", params[k].numel());
      g = static_cast<int>(dtype_of(grad[k], what));
    }
    groups[{static_cast<int>(dtype_of(params[k], what)), g, m.has_value()}].push_back(k);
  }
  for (const auto& [key, idx] : groups) {
    const bool masked = std::get<2>(key);
    std::vector<at::Tensor> ws, bits, outs;
    std::vector<int64_t> w_addr, g_addr, bits_addr, out_addr, out_numel;
    for (size_t k : idx) {
      ws.push_back(params[k]);
      outs.push_back(backups[k]);
      w_addr.push_back(address(params[k]));
      out_addr.push_back(address(backups[k]));
      out_numel.push_back(backups[k].numel());
      if (perturb) g_addr.push_back(address(grad[k]));
      if (masked) {
        bits.push_back(*masks.get(k));
        bits_addr.push_back(address(bits.back()));
      }
    }
    // columns after numel and first chunk: 2 weights, 3 backups, 4 backup sizes, then the
    // bits (if masked), then the grads (if perturbing)
    std::vector<std::vector<int64_t>> columns{w_addr, out_addr, out_numel};
    if (masked) columns.push_back(bits_addr);
    if (perturb) columns.push_back(g_addr);
    const int64_t grads_column = masked ? 6 : 5;
    const LaunchTable tb = launch_table(ws, columns, device, stream);
    if (tb.num_chunks == 0) continue;
    const int64_t* bits_col = masked ? tb.column(5) : nullptr;
    const at::Tensor offsets =
        masked ? chunk_offsets(tb, bits_col, bits, outs, device, stream, what) : at::Tensor();
    const int64_t* offset_ptr = masked ? offsets.data_ptr<int64_t>() : nullptr;
    if (perturb) {
      check_launch(cuda::perturb(tb.chunks(), static_cast<Dtype>(std::get<0>(key)), static_cast<Dtype>(std::get<1>(key)),
                                 tb.column(2), tb.column(grads_column), bits_col, tb.column(3), tb.column(4),
                                 offset_ptr, s, stream),
                   what);
    } else {
      check_launch(cuda::restore(tb.chunks(), static_cast<Dtype>(std::get<0>(key)), tb.column(2), bits_col,
                                 tb.column(3), tb.column(4), offset_ptr, stream),
                   what);
    }
  }
}

void perturb_cuda(at::TensorList params, at::TensorList grads, const c10::List<c10::optional<at::Tensor>>& masks,
                  at::TensorList backups, const at::Tensor& scale) {
  move_cuda(true, params, grads, masks, backups, &scale);
}

void restore_cuda(at::TensorList params, at::TensorList backups, const c10::List<c10::optional<at::Tensor>>& masks) {
  move_cuda(false, params, {}, masks, backups, nullptr);
}

// ---- the planned step (tables checked in plan_tables.h; the kernels in kernels.cu) ------------

cuda::PlanBlocks plan_blocks(const PlanTables& t) {
  return cuda::PlanBlocks{t.blocks, t.blk_tensor, t.blk_start, t.blk_base, t.numel, t.num_blocks};
}

Dtype plan_dtype(at::ScalarType dtype, const char* what) {
  switch (dtype) {
    case at::kFloat: return Dtype::F32;
    case at::kDouble: return Dtype::F64;
    case at::kHalf: return Dtype::F16;
    case at::kBFloat16: return Dtype::BF16;
    default: TORCH_CHECK(false, what, ": CUDA kernels take float64, float32, float16 or bfloat16, got ", dtype);
  }
}

void plan_norm_cuda(const at::Tensor& blocks, const at::Tensor& blk_tensor, const at::Tensor& blk_start,
                    const at::Tensor& numel, const at::Tensor& g_ptrs, const c10::optional<at::Tensor>& bits_ptrs,
                    at::ScalarType dtype, at::Tensor partial, at::Tensor counter, at::Tensor inv, at::Tensor flags,
                    int64_t first, int64_t programs, double eps) {
  const NormArgs a = norm_args(blocks, blk_tensor, blk_start, numel, g_ptrs, bits_ptrs, partial, counter, inv, flags,
                               first, programs);
  c10::DeviceGuard guard(numel.device());
  const auto stream = current_stream(numel.device());
  const Dtype d = plan_dtype(dtype, "plan_norm");
  if (partial.scalar_type() == at::kDouble) {
    check_launch(cuda::plan_norm(plan_blocks(a.t), d, a.g, a.bits, partial.data_ptr<double>(),
                                 counter.data_ptr<int32_t>(), inv.data_ptr<double>(), flags.data_ptr<int64_t>(), first,
                                 programs, eps, stream),
                 "plan_norm");
  } else {
    check_launch(cuda::plan_norm(plan_blocks(a.t), d, a.g, a.bits, partial.data_ptr<float>(),
                                 counter.data_ptr<int32_t>(), inv.data_ptr<float>(), flags.data_ptr<int64_t>(), first,
                                 programs, eps, stream),
                 "plan_norm");
  }
}

void plan_perturb_cuda(const at::Tensor& blocks, const at::Tensor& blk_tensor, const at::Tensor& blk_start,
                       const at::Tensor& blk_base, const at::Tensor& numel, const at::Tensor& w_ptrs,
                       const at::Tensor& g_ptrs, const at::Tensor& bits_ptrs, at::Tensor backup, const at::Tensor& inv,
                       const at::Tensor& flags, const at::Tensor& tensor_rho) {
  const PerturbArgs a = perturb_args(blocks, blk_tensor, blk_start, blk_base, numel, w_ptrs, g_ptrs, bits_ptrs, backup,
                                     inv, flags, tensor_rho);
  c10::DeviceGuard guard(numel.device());
  check_launch(cuda::plan_perturb(plan_blocks(a.t), dtype_of(backup, "plan_perturb"), a.w, a.g, a.bits,
                                  backup.data_ptr(), inv.data_ptr(), inv.scalar_type() == at::kDouble,
                                  flags.data_ptr<int64_t>(), tensor_rho.data_ptr<double>(),
                                  current_stream(numel.device())),
               "plan_perturb");
}

void plan_restore_cuda(const at::Tensor& blocks, const at::Tensor& blk_tensor, const at::Tensor& blk_start,
                       const at::Tensor& blk_base, const at::Tensor& numel, const at::Tensor& w_ptrs,
                       const at::Tensor& bits_ptrs, const at::Tensor& backup) {
  const RestoreArgs a = restore_args(blocks, blk_tensor, blk_start, blk_base, numel, w_ptrs, bits_ptrs, backup);
  c10::DeviceGuard guard(numel.device());
  check_launch(cuda::plan_restore(plan_blocks(a.t), dtype_of(backup, "plan_restore"), a.w, a.bits, backup.data_ptr(),
                                  current_stream(numel.device())),
               "plan_restore");
}

void plan_restore_sgd_cuda(const at::Tensor& blocks, const at::Tensor& blk_tensor, const at::Tensor& blk_start,
                           const at::Tensor& blk_base, const at::Tensor& numel, const at::Tensor& w_ptrs,
                           const at::Tensor& g_ptrs, const at::Tensor& buf_ptrs, const at::Tensor& bits_ptrs,
                           const at::Tensor& backup, const at::Tensor& tensor_group, const at::Tensor& hyper,
                           const at::Tensor& fresh) {
  const RestoreSgdArgs a = restore_sgd_args(blocks, blk_tensor, blk_start, blk_base, numel, w_ptrs, g_ptrs, buf_ptrs,
                                            bits_ptrs, backup, tensor_group, hyper, fresh);
  c10::DeviceGuard guard(numel.device());
  check_launch(cuda::plan_restore_sgd(plan_blocks(a.t), dtype_of(backup, "plan_restore_sgd"), a.w, a.g, a.buf, a.bits,
                                      backup.data_ptr(), a.s.group, a.s.hyper, a.s.fresh,
                                      current_stream(numel.device())),
               "plan_restore_sgd");
}

at::Tensor nm_mask_cuda(const at::Tensor& scores, int64_t n, int64_t m, bool magnitude) {
  TORCH_CHECK(scores.dim() >= 1 && 1 <= n && n < m && m <= kMaxGroup, "nm_mask: need 1 <= n < m <= ", kMaxGroup,
              " and scores of at least one dimension, got n=", n, ", m=", m, ", scores of shape ", scores.sizes());
  c10::DeviceGuard guard(scores.device());
  const auto x = scores.contiguous();
  auto out = at::empty(x.sizes(), x.options().dtype(at::kBool));
  if (x.numel() == 0) return out;
  const int64_t cols = x.size(-1);
  check_launch(cuda::nm_select(dtype_of(x, "nm_mask"), x.data_ptr(), out.data_ptr<bool>(), x.numel() / cols, cols,
                               static_cast<int>(n), static_cast<int>(m), magnitude, current_stream(x.device())),
               "nm_mask");
  return out;
}

std::tuple<at::Tensor, at::Tensor> compress_24_cuda(const at::Tensor& dense, bool check) {
  TORCH_CHECK(dense.dim() == 2 && dense.size(0) % 32 == 0 && dense.size(1) % 32 == 0,
              "compress_24: need a [32*i, 32*j] matrix, got ", dense.sizes());
  check_half_types(dense, "compress_24", "x");
  c10::DeviceGuard guard(dense.device());
  const auto x = dense.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  auto values = at::empty({rows, cols / 2}, x.options());
  auto meta = at::empty({rows, cols / 16}, x.options().dtype(at::kShort));
  constexpr int64_t none = std::numeric_limits<int64_t>::max();
  auto bad = at::full({1}, none, x.options().dtype(at::kLong));
  check_launch(cuda::compress_24(dtype_of(x, "compress_24"), x.data_ptr(), values.data_ptr(),
                                 meta.data_ptr<int16_t>(), bad.data_ptr<int64_t>(), rows, cols,
                                 current_stream(x.device())),
               "compress_24");
  if (!check) return {values, meta};  // check=false can be graph-captured: no host sync
  const int64_t first_bad = bad.item<int64_t>();  // the one host sync of this op
  TORCH_CHECK_VALUE(first_bad == none, "x is not 2:4 sparse: row ", first_bad / (cols / 4), ", group ",
                    first_bad % (cols / 4), " has more than 2 nonzeros");
  return {values, meta};
}

at::Tensor decompress_24_cuda(const at::Tensor& values_in, const at::Tensor& meta_in) {
  check_compressed_24(values_in, meta_in);
  c10::DeviceGuard guard(values_in.device());
  const auto values = values_in.contiguous();
  const auto meta = meta_in.contiguous();
  const int64_t rows = values.size(0), cols = values.size(1) * 2;
  auto dense = at::empty({rows, cols}, values.options());
  check_launch(cuda::decompress_24(dtype_of(values, "decompress_24"), values.data_ptr(), meta.data_ptr<int16_t>(),
                                   dense.data_ptr(), rows, cols, current_stream(values.device())),
               "decompress_24");
  return dense;
}

at::Tensor pack_mask_cuda(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pack_mask: mask must be bool, got ", mask.scalar_type());
  const int64_t n = mask.numel();
  auto flat = at::constant_pad_nd(mask.reshape({-1}).to(at::kInt), {0, (8 - n % 8) % 8}).view({-1, 8});
  const auto weights = at::pow(2, at::arange(8, flat.options()));
  return (flat * weights).sum(1).to(at::kByte);
}

at::Tensor unpack_mask_cuda(const at::Tensor& bits, int64_t numel) {
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.dim() == 1, "unpack_mask: bits must be a 1-D uint8 tensor");
  TORCH_CHECK(bits.numel() == packed_nbytes(numel), "unpack_mask: ", bits.numel(), " bytes for ", numel, " elements");
  const auto weights = at::pow(2, at::arange(8, bits.options().dtype(at::kInt)));
  return (bits.to(at::kInt).unsqueeze(1).bitwise_and(weights) != 0).reshape({-1}).narrow(0, 0, numel);
}

}  // namespace

TORCH_LIBRARY_IMPL(ssam, CUDA, m) {
  m.impl("pack_mask", &pack_mask_cuda);
  m.impl("unpack_mask", &unpack_mask_cuda);
  m.impl("grad_norm", &grad_norm_cuda);
  m.impl("perturb_", &perturb_cuda);
  m.impl("restore_", &restore_cuda);
  m.impl("nm_mask", &nm_mask_cuda);
  m.impl("compress_24", &compress_24_cuda);
  m.impl("decompress_24", &decompress_24_cuda);
  m.impl("plan_norm", &plan_norm_cuda);
  m.impl("plan_perturb", &plan_perturb_cuda);
  m.impl("plan_restore", &plan_restore_cuda);
  m.impl("plan_restore_sgd", &plan_restore_sgd_cuda);
}

}  // namespace ssam
