// The planned SAM step (ssam_kernels/ops/sam_step.py, class SAMStepPlan): op schemas and C++ CPU
// kernels. The CUDA kernels are in cuda/kernels.cu, their glue in cuda/ops_cuda.cpp.
//
// A plan's tables (built once per mask in Python) give every block of kPlanBlock elements its
// tensor, first element and the backup slot of its first kept element; per tensor its length and
// the addresses of its weights, gradient (0: none), mask bits (0: unmasked) and momentum buffer.
// The weights, gradients and buffers are reached through those addresses, not as arguments: the
// ops are for eager execution and CUDA graphs, not for tracing. Same math as the Triton kernels
// and the reference: fp32 (double for double weights), no FMA contraction (-ffp-contract=off),
// scale = (1 / (sqrt(sum of squares) + eps)) * rho rounded in the norm's dtype, then
// w + scale * g; a sum that is not finite perturbs nothing and counts a skip. The SGD step is
// torch's op for op, with a fused multiply-add exactly where torch's add(..., alpha=a) has one.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "plan_tables.h"

namespace ssam {
namespace {

template <typename T> using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T> T* at_address(const int64_t* ptrs, int64_t k) { return reinterpret_cast<T*>(ptrs[k]); }

inline bool bit_at(const uint8_t* bits, int64_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

// The block rows a launch takes: tables.row(b) for b in [0, tables.num_blocks).
template <typename F> void for_each_block(const PlanTables& t, F&& f) {
  at::parallel_for(0, t.num_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c = t.blocks[b];
      const int64_t k = t.blk_tensor[c];
      const int64_t start = t.blk_start[c];
      const int64_t end = std::min(t.numel[k], start + kPlanBlock);
      f(b, c, k, start, end);
    }
  });
}

template <typename A>
void norm_as(const PlanTables& t, at::ScalarType dtype, const int64_t* g_ptrs, const int64_t* bits_ptrs, A* partial,
             A* inv, int64_t* flags, int64_t first, int64_t programs, double eps) {
  // as on CUDA, a launch of no blocks does nothing: the caller writes the empty norm's result
  if (t.num_blocks == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "plan_norm_cpu", [&] {
    for_each_block(t, [&](int64_t b, int64_t, int64_t k, int64_t start, int64_t end) {
      A acc = 0;
      const scalar_t* g = at_address<const scalar_t>(g_ptrs, k);
      const uint8_t* bits = bits_ptrs ? at_address<const uint8_t>(bits_ptrs, k) : nullptr;
      if (g != nullptr) {
        for (int64_t i = start; i < end; ++i) {
          if (bits && !bit_at(bits, i)) continue;
          const A v = static_cast<A>(g[i]);
          acc += v * v;
        }
      }
      partial[first + b] = acc;
    });
  });
  if (first + t.num_blocks < programs) return;  // the last launch of the step sums up
  A total = 0;
  for (int64_t i = 0; i < programs; ++i) total += partial[i];
  const bool finite = std::isfinite(total);
  inv[0] = finite ? A(1) / (std::sqrt(total) + static_cast<A>(eps)) : A(0);
  flags[0] = finite ? 0 : 1;
  flags[1] += finite ? 0 : 1;
}

void plan_norm_cpu(const at::Tensor& blocks, const at::Tensor& blk_tensor, const at::Tensor& blk_start,
                   const at::Tensor& numel, const at::Tensor& g_ptrs, const c10::optional<at::Tensor>& bits_ptrs,
                   at::ScalarType dtype, at::Tensor partial, at::Tensor counter, at::Tensor inv, at::Tensor flags,
                   int64_t first, int64_t programs, double eps) {
  const NormArgs a = norm_args(blocks, blk_tensor, blk_start, numel, g_ptrs, bits_ptrs, partial, counter, inv, flags,
                               first, programs);
  if (partial.scalar_type() == at::kDouble) {
    norm_as<double>(a.t, dtype, a.g, a.bits, partial.data_ptr<double>(), inv.data_ptr<double>(),
                    flags.data_ptr<int64_t>(), first, programs, eps);
  } else {
    norm_as<float>(a.t, dtype, a.g, a.bits, partial.data_ptr<float>(), inv.data_ptr<float>(),
                   flags.data_ptr<int64_t>(), first, programs, eps);
  }
}

// Calls f(i, slot) for the kept elements of a block in order (slot: its place in the backup),
// or for every element (slot = i - start + base) where the tensor has no mask.
template <typename F> void kept(const uint8_t* bits, int64_t start, int64_t end, int64_t base, F&& f) {
  int64_t slot = base;
  for (int64_t i = start; i < end; ++i) {
    if (bits == nullptr) {
      f(i, base + (i - start));
    } else if (bit_at(bits, i)) {
      f(i, slot++);
    }
  }
}

void plan_perturb_cpu(const at::Tensor& blocks, const at::Tensor& blk_tensor, const at::Tensor& blk_start,
                      const at::Tensor& blk_base, const at::Tensor& numel, const at::Tensor& w_ptrs,
                      const at::Tensor& g_ptrs, const at::Tensor& bits_ptrs, at::Tensor backup, const at::Tensor& inv,
                      const at::Tensor& flags, const at::Tensor& tensor_rho) {
  const PerturbArgs a = perturb_args(blocks, blk_tensor, blk_start, blk_base, numel, w_ptrs, g_ptrs, bits_ptrs, backup,
                                     inv, flags, tensor_rho);
  const PlanTables& t = a.t;
  const int64_t *w_at = a.w, *g_at = a.g, *b_at = a.bits;
  const bool move = flags.data_ptr<int64_t>()[0] == 0;
  const double* rho = tensor_rho.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, backup.scalar_type(), "plan_perturb_cpu", [&] {
    using C = math_t<scalar_t>;
    scalar_t* saved = backup.data_ptr<scalar_t>();
    for_each_block(t, [&](int64_t, int64_t c, int64_t k, int64_t start, int64_t end) {
      scalar_t* w = at_address<scalar_t>(w_at, k);
      const scalar_t* g = at_address<const scalar_t>(g_at, k);
      // reciprocal(norm + eps) * rho in the norm's dtype, then in the math dtype
      const C scale = inv.scalar_type() == at::kDouble
                          ? static_cast<C>(inv.data_ptr<double>()[0] * rho[k])
                          : static_cast<C>(inv.data_ptr<float>()[0] * static_cast<float>(rho[k]));
      kept(at_address<const uint8_t>(b_at, k), start, end, t.blk_base[c], [&](int64_t i, int64_t slot) {
        const scalar_t old = w[i];
        saved[slot] = old;
        if (g != nullptr && move) {
          const C step = scale * static_cast<C>(g[i]);
          w[i] = static_cast<scalar_t>(static_cast<C>(old) + step);
        }
      });
    });
  });
}

