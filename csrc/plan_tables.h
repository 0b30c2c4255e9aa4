// The tables of a planned SAM step (csrc/sam_step.cpp, cuda/ops_cuda.cpp): checked views. The
// checks cover the tables' dtypes, shapes and devices; the addresses inside them are the
// plan's own (ssam_kernels.SAMStepPlan), which these ops trust: they are internal to it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "ssam_common.h"

namespace ssam {

struct PlanTables {
  const int32_t* blocks;      // the block rows this launch takes
  const int32_t* blk_tensor;  // per block row: its tensor
  const int64_t* blk_start;   // its first element
  const int64_t* blk_base;    // the backup slot of its first kept element (null where unused)
  const int64_t* numel;       // per tensor
  int64_t num_blocks;         // rows taken
};

inline void check_table(const at::Tensor& t, at::ScalarType dtype, const at::Device& device, const char* name,
                        const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous() && t.device() == device, what, ": ",
              name, " must be a contiguous 1-D ", dtype, " tensor on ", device, ", got ", t.scalar_type(), " of shape ",
              t.sizes(), " on ", t.device());
}

inline PlanTables plan_tables(const at::Tensor& blocks, const at::Tensor& blk_tensor, const at::Tensor& blk_start,
                              const c10::optional<at::Tensor>& blk_base, const at::Tensor& numel, const char* what) {
  const auto device = numel.device();
  check_table(numel, at::kLong, device, "numel", what);
  check_table(blocks, at::kInt, device, "blocks", what);
  check_table(blk_tensor, at::kInt, device, "blk_tensor", what);
  check_table(blk_start, at::kLong, device, "blk_start", what);
  TORCH_CHECK(blk_start.numel() == blk_tensor.numel() && blocks.numel() <= blk_tensor.numel(), what,
              ": blk_tensor and blk_start must have one entry per block, and blocks at most as many");
  if (blk_base.has_value()) {
    check_table(*blk_base, at::kLong, device, "blk_base", what);
    TORCH_CHECK(blk_base->numel() == blk_tensor.numel(), what, ": blk_base must have one entry per block");
  }
  return PlanTables{blocks.data_ptr<int32_t>(), blk_tensor.data_ptr<int32_t>(), blk_start.data_ptr<int64_t>(),
                    blk_base.has_value() ? blk_base->data_ptr<int64_t>() : nullptr, numel.data_ptr<int64_t>(),
                    blocks.numel()};
}

// (on the tables' device: a kernel would read a host table's addresses as device memory)
inline const int64_t* table_of(const at::Tensor& t, int64_t tensors, const at::Device& device, const char* name,
                               const char* what) {
  check_table(t, at::kLong, device, name, what);
  TORCH_CHECK(t.numel() == tensors, what, ": ", name, " must hold one address per tensor (", tensors, "), got ",
              t.numel());
  return t.data_ptr<int64_t>();
}

inline void check_backup_buffer(const at::Tensor& backup, const char* what) {
  TORCH_CHECK(at::isFloatingType(backup.scalar_type()) && backup.dim() == 1 && backup.is_contiguous(), what,
              ": backup must be a contiguous 1-D floating tensor (the plan's flat backup), got ", backup.scalar_type(),
              " of shape ", backup.sizes());
}

// The norm's state: partial sums (fp32 or double) with room for [first, first + blocks), an int32
// counter, 1 / (norm + eps) in the partials' dtype, and int64 flags [skipped now, skipped in all].
inline void check_norm_state(const at::Tensor& partial, const at::Tensor& counter, const at::Tensor& inv,
                             const at::Tensor& flags, int64_t first, int64_t programs, int64_t blocks,
                             const char* what) {
  const auto device = partial.device();
  TORCH_CHECK(partial.scalar_type() == at::kFloat || partial.scalar_type() == at::kDouble, what,
              ": partial must be float32 or float64, got ", partial.scalar_type());
  check_table(partial, partial.scalar_type(), device, "partial", what);
  check_table(counter, at::kInt, device, "counter", what);
  check_table(inv, partial.scalar_type(), device, "inv", what);
  check_table(flags, at::kLong, device, "flags", what);
  TORCH_CHECK(counter.numel() >= 1 && inv.numel() >= 1 && flags.numel() >= 2, what,
              ": counter and inv need one entry, flags two");
  TORCH_CHECK(first >= 0 && first + blocks <= programs && programs <= partial.numel(), what, ": blocks [", first, ", ",
              first + blocks, ") of ", programs, " do not fit partial's ", partial.numel(), " entries");
}

