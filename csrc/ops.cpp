// Op schemas of the `ssam` library and their C++ CPU kernels.
//
// Same meaning as the plain-PyTorch references in ssam_kernels/ops/*.py (the ground truth in
// tests). Masks come bit-packed (uint8, bit i of the tensor is bit i % 8 of byte i / 8) or as
// None (every element). Inputs are checked in Python; the checks here guard memory safety.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "ssam_common.h"

namespace ssam {
namespace {

constexpr int64_t kChunk = 4096;  // elements per parallel task; a multiple of 8 (whole mask bytes)
constexpr int64_t kBlock = 256;   // elements summed in the lanes' type before the fp64 running sum

inline bool bit_at(const uint8_t* bits, int64_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

// The type the math of a `scalar_t` weight is done in: double for double (float math would
// round w + e to fp32 precision, so w + 0 * g would not be w), float for every narrower type.
template <typename T> using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// v * v where bit is 1, exactly +0 where it is 0 (even for inf/NaN v): branch-free, since
// random masks make branches unpredictable. A: float or double.
template <typename A> inline A masked_square(A v, unsigned bit) {
  using Raw = std::conditional_t<sizeof(A) == 8, uint64_t, uint32_t>;
  const A sq = v * v;
  Raw raw;
  std::memcpy(&raw, &sq, sizeof raw);
  raw &= Raw(0) - Raw(bit);
  A out;
  std::memcpy(&out, &raw, sizeof out);
  return out;
}

// f(i, keep) for i in [begin, end) (begin a multiple of 8), skipping all-zero mask bytes: a
// byte with no set bit never reaches f.
template <typename F> inline void for_each_masked_byte(const uint8_t* bits, int64_t begin, int64_t end, F&& f) {
  int64_t i0 = begin;
  for (; i0 + 8 <= end; i0 += 8) {  // whole bytes: a fixed, unrolled inner loop
    const unsigned byte = bits[i0 >> 3];
    if (byte == 0) continue;
    for (int j = 0; j < 8; ++j) f(i0 + j, (byte >> j) & 1u);
  }
  if (i0 < end) {
    const unsigned byte = bits[i0 >> 3] & ((1u << (end - i0)) - 1u);  // padding bits never count
    if (byte != 0)
      for (int64_t j = 0; j < end - i0; ++j) f(i0 + j, (byte >> j) & 1u);
  }
}

void check_bits(const c10::optional<at::Tensor>& bits, const at::Tensor& like, const char* what, size_t k) {
  if (bits.has_value()) ssam::check_bits(*bits, like, what, k);
}

// ---- pack / unpack --------------------------------------------------------------------------

at::Tensor pack_mask_cpu(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pack_mask: mask must be bool");
  auto flat = mask.contiguous().reshape({-1});
  const int64_t n = flat.numel();
  auto out = at::zeros({packed_nbytes(n)}, flat.options().dtype(at::kByte));
  const bool* m = flat.data_ptr<bool>();
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, out.numel(), 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t v = 0;
      for (int64_t j = 0; j < 8 && b * 8 + j < n; ++j) v |= uint8_t(m[b * 8 + j]) << j;
      o[b] = v;
    }
  });
  return out;
}

at::Tensor unpack_mask_cpu(const at::Tensor& bits, int64_t numel) {
  TORCH_CHECK(bits.numel() == packed_nbytes(numel), "unpack_mask: ", bits.numel(), " bytes for ", numel, " elements");
  auto b = bits.contiguous();
  auto out = at::empty({numel}, b.options().dtype(at::kBool));
  const uint8_t* p = b.data_ptr<uint8_t>();
  bool* o = out.data_ptr<bool>();
  at::parallel_for(0, numel, kChunk, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = bit_at(p, i);
  });
  return out;
}

// ---- gradient norm --------------------------------------------------------------------------

