// CUDA implementations of the `ssam` ops: tensor glue around the torch-free kernels of
// kernels.cu. Only torch headers that a CPU build of torch ships are used (the stream comes from
// c10's device-guard interface), so this file also compiles as a check on machines without CUDA
// torch. One place for the device/dtype/contiguity checks; every launch's error is checked.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <map>
#include <tuple>
#include <vector>

#include "../ssam_common.h"
#include "kernels.h"

namespace ssam {
namespace {

using cuda::ChunkTable;
using cuda::Dtype;

cudaStream_t current_stream(const at::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

Dtype dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::F32;
    case at::kHalf: return Dtype::F16;
    case at::kBFloat16: return Dtype::BF16;
    default: TORCH_CHECK(false, what, ": CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const at::Device& device, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, what, ": every tensor must be on ", device);
  TORCH_CHECK(t.is_contiguous(), what, ": tensors must be contiguous");
}

// Device tables for a group of tensors; the vectors keep the tensors alive until the launch.
struct Tables {
  at::Tensor chunk_tensor, chunk_start, numel;
  ChunkTable table{};
  std::vector<int64_t> first_chunk;
};

Tables chunk_tables(const std::vector<at::Tensor>& ts, const at::Device& device) {
  std::vector<int32_t> chunk_tensor;
  std::vector<int64_t> chunk_start, numel;
  Tables out;
  for (size_t k = 0; k < ts.size(); ++k) {
    out.first_chunk.push_back(static_cast<int64_t>(chunk_start.size()));
    numel.push_back(ts[k].numel());
    for (int64_t s = 0; s < ts[k].numel(); s += cuda::kChunk) {
      chunk_tensor.push_back(static_cast<int32_t>(k));
      chunk_start.push_back(s);
    }
  }
  const auto to_device = [&](auto& v, at::ScalarType type) {
    return at::from_blob(v.data(), {static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(type))
        .to(device, /*non_blocking=*/false, /*copy=*/true);
  };
  out.chunk_tensor = to_device(chunk_tensor, at::kInt);
  out.chunk_start = to_device(chunk_start, at::kLong);
  out.numel = to_device(numel, at::kLong);
  out.table = ChunkTable{out.chunk_tensor.data_ptr<int32_t>(), out.chunk_start.data_ptr<int64_t>(),
                         out.numel.data_ptr<int64_t>(), static_cast<int64_t>(chunk_tensor.size())};
  return out;
}

at::Tensor addresses(const std::vector<at::Tensor>& ts, const at::Device& device) {
  std::vector<int64_t> ptrs;
  for (const auto& t : ts) ptrs.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  return at::from_blob(ptrs.data(), {static_cast<int64_t>(ptrs.size())}, at::TensorOptions().dtype(at::kLong))
      .to(device, false, true);
}

const int64_t* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<int64_t>() : nullptr; }

// Where each chunk's kept values start in its tensor's compact backup (exclusive, per tensor).
// Also checks that every backup holds exactly its mask's count (one host sync): the kernels
// index the backups by slot, so a wrong size would write out of bounds.
at::Tensor chunk_offsets(const Tables& tb, const at::Tensor& bits_addr, const std::vector<at::Tensor>& backups,
                         const at::Device& device, cudaStream_t s) {
  const auto longs = at::TensorOptions().dtype(at::kLong).device(device);
  auto counts = at::empty({tb.table.num_chunks}, longs);
  check_launch(cuda::count_bits(tb.table, ptr(bits_addr), counts.data_ptr<int64_t>(), s), "count_bits");
  const auto owner = tb.chunk_tensor.to(at::kLong);
  std::vector<int64_t> sizes;
  for (const auto& b : backups) sizes.push_back(b.numel());
  const auto per_tensor = at::zeros({static_cast<int64_t>(backups.size())}, longs).index_add_(0, owner, counts);
  TORCH_CHECK(at::equal(per_tensor, at::tensor(sizes, longs.device(at::kCPU)).to(device)),
              "perturb_/restore_: a backup's size differs from its mask's count of set bits");
  const auto before = at::cumsum(counts, 0) - counts;
  const auto first = at::tensor(tb.first_chunk, longs.device(at::kCPU)).to(device);
  return before - before.index_select(0, first.index_select(0, owner));
}

std::vector<size_t> indices(size_t n) {
  std::vector<size_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

// ---- ops ----------------------------------------------------------------------------------

at::Tensor grad_norm_cuda(at::TensorList tensors, const c10::List<c10::optional<at::Tensor>>& masks) {
  TORCH_CHECK(!tensors.empty() && masks.size() == tensors.size(), "grad_norm: one mask entry per tensor");
  const at::Device device = tensors[0].device();
  c10::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const bool masked = [&] {
    for (size_t k = 0; k < masks.size(); ++k)
      if (masks.get(k).has_value()) return true;
    return false;
  }();
  std::map<int, std::vector<size_t>> groups;  // by dtype: one launch each
  for (size_t k = 0; k < tensors.size(); ++k) groups[static_cast<int>(dtype_of(tensors[k], "grad_norm"))].push_back(k);
  auto total = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
  for (const auto& [dtype, idx] : groups) {
    std::vector<at::Tensor> xs, bits;
    for (size_t k : idx) {
      check_cuda(tensors[k], device, "grad_norm");
      xs.push_back(tensors[k]);
      if (masked) {
        const auto m = masks.get(k);  // None: every bit set
        bits.push_back(m.has_value() ? *m
                                     : at::full({packed_nbytes(tensors[k].numel())}, 255,
                                                at::TensorOptions().dtype(at::kByte).device(device)));
        check_cuda(bits.back(), device, "grad_norm");
      }
    }
    const Tables tb = chunk_tables(xs, device);
    if (tb.table.num_chunks == 0) continue;
    auto partial = at::empty({tb.table.num_chunks}, at::TensorOptions().dtype(at::kFloat).device(device));
    const auto x_addr = addresses(xs, device);
    const auto bits_addr = masked ? addresses(bits, device) : at::Tensor();
    check_launch(cuda::sum_squares(tb.table, static_cast<Dtype>(dtype), ptr(x_addr), ptr(bits_addr),
                                   partial.data_ptr<float>(), stream),
                 "grad_norm");
    total = total + partial.sum();
  }
  return total.sqrt();
}

void move_cuda(bool perturb, at::TensorList params, at::TensorList grads,
               const c10::List<c10::optional<at::Tensor>>& masks, at::TensorList backups, const at::Tensor* scale) {
  TORCH_CHECK(!params.empty() && masks.size() == params.size() && backups.size() == params.size() &&
                  (!perturb || grads.size() == params.size()),
              "perturb_/restore_: params, grads, masks and backup must have the same length");
  const at::Device device = params[0].device();
  c10::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  // one launch per (weight dtype, grad dtype, masked)
  std::map<std::tuple<int, int, bool>, std::vector<size_t>> groups;
  for (size_t k : indices(params.size())) {
    check_cuda(params[k], device, "perturb_/restore_");
    check_cuda(backups[k], device, "perturb_/restore_");
    TORCH_CHECK(backups[k].scalar_type() == params[k].scalar_type(), "backup ", k, " must have the param's dtype");
    const int g = perturb ? static_cast<int>(dtype_of(grads[k], "perturb_")) : 0;
    groups[{static_cast<int>(dtype_of(params[k], "perturb_/restore_")), g, masks.get(k).has_value()}].push_back(k);
  }
  for (const auto& [key, idx] : groups) {
    const bool masked = std::get<2>(key);
    std::vector<at::Tensor> ws, gs, bits, outs;
    for (size_t k : idx) {
      ws.push_back(params[k]);
      outs.push_back(backups[k]);
      if (perturb) {
        gs.push_back(grads[k].contiguous());
        check_cuda(gs.back(), device, "perturb_");
        TORCH_CHECK(gs.back().numel() == params[k].numel(), "grads[", k, "] does not match params[", k, "]");
      }
      if (masked) {
        const at::Tensor& b = *masks.get(k);
        check_cuda(b, device, "perturb_/restore_");
        TORCH_CHECK(b.scalar_type() == at::kByte && b.numel() == packed_nbytes(params[k].numel()),
                    "mask bits ", k, " do not fit params[", k, "]");
        bits.push_back(b);
      } else {
        TORCH_CHECK(backups[k].numel() == params[k].numel(), "backup ", k, " must hold the whole tensor");
      }
    }
    const Tables tb = chunk_tables(ws, device);
    if (tb.table.num_chunks == 0) continue;
    const auto w_addr = addresses(ws, device), out_addr = addresses(outs, device);
    const auto bits_addr = masked ? addresses(bits, device) : at::Tensor();
    const at::Tensor offsets = masked ? chunk_offsets(tb, bits_addr, outs, device, stream) : at::Tensor();
    if (perturb) {
      const auto g_addr = addresses(gs, device);
      check_launch(cuda::perturb(tb.table, static_cast<Dtype>(std::get<0>(key)), static_cast<Dtype>(std::get<1>(key)),
                                 ptr(w_addr), ptr(g_addr), ptr(bits_addr), ptr(out_addr),
                                 masked ? offsets.data_ptr<int64_t>() : nullptr, scale->data_ptr<float>(), stream),
                   "perturb_");
    } else {
      check_launch(cuda::restore(tb.table, static_cast<Dtype>(std::get<0>(key)), ptr(w_addr), ptr(bits_addr),
                                 ptr(out_addr), masked ? offsets.data_ptr<int64_t>() : nullptr, stream),
                   "restore_");
    }
  }
}

void perturb_cuda(at::TensorList params, at::TensorList grads, const c10::List<c10::optional<at::Tensor>>& masks,
                  at::TensorList backups, const at::Tensor& scale) {
  const auto s = scale.to(params.empty() ? scale.device() : params[0].device(), at::kFloat).contiguous();
  move_cuda(true, params, grads, masks, backups, &s);
}

void restore_cuda(at::TensorList params, at::TensorList backups, const c10::List<c10::optional<at::Tensor>>& masks) {
  move_cuda(false, params, {}, masks, backups, nullptr);
}

at::Tensor nm_mask_cuda(const at::Tensor& scores, int64_t n, int64_t m, bool magnitude) {
  TORCH_CHECK(scores.dim() >= 1 && 1 <= n && n < m && m <= kMaxGroup, "nm_mask: need 1 <= n < m <= ", kMaxGroup);
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

std::tuple<at::Tensor, at::Tensor> compress_24_cuda(const at::Tensor& dense) {
  TORCH_CHECK(dense.dim() == 2 && dense.size(0) % 32 == 0 && dense.size(1) % 32 == 0,
              "compress_24: need a [32*i, 32*j] matrix");
  c10::DeviceGuard guard(dense.device());
  const auto x = dense.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  auto values = at::empty({rows, cols / 2}, x.options());
  auto meta = at::empty({rows, cols / 16}, x.options().dtype(at::kShort));
  auto bad = at::zeros({1}, x.options().dtype(at::kInt));
  check_launch(cuda::compress_24(dtype_of(x, "compress_24"), x.data_ptr(), values.data_ptr(),
                                 meta.data_ptr<int16_t>(), bad.data_ptr<int32_t>(), rows, cols,
                                 current_stream(x.device())),
               "compress_24");
  TORCH_CHECK_VALUE(bad.item<int32_t>() == 0, "x is not 2:4 sparse: some group has more than 2 nonzeros");
  return {values, meta};
}

at::Tensor decompress_24_cuda(const at::Tensor& values_in, const at::Tensor& meta_in) {
  c10::DeviceGuard guard(values_in.device());
  const auto values = values_in.contiguous();
  const auto meta = meta_in.contiguous();
  const int64_t rows = values.size(0), cols = values.size(1) * 2;
  TORCH_CHECK(meta.scalar_type() == at::kShort && meta.size(0) == rows && meta.size(1) == cols / 16,
              "decompress_24: meta does not match values");
  auto dense = at::empty({rows, cols}, values.options());
  check_launch(cuda::decompress_24(dtype_of(values, "decompress_24"), values.data_ptr(), meta.data_ptr<int16_t>(),
                                   dense.data_ptr(), rows, cols, current_stream(values.device())),
               "decompress_24");
  return dense;
}

at::Tensor pack_mask_cuda(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pack_mask: mask must be bool");
  const int64_t n = mask.numel();
  auto flat = at::constant_pad_nd(mask.reshape({-1}).to(at::kInt), {0, (8 - n % 8) % 8}).view({-1, 8});
  const auto weights = at::pow(2, at::arange(8, flat.options()));
  return (flat * weights).sum(1).to(at::kByte);
}

at::Tensor unpack_mask_cuda(const at::Tensor& bits, int64_t numel) {
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
}

}  // namespace ssam