inline void check_perturb_state(const at::Tensor& backup, const at::Tensor& inv, const at::Tensor& flags,
                                const at::Tensor& tensor_rho, int64_t tensors, const char* what) {
  check_backup_buffer(backup, what);
  const auto device = backup.device();
  TORCH_CHECK(inv.scalar_type() == at::kFloat || inv.scalar_type() == at::kDouble, what,
              ": inv must be float32 or float64, got ", inv.scalar_type());
  check_table(inv, inv.scalar_type(), device, "inv", what);
  check_table(flags, at::kLong, device, "flags", what);
  check_table(tensor_rho, at::kDouble, device, "tensor_rho", what);
  TORCH_CHECK(tensor_rho.numel() == tensors && inv.numel() >= 1 && flags.numel() >= 2, what,
              ": tensor_rho needs one entry per tensor, inv one, flags two");
}

struct SgdTables {
  const int32_t* group;  // per tensor
  const double* hyper;   // per group: lr, momentum, dampening, weight_decay, nesterov, maximize
  const int8_t* fresh;   // per tensor: 1 where its momentum buffer starts now (buf = d)
};

inline SgdTables sgd_tables(const at::Tensor& tensor_group, const at::Tensor& hyper, const at::Tensor& fresh,
                            int64_t tensors, const char* what) {
  const auto device = hyper.device();
  check_table(tensor_group, at::kInt, device, "tensor_group", what);
  check_table(hyper, at::kDouble, device, "hyper", what);
  check_table(fresh, at::kChar, device, "fresh", what);
  TORCH_CHECK(tensor_group.numel() == tensors && fresh.numel() == tensors && hyper.numel() % 6 == 0, what,
              ": tensor_group and fresh need one entry per tensor, hyper six per group");
  return SgdTables{tensor_group.data_ptr<int32_t>(), hyper.data_ptr<double>(), fresh.data_ptr<int8_t>()};
}

// Each planned op's arguments checked, for both glues (csrc/sam_step.cpp on CPU,
// cuda/ops_cuda.cpp on CUDA): the tables, the per-tensor address tables, the state, and that
// the state lives on the tables' device.

struct NormArgs {
  PlanTables t;
  const int64_t* g;     // per tensor: its gradient (0: none)
  const int64_t* bits;  // per tensor: its mask bits (0: all); null: the full norm
};

inline NormArgs norm_args(const at::Tensor& blocks, const at::Tensor& blk_tensor, const at::Tensor& blk_start,
                          const at::Tensor& numel, const at::Tensor& g_ptrs,
                          const c10::optional<at::Tensor>& bits_ptrs, const at::Tensor& partial,
                          const at::Tensor& counter, const at::Tensor& inv, const at::Tensor& flags, int64_t first,
                          int64_t programs) {
  const char* what = "plan_norm";
  const PlanTables t = plan_tables(blocks, blk_tensor, blk_start, c10::nullopt, numel, what);
  check_norm_state(partial, counter, inv, flags, first, programs, t.num_blocks, what);
  TORCH_CHECK(partial.device() == numel.device(), what, ": the norm's state must be on the tables' device");
  const int64_t n = numel.numel();
  return NormArgs{t, table_of(g_ptrs, n, numel.device(), "g_ptrs", what),
                  bits_ptrs.has_value() ? table_of(*bits_ptrs, n, numel.device(), "bits_ptrs", what) : nullptr};
}