// Sums of squares in lanes of type A (float, or double where the norm is float64) over blocks
// of kBlock elements, the block sums added in fp64; the result in A's dtype.
template <typename A>
at::Tensor grad_norm_as(at::TensorList tensors, const c10::List<c10::optional<at::Tensor>>& masks) {
  double total = 0.0;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const auto t = tensors[k].contiguous();
    const c10::optional<at::Tensor> bits = masks.get(k);
    check_bits(bits, t, "grad_norm", k);
    const uint8_t* b = bits.has_value() ? bits->data_ptr<uint8_t>() : nullptr;
    const int64_t n = t.numel();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> partial(chunks, 0.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "grad_norm_cpu", [&] {
      const scalar_t* x = t.data_ptr<scalar_t>();
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          double chunk_sum = 0.0;
          const int64_t end = std::min(n, (c + 1) * kChunk);
          for (int64_t i0 = c * kChunk; i0 < end; i0 += kBlock) {
            // A over a block in 8 independent lanes (as the GPU kernels' lanes do), then fp64
            A lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            const int64_t stop = std::min(end, i0 + kBlock);
            int64_t i = i0;
            for (; i + 8 <= stop; i += 8) {  // whole mask bytes: a fixed, unrolled inner loop
              const unsigned byte = b ? b[i >> 3] : 0xFFu;
              for (int j = 0; j < 8; ++j) lane[j] += masked_square(static_cast<A>(x[i + j]), (byte >> j) & 1u);
            }
            for (; i < stop; ++i) {
              const A v = static_cast<A>(x[i]);
              lane[i & 7] += (b == nullptr || bit_at(b, i)) ? v * v : A(0);
            }
            for (A l : lane) chunk_sum += l;
          }
          partial[c] = chunk_sum;
        }
      });
    });
    for (double p : partial) total += p;
  }
  return at::scalar_tensor(static_cast<A>(std::sqrt(total)),
                           at::TensorOptions().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat));
}

// A float64 norm where any tensor is float64 (fp32 sums would round its squares to fp32
// precision), else float32.
at::Tensor grad_norm_cpu(at::TensorList tensors, const c10::List<c10::optional<at::Tensor>>& masks) {
  TORCH_CHECK(masks.size() == tensors.size(), "grad_norm: one mask entry per tensor");
  for (const auto& t : tensors)
    if (t.scalar_type() == at::kDouble) return grad_norm_as<double>(tensors, masks);
  return grad_norm_as<float>(tensors, masks);
}

// ---- masked perturbation and exact restore --------------------------------------------------

// Set bits before each chunk of a tensor: where chunk c's values go in the compact backup.
std::vector<int64_t> chunk_offsets(const uint8_t* bits, int64_t n) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> count(chunks + 1, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t s = 0;
      const int64_t end = std::min(n, (c + 1) * kChunk);
      for (int64_t byte = c * kChunk / 8; byte * 8 < end; ++byte) {
        const int64_t valid = std::min<int64_t>(8, end - byte * 8);  // padding bits do not count
        s += __builtin_popcount(bits[byte] & ((1u << valid) - 1u));
      }
      count[c + 1] = s;
    }
  });
  for (int64_t c = 0; c < chunks; ++c) count[c + 1] += count[c];
  return count;
}

// Writes the original values into `backups` (allocated by the caller: the masked count, or the
// whole tensor where the mask is None), so the op returns nothing and functionalizes cleanly.
void perturb_cpu(at::TensorList params, at::TensorList grads, const c10::List<c10::optional<at::Tensor>>& masks,
                 at::TensorList backups, const at::Tensor& scale_t) {
  TORCH_CHECK(grads.size() == params.size() && masks.size() == params.size() && backups.size() == params.size(),
              "perturb_: params, grads, masks and backup must have the same length");
  check_scale(scale_t, "perturb_");
  const double scale64 = scale_t.item<double>();  // exact for a float or double scale
  for (size_t k = 0; k < params.size(); ++k) {
    at::Tensor w = params[k];
    TORCH_CHECK(w.is_contiguous(), "perturb_ (ext): params must be contiguous");
    // the math is in math_t<w's type>: double for a double weight, else float
    const auto g = grads[k].contiguous().to(w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    TORCH_CHECK(g.numel() == w.numel(), "perturb_: grads[", k, "] does not match params[", k, "]");
    const c10::optional<at::Tensor> bits = masks.get(k);
    check_bits(bits, w, "perturb_", k);
    const int64_t n = w.numel();
    at::Tensor backup = backups[k];
    TORCH_CHECK(backup.is_contiguous() && backup.scalar_type() == w.scalar_type(),
                "perturb_: backup ", k, " must be contiguous, of the param's dtype");
    TORCH_CHECK(bits.has_value() || backup.numel() == n, "perturb_: backup ", k, " must hold the whole tensor");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "perturb_cpu", [&] {
      using M = math_t<scalar_t>;
      scalar_t* x = w.data_ptr<scalar_t>();
      scalar_t* out = backup.data_ptr<scalar_t>();
      const M* d = g.data_ptr<M>();
      const M scale = static_cast<M>(scale64);
      // (w + scale * g) in M, one rounding to scalar_t, as the reference computes it
      auto moved = [&](int64_t i) { return static_cast<scalar_t>(static_cast<M>(x[i]) + scale * d[i]); };
      if (!bits.has_value()) {
        at::parallel_for(0, n, kChunk, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            out[i] = x[i];
            x[i] = moved(i);
          }
        });
        return;
      }
      const uint8_t* b = bits->data_ptr<uint8_t>();
      const auto offset = chunk_offsets(b, n);
      TORCH_CHECK(offset.back() == backup.numel(), "perturb_: backup ", k, " holds ", backup.numel(),
                  " values but the mask sets ", offset.back());
      at::parallel_for(0, (int64_t)offset.size() - 1, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          int64_t slot = offset[c];
          scalar_t scratch;  // where a dropped element's copy goes: keeps the loop branch-free
          for_each_masked_byte(b, c * kChunk, std::min(n, (c + 1) * kChunk), [&](int64_t i, bool keep) {
            const scalar_t old = x[i];
            const scalar_t next = moved(i);  // computed either way: the selects stay branch-free
            *(keep ? out + slot : &scratch) = old;
            slot += keep;
            x[i] = keep ? next : old;
          });
        }
      });
    });
  }
}

