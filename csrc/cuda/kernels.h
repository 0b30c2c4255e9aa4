// Torch-free interface of the CUDA kernels: raw device pointers, sizes and a cudaStream_t.
// The tensor glue (ops_cuda.cpp) builds the tables; each launcher returns cudaGetLastError().
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../ssam_common.h"

namespace ssam {
namespace cuda {

enum class Dtype : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

constexpr int kThreads = 256;     // threads per block of every kernel
constexpr int64_t kChunk = 8192;  // elements per block of a multi-tensor launch: 32 per thread,
                                  // so a chunk's mask is one 32-bit word per thread

// Multi-tensor layout: block c handles elements [chunk_start[c], +kChunk) of tensor
// chunk_tensor[c]; per-tensor tables (numel, *_ptrs) are indexed by tensor. All on the device.
struct ChunkTable {
  const int64_t* chunk_tensor;
  const int64_t* chunk_start;
  const int64_t* numel;
  int64_t num_chunks;
};

// Mask tables hold the address of each tensor's packed bits (bit i of the tensor is bit i % 8
// of byte i / 8), or 0 for a tensor without a mask (every element selected).

// partial[c] = sum of squares of chunk c (only selected elements where bits_ptrs is non-null),
// accumulated in partial's type: fp32, or double for a float64 norm.
cudaError_t sum_squares(const ChunkTable& t, Dtype x, const int64_t* x_ptrs, const int64_t* bits_ptrs, float* partial,
                        cudaStream_t stream);
cudaError_t sum_squares(const ChunkTable& t, Dtype x, const int64_t* x_ptrs, const int64_t* bits_ptrs, double* partial,
                        cudaStream_t stream);

// counts[c] = set bits of chunk c.
cudaError_t count_bits(const ChunkTable& t, const int64_t* bits_ptrs, int64_t* counts, cudaStream_t stream);

// In place: counts[c] (count_bits' output) -> set bits of chunk c's tensor before chunk c (the
// chunk's first slot in its tensor's compact backup); totals[k] = tensor k's set bits. numel and
// first_chunk: per tensor (device), its length and the index of its first chunk.
cudaError_t chunk_offsets(const int64_t* numel, const int64_t* first_chunk, int64_t num_tensors, int64_t* counts,
                          int64_t* totals, cudaStream_t stream);

// The scale of a perturbation: *ptr64 (a device double) or *ptr (a device float) where one is
// non-null, else value (a host value). Read as a double: a double weight's math takes it
// unrounded, a narrower one's rounds it to float.
struct Scale {
  const float* ptr;
  const double* ptr64;
  double value;
};

// w[m] -> backup (compact where bits_ptrs is non-null: chunk c starts at slot chunk_offset[c]
// of its tensor's backup, and no slot at or past backup_numel[k] is touched; else
// backup[i] = w[i]), then w[m] = w[m] + scale * g[m] in fp32 (in double for double weights).
cudaError_t perturb(const ChunkTable& t, Dtype w, Dtype g, const int64_t* w_ptrs, const int64_t* g_ptrs,
                    const int64_t* bits_ptrs, const int64_t* backup_ptrs, const int64_t* backup_numel,
                    const int64_t* chunk_offset, Scale scale, cudaStream_t stream);

// The inverse: backup -> w[m], bit for bit.
cudaError_t restore(const ChunkTable& t, Dtype w, const int64_t* w_ptrs, const int64_t* bits_ptrs,
                    const int64_t* backup_ptrs, const int64_t* backup_numel, const int64_t* chunk_offset,
                    cudaStream_t stream);

// Top-n of every m (<= 32) consecutive elements of each row of a [rows, cols] matrix.
cudaError_t nm_select(Dtype x, const void* scores, bool* out, int64_t rows, int64_t cols, int n, int m, bool magnitude,
                      cudaStream_t stream);

// 2:4 compression into the CUTLASS layout (rows % 32 == 0, cols % 32 == 0). A group holding more
// than two nonzeros gets zero values and position 0, and *bad (INT64_MAX before the launch) the
// least such group's index, row * (cols / 4) + group.
cudaError_t compress_24(Dtype x, const void* dense, void* values, int16_t* meta, int64_t* bad, int64_t rows,
                        int64_t cols, cudaStream_t stream);
cudaError_t decompress_24(Dtype x, const void* values, const int16_t* meta, void* dense, int64_t rows, int64_t cols,
                          cudaStream_t stream);

// ---- the planned SAM step (ssam_kernels.SAMStepPlan; the C++ CPU twins in csrc/sam_step.cpp) ----

// The tables of a plan: block row blocks[b] (b < num_blocks) covers elements
// [blk_start[row], +kPlanBlock) of tensor blk_tensor[row], its first kept element going to slot
// blk_base[row] of the flat backup. One CUDA block per block row.
struct PlanBlocks {
  const int32_t* blocks;
  const int32_t* blk_tensor;
  const int64_t* blk_start;
  const int64_t* blk_base;
  const int64_t* numel;
  int64_t num_blocks;
};

// partial[first + b]: block b's sum of squares of the gradient (0 where g_ptrs[k] is 0; only
// the kept elements where bits_ptrs is non-null and bits_ptrs[k] is not 0), in A (float or
// double). The last block of `programs` (over the step's launches, counted on `counter`) sums
// the partials in order, writes inv[0] = 1 / (sqrt(sum) + eps) (0 if the sum is not finite),
// flags[0] = not finite, flags[1] += not finite, and resets the counter. A launch of no blocks
// does nothing: with no block in the step at all, the caller writes the empty sum's result.
cudaError_t plan_norm(const PlanBlocks& t, Dtype g, const int64_t* g_ptrs, const int64_t* bits_ptrs, float* partial,
                      int32_t* counter, float* inv, int64_t* flags, int64_t first, int64_t programs, double eps,
                      cudaStream_t stream);
cudaError_t plan_norm(const PlanBlocks& t, Dtype g, const int64_t* g_ptrs, const int64_t* bits_ptrs, double* partial,
                      int32_t* counter, double* inv, int64_t* flags, int64_t first, int64_t programs, double eps,
                      cudaStream_t stream);

// w[m] -> backup, and unless flags[0] or the tensor has no gradient, w[m] += (inv * rho[k]) * g[m]
// (the scale rounded in inv's type, then the math in fp32, double for double weights).
// inv64: inv points at a double (else a float).
cudaError_t plan_perturb(const PlanBlocks& t, Dtype w, const int64_t* w_ptrs, const int64_t* g_ptrs,
                         const int64_t* bits_ptrs, void* backup, const void* inv, bool inv64, const int64_t* flags,
                         const double* rho, cudaStream_t stream);

// backup -> w[m], bit for bit.
cudaError_t plan_restore(const PlanBlocks& t, Dtype w, const int64_t* w_ptrs, const int64_t* bits_ptrs,
                         const void* backup, cudaStream_t stream);

// The restore, then torch.optim.SGD's step with hyper[6 * group[k]] = (lr, momentum, dampening,
// weight_decay, nesterov, maximize) where the tensor has a gradient; a momentum buffer whose
// fresh[k] flag is set starts from the direction.
cudaError_t plan_restore_sgd(const PlanBlocks& t, Dtype w, const int64_t* w_ptrs, const int64_t* g_ptrs,
                             const int64_t* buf_ptrs, const int64_t* bits_ptrs, const void* backup,
                             const int32_t* group, const double* hyper, const int8_t* fresh, cudaStream_t stream);

}  // namespace cuda
}  // namespace ssam
