// Torch-free interface of the CUDA kernels: raw device pointers, sizes and a cudaStream_t.
// The tensor glue (ops_cuda.cpp) builds the tables; each launcher returns cudaGetLastError().
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

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

// 2:4 compression into the CUTLASS layout (rows % 32 == 0, cols % 32 == 0); *bad is set to 1
// if some group holds more than two nonzeros.
cudaError_t compress_24(Dtype x, const void* dense, void* values, int16_t* meta, int32_t* bad, int64_t rows,
                        int64_t cols, cudaStream_t stream);
cudaError_t decompress_24(Dtype x, const void* values, const int16_t* meta, void* dense, int64_t rows, int64_t cols,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace ssam