void restore_cpu(at::TensorList params, at::TensorList backups, const c10::List<c10::optional<at::Tensor>>& masks) {
  TORCH_CHECK(backups.size() == params.size() && masks.size() == params.size(),
              "restore_: params, backup and masks must have the same length");
  for (size_t k = 0; k < params.size(); ++k) {
    at::Tensor w = params[k];
    const auto v = backups[k].contiguous();
    TORCH_CHECK(w.is_contiguous() && v.scalar_type() == w.scalar_type(), "restore_ (ext): contiguous params, backup of their dtype");
    const c10::optional<at::Tensor> bits = masks.get(k);
    check_bits(bits, w, "restore_", k);
    const int64_t n = w.numel();
    if (!bits.has_value()) {
      TORCH_CHECK(v.numel() == n, "restore_: backup ", k, " has the wrong size");
      w.copy_(v.view(w.sizes()));
      continue;
    }
    const uint8_t* b = bits->data_ptr<uint8_t>();
    const auto offset = chunk_offsets(b, n);
    TORCH_CHECK(offset.back() == v.numel(), "restore_: backup ", k, " holds ", v.numel(), " values, the mask sets ",
                offset.back());
    if (v.numel() == 0) continue;  // nothing was perturbed
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "restore_cpu", [&] {
      scalar_t* x = w.data_ptr<scalar_t>();
      const scalar_t* in = v.data_ptr<scalar_t>();
      at::parallel_for(0, (int64_t)offset.size() - 1, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          int64_t slot = offset[c];
          const int64_t last = v.numel() - 1;  // >= 0 here: a chunk with set bits exists
          for_each_masked_byte(b, c * kChunk, std::min(n, (c + 1) * kChunk), [&](int64_t i, bool keep) {
            const scalar_t saved = in[slot < last ? slot : last];  // clamped: always in bounds
            x[i] = keep ? saved : x[i];
            slot += keep;
          });
        }
      });
    });
  }
}

// ---- N:M selection --------------------------------------------------------------------------

at::Tensor nm_mask_cpu(const at::Tensor& scores, int64_t n, int64_t m, bool magnitude) {
  TORCH_CHECK(scores.dim() >= 1 && 1 <= n && n < m && m <= kMaxGroup, "nm_mask: need 1 <= n < m <= ", kMaxGroup);
  const auto x = scores.contiguous();
  const int64_t cols = x.size(-1);
  auto out = at::empty(x.sizes(), x.options().dtype(at::kBool));
  if (x.numel() == 0) return out;
  const int64_t rows = x.numel() / cols;
  const int64_t groups_per_row = (cols + m - 1) / m;
  bool* o = out.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nm_mask_cpu", [&] {
    const scalar_t* s = x.data_ptr<scalar_t>();
    at::parallel_for(0, rows * groups_per_row, 256, [&](int64_t g0, int64_t g1) {
      double v[kMaxGroup];
      for (int64_t gid = g0; gid < g1; ++gid) {
        const int64_t row = gid / groups_per_row, first = (gid % groups_per_row) * m;
        const int64_t len = std::min(m, cols - first);
        const int64_t base = row * cols + first;
        for (int64_t j = 0; j < len; ++j) v[j] = rank_key(static_cast<double>(s[base + j]), magnitude);
        for (int64_t j = 0; j < len; ++j) o[base + j] = group_rank(v, len, j) < n;
      }
    });
  });
  return out;
}