struct PerturbArgs {
  PlanTables t;
  const int64_t* w;     // per tensor: its weights
  const int64_t* g;     // its gradient (0: none)
  const int64_t* bits;  // its mask bits (0: all)
};

inline PerturbArgs perturb_args(const at::Tensor& blocks, const at::Tensor& blk_tensor, const at::Tensor& blk_start,
                                const at::Tensor& blk_base, const at::Tensor& numel, const at::Tensor& w_ptrs,
                                const at::Tensor& g_ptrs, const at::Tensor& bits_ptrs, const at::Tensor& backup,
                                const at::Tensor& inv, const at::Tensor& flags, const at::Tensor& tensor_rho) {
  const char* what = "plan_perturb";
  const PlanTables t = plan_tables(blocks, blk_tensor, blk_start, blk_base, numel, what);
  const int64_t n = numel.numel();
  check_perturb_state(backup, inv, flags, tensor_rho, n, what);
  TORCH_CHECK(backup.device() == numel.device(), what, ": the backup must be on the tables' device");
  const at::Device device = numel.device();
  return PerturbArgs{t, table_of(w_ptrs, n, device, "w_ptrs", what), table_of(g_ptrs, n, device, "g_ptrs", what),
                     table_of(bits_ptrs, n, device, "bits_ptrs", what)};
}

struct RestoreArgs {
  PlanTables t;
  const int64_t* w;
  const int64_t* bits;
};

inline RestoreArgs restore_args(const at::Tensor& blocks, const at::Tensor& blk_tensor, const at::Tensor& blk_start,
                                const at::Tensor& blk_base, const at::Tensor& numel, const at::Tensor& w_ptrs,
                                const at::Tensor& bits_ptrs, const at::Tensor& backup) {
  const char* what = "plan_restore";
  const PlanTables t = plan_tables(blocks, blk_tensor, blk_start, blk_base, numel, what);
  const int64_t n = numel.numel();
  check_backup_buffer(backup, what);
  TORCH_CHECK(backup.device() == numel.device(), what, ": the backup must be on the tables' device");
  const at::Device device = numel.device();
  return RestoreArgs{t, table_of(w_ptrs, n, device, "w_ptrs", what), table_of(bits_ptrs, n, device, "bits_ptrs", what)};
}

struct RestoreSgdArgs {
  PlanTables t;
  const int64_t* w;
  const int64_t* g;
  const int64_t* buf;  // per tensor: its momentum buffer (0: none)
  const int64_t* bits;
  SgdTables s;
};

inline RestoreSgdArgs restore_sgd_args(const at::Tensor& blocks, const at::Tensor& blk_tensor,
                                       const at::Tensor& blk_start, const at::Tensor& blk_base,
                                       const at::Tensor& numel, const at::Tensor& w_ptrs, const at::Tensor& g_ptrs,
                                       const at::Tensor& buf_ptrs, const at::Tensor& bits_ptrs,
                                       const at::Tensor& backup, const at::Tensor& tensor_group,
                                       const at::Tensor& hyper, const at::Tensor& fresh) {
  const char* what = "plan_restore_sgd";
  const PlanTables t = plan_tables(blocks, blk_tensor, blk_start, blk_base, numel, what);
  const int64_t n = numel.numel();
  check_backup_buffer(backup, what);
  TORCH_CHECK(backup.device() == numel.device() && hyper.device() == numel.device(), what,
              ": the backup and the SGD tables must be on the tables' device");
  return RestoreSgdArgs{t,
                        table_of(w_ptrs, n, numel.device(), "w_ptrs", what),
                        table_of(g_ptrs, n, numel.device(), "g_ptrs", what),
                        table_of(buf_ptrs, n, numel.device(), "buf_ptrs", what),
                        table_of(bits_ptrs, n, numel.device(), "bits_ptrs", what),
                        sgd_tables(tensor_group, hyper, fresh, n, what)};
}

}  // namespace ssam