void plan_restore_cpu(const at::Tensor& blocks, const at::Tensor& blk_tensor, const at::Tensor& blk_start,
                      const at::Tensor& blk_base, const at::Tensor& numel, const at::Tensor& w_ptrs,
                      const at::Tensor& bits_ptrs, const at::Tensor& backup) {
  const RestoreArgs a = restore_args(blocks, blk_tensor, blk_start, blk_base, numel, w_ptrs, bits_ptrs, backup);
  const PlanTables& t = a.t;
  const int64_t *w_at = a.w, *b_at = a.bits;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, backup.scalar_type(), "plan_restore_cpu", [&] {
    const scalar_t* saved = backup.data_ptr<scalar_t>();
    for_each_block(t, [&](int64_t, int64_t c, int64_t k, int64_t start, int64_t end) {
      scalar_t* w = at_address<scalar_t>(w_at, k);
      kept(at_address<const uint8_t>(b_at, k), start, end, t.blk_base[c], [&](int64_t i, int64_t slot) {
        w[i] = saved[slot];
      });
    });
  });
}

void plan_restore_sgd_cpu(const at::Tensor& blocks, const at::Tensor& blk_tensor, const at::Tensor& blk_start,
                          const at::Tensor& blk_base, const at::Tensor& numel, const at::Tensor& w_ptrs,
                          const at::Tensor& g_ptrs, const at::Tensor& buf_ptrs, const at::Tensor& bits_ptrs,
                          const at::Tensor& backup, const at::Tensor& tensor_group, const at::Tensor& hyper,
                          const at::Tensor& fresh) {
  const RestoreSgdArgs a = restore_sgd_args(blocks, blk_tensor, blk_start, blk_base, numel, w_ptrs, g_ptrs, buf_ptrs,
                                            bits_ptrs, backup, tensor_group, hyper, fresh);
  const PlanTables& t = a.t;
  const SgdTables& s = a.s;
  const int64_t *w_at = a.w, *g_at = a.g, *m_at = a.buf, *b_at = a.bits;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, backup.scalar_type(), "plan_restore_sgd_cpu", [&] {
    using C = math_t<scalar_t>;
    const scalar_t* saved = backup.data_ptr<scalar_t>();
    for_each_block(t, [&](int64_t, int64_t c, int64_t k, int64_t start, int64_t end) {
      scalar_t* w = at_address<scalar_t>(w_at, k);
      const scalar_t* g = at_address<const scalar_t>(g_at, k);
      scalar_t* buf = at_address<scalar_t>(m_at, k);
      kept(at_address<const uint8_t>(b_at, k), start, end, t.blk_base[c], [&](int64_t i, int64_t slot) {
        w[i] = saved[slot];  // the restore; the SGD step below reads every element
      });
      if (g == nullptr) return;  // no gradient: torch's SGD leaves the tensor alone
      const double* h = s.hyper + 6 * s.group[k];
      // torch's alphas: -lr, momentum, 1 - dampening (computed in double), weight_decay
      const C neg_lr = static_cast<C>(-h[0]), momentum = static_cast<C>(h[1]), undamped = static_cast<C>(1 - h[2]);
      const C weight_decay = static_cast<C>(h[3]);
      const bool nesterov = h[4] != 0, maximize = h[5] != 0, fresh_buf = s.fresh[k] != 0;
      // momentum and weight decay tested as torch's SGD tests them, in double: a value that
      // rounds to 0 in C still keeps a buffer (and its dampening) and adds w * 0 (NaN at inf)
      const bool use_buf = h[1] != 0 && buf != nullptr, decay = h[3] != 0;
      // torch's SGD op for op: each add(..., alpha=a) one fused multiply-add (as torch's CPU and
      // CUDA kernels compute it), every other op rounded (this file has no contraction)
      for (int64_t i = start; i < end; ++i) {
        const C x = static_cast<C>(w[i]);
        C d = static_cast<C>(g[i]);
        if (maximize) d = -d;
        if (decay) d = std::fma(x, weight_decay, d);
        if (use_buf) {
          const C b = fresh_buf ? d : std::fma(d, undamped, static_cast<C>(buf[i]) * momentum);
          buf[i] = static_cast<scalar_t>(b);
          d = nesterov ? std::fma(b, momentum, d) : b;
        }
        w[i] = static_cast<scalar_t>(std::fma(d, neg_lr, x));
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssam, m) {
  m.def("plan_norm(Tensor blocks, Tensor blk_tensor, Tensor blk_start, Tensor numel, Tensor g_ptrs, "
        "Tensor? bits_ptrs, ScalarType dtype, Tensor(a!) partial, Tensor(b!) counter, Tensor(c!) inv, "
        "Tensor(d!) flags, int first, int programs, float eps) -> ()");
  m.def("plan_perturb(Tensor blocks, Tensor blk_tensor, Tensor blk_start, Tensor blk_base, Tensor numel, "
        "Tensor w_ptrs, Tensor g_ptrs, Tensor bits_ptrs, Tensor(a!) backup, Tensor inv, Tensor flags, "
        "Tensor tensor_rho) -> ()");
  m.def("plan_restore(Tensor blocks, Tensor blk_tensor, Tensor blk_start, Tensor blk_base, Tensor numel, "
        "Tensor w_ptrs, Tensor bits_ptrs, Tensor backup) -> ()");
  m.def("plan_restore_sgd(Tensor blocks, Tensor blk_tensor, Tensor blk_start, Tensor blk_base, Tensor numel, "
        "Tensor w_ptrs, Tensor g_ptrs, Tensor buf_ptrs, Tensor bits_ptrs, Tensor backup, Tensor tensor_group, "
        "Tensor hyper, Tensor fresh) -> ()");
}

TORCH_LIBRARY_IMPL(ssam, CPU, m) {
  m.impl("plan_norm", &plan_norm_cpu);
  m.impl("plan_perturb", &plan_perturb_cpu);
  m.impl("plan_restore", &plan_restore_cpu);
  m.impl("plan_restore_sgd", &plan_restore_sgd_cpu);
}

}  // namespace ssam