// ---- 2:4 compression (CUTLASS layout) -------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> compress_24_cpu(const at::Tensor& dense, bool check) {
  TORCH_CHECK(dense.dim() == 2 && dense.size(0) % 32 == 0 && dense.size(1) % 32 == 0,
              "compress_24: need a [32*i, 32*j] matrix");
  check_half_types(dense, "compress_24", "x");
  const auto x = dense.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  auto values = at::empty({rows, cols / 2}, x.options());
  auto meta = at::empty({rows, cols / 16}, x.options().dtype(at::kShort));
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "compress_24_cpu", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* v = values.data_ptr<scalar_t>();
    int16_t* mt = meta.data_ptr<int16_t>();
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < cols / 16; ++c) {
          uint32_t word = 0;
          for (int64_t g = 0; g < 4; ++g) {
            const int64_t at = r * cols + c * 16 + g * 4;
            int pattern = 0;
            for (int e = 0; e < 4; ++e) pattern |= (static_cast<float>(in[at + e]) != 0.f) << e;
            const int code = pair_code(pattern);
            const int i0 = code & 3, i1 = code >> 2;
            if (code < 0) {  // not 2:4: an error when checked, zeros otherwise
              int64_t here = r * (cols / 4) + c * 4 + g, seen = bad.load();
              while (here < seen && !bad.compare_exchange_weak(seen, here)) {}
              v[r * (cols / 2) + c * 8 + g * 2] = v[r * (cols / 2) + c * 8 + g * 2 + 1] = scalar_t(0);
              continue;
            }
            v[r * (cols / 2) + c * 8 + g * 2] = in[at + i0];
            v[r * (cols / 2) + c * 8 + g * 2 + 1] = in[at + i1];
            word |= uint32_t(i0 | (i1 << 2)) << (4 * g);
          }
          mt[meta_offset(r, c, rows)] = static_cast<int16_t>(static_cast<uint16_t>(word));
        }
    });
  });
  const int64_t first_bad = bad.load();
  TORCH_CHECK_VALUE(!check || first_bad == std::numeric_limits<int64_t>::max(), "x is not 2:4 sparse: row ",
                    first_bad / (cols / 4), ", group ", first_bad % (cols / 4), " has more than 2 nonzeros");
  return {values, meta};
}

at::Tensor decompress_24_cpu(const at::Tensor& values_in, const at::Tensor& meta_in) {
  check_compressed_24(values_in, meta_in);
  const auto values = values_in.contiguous();
  const auto meta = meta_in.contiguous();
  const int64_t rows = values.size(0), cols = values.size(1) * 2;
  auto dense = at::zeros({rows, cols}, values.options());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(values.scalar_type(), "decompress_24_cpu", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    const int16_t* mt = meta.data_ptr<int16_t>();
    scalar_t* out = dense.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < cols / 16; ++c) {
          const uint32_t word = static_cast<uint16_t>(mt[meta_offset(r, c, rows)]);
          for (int64_t g = 0; g < 4; ++g) {
            const int i0 = (word >> (4 * g)) & 3, i1 = (word >> (4 * g + 2)) & 3;
            const int64_t at = r * cols + c * 16 + g * 4, src = r * (cols / 2) + c * 8 + g * 2;
            out[at + i0] = v[src];
            out[at + i1] = v[src + 1];
          }
        }
    });
  });
  return dense;
}

}  // namespace

TORCH_LIBRARY(ssam, m) {
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("unpack_mask(Tensor bits, int numel) -> Tensor");
  m.def("grad_norm(Tensor[] tensors, Tensor?[] masks) -> Tensor");
  m.def("perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor?[] masks, Tensor(b!)[] backup, Tensor scale) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backup, Tensor?[] masks) -> ()");
  m.def("nm_mask(Tensor scores, int n, int m, bool magnitude) -> Tensor");
  m.def("compress_24(Tensor x, bool check=True) -> (Tensor, Tensor)");
  m.def("decompress_24(Tensor values, Tensor meta) -> Tensor");
}

TORCH_LIBRARY_IMPL(ssam, CPU, m) {
  m.impl("pack_mask", &pack_mask_cpu);
  m.impl("unpack_mask", &unpack_mask_cpu);
  m.impl("grad_norm", &grad_norm_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("nm_mask", &nm_mask_cpu);
  m.impl("compress_24", &compress_24_cpu);
  m.impl("decompress_24", &decompress_24_cpu);
}

}  // namespace ssam
