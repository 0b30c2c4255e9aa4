// CUDA kernels of the ssam extension. No torch headers: see kernels.h for the interface.
//
// Multi-tensor ops run one block per chunk of a tensor list (apex's multi-tensor-apply shape):
// a kernel template takes a small functor that does one op on one chunk. Dense element loops
// use 16-byte vector loads where the chunk is 16-byte aligned; masked compaction uses a
// block-wide prefix count of the mask bits (warp ballots) to give each kept element its slot.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../ssam_common.h"
#include "kernels.h"

namespace ssam {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ bool bit_at(const uint8_t* bits, int64_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

template <typename T> __device__ __forceinline__ T* tensor(const int64_t* ptrs, int32_t k) {
  return reinterpret_cast<T*>(ptrs[k]);
}

// Block-wide sum; every thread gets the result.
template <typename V> __device__ V block_sum(V v) {
  __shared__ V warp_sums[kWarps];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  V total = 0;
  for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  __syncthreads();
  return total;
}

// For one tile of kThreads elements: is element `i` kept, its slot among the tile's kept
// elements, and the tile's kept count (block-wide, from warp ballots).
struct TileSlots {
  int slot;
  int tile_count;
};
__device__ TileSlots tile_slots(bool keep) {
  __shared__ int warp_offset[kWarps + 1];
  const unsigned ballot = __ballot_sync(0xffffffffu, keep);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_offset[warp + 1] = __popc(ballot);
  __syncthreads();
  if (threadIdx.x == 0) {
    warp_offset[0] = 0;
    for (int w = 1; w <= kWarps; ++w) warp_offset[w] += warp_offset[w - 1];
  }
  __syncthreads();
  TileSlots s{warp_offset[warp] + __popc(ballot & ((1u << lane) - 1u)), warp_offset[kWarps]};
  __syncthreads();
  return s;
}

template <typename Op> __global__ void __launch_bounds__(kThreads) multi_tensor_kernel(ChunkTable t, Op op) {
  const int64_t c = blockIdx.x;
  const int32_t k = t.chunk_tensor[c];
  const int64_t start = t.chunk_start[c];
  const int64_t end = start + kChunk < t.numel[k] ? start + kChunk : t.numel[k];
  op(c, k, start, end);
}

// ---- functors ------------------------------------------------------------------------------

template <typename T> struct SumSquares {
  const int64_t* x_ptrs;
  const int64_t* bits_ptrs;  // null: no mask
  float* partial;
  __device__ void operator()(int64_t c, int32_t k, int64_t start, int64_t end) const {
    const T* x = tensor<const T>(x_ptrs, k);
    float acc = 0.f;
    if (bits_ptrs) {
      const uint8_t* bits = tensor<const uint8_t>(bits_ptrs, k);
      for (int64_t i = start + threadIdx.x; i < end; i += kThreads)
        if (bit_at(bits, i)) acc += to_f(x[i]) * to_f(x[i]);
    } else {
      constexpr int kVec = 16 / sizeof(T);
      int64_t i0 = start;
      if (reinterpret_cast<uintptr_t>(x + start) % 16 == 0) {  // 16-byte loads for the aligned body
        const int64_t body = (end - start) / kVec;
        const uint4* v = reinterpret_cast<const uint4*>(x + start);
        for (int64_t j = threadIdx.x; j < body; j += kThreads) {
          const uint4 raw = v[j];
          const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int q = 0; q < kVec; ++q) acc += to_f(e[q]) * to_f(e[q]);
        }
        i0 = start + body * kVec;
      }
      for (int64_t i = i0 + threadIdx.x; i < end; i += kThreads) acc += to_f(x[i]) * to_f(x[i]);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[c] = acc;
  }
};

struct CountBits {
  const int64_t* bits_ptrs;
  int64_t* counts;
  __device__ void operator()(int64_t c, int32_t k, int64_t start, int64_t end) const {
    const uint8_t* bits = tensor<const uint8_t>(bits_ptrs, k);
    int n = 0;
    for (int64_t i = start + threadIdx.x; i < end; i += kThreads) n += bit_at(bits, i);
    n = block_sum(n);
    if (threadIdx.x == 0) counts[c] = n;
  }
};

template <typename T, typename G, bool kPerturb> struct Move {
  const int64_t* w_ptrs;
  const int64_t* g_ptrs;
  const int64_t* bits_ptrs;  // null: no mask, backup is the whole tensor
  const int64_t* backup_ptrs;
  const int64_t* chunk_offset;
  const float* scale;
  __device__ void operator()(int64_t c, int32_t k, int64_t start, int64_t end) const {
    T* w = tensor<T>(w_ptrs, k);
    T* backup = tensor<T>(backup_ptrs, k);
    const G* g = kPerturb ? tensor<const G>(g_ptrs, k) : nullptr;
    const float s = kPerturb ? *scale : 0.f;
    auto move = [&](int64_t i, int64_t slot) {
      if (kPerturb) {
        const T old = w[i];
        backup[slot] = old;
        const float step = s * to_f(g[i]);  // rounded before the add, as the reference does
        w[i] = from_f<T>(to_f(old) + step);
      } else {
        w[i] = backup[slot];
      }
    };
    if (!bits_ptrs) {
      for (int64_t i = start + threadIdx.x; i < end; i += kThreads) move(i, i);
      return;
    }
    const uint8_t* bits = tensor<const uint8_t>(bits_ptrs, k);
    int64_t base = chunk_offset[c];
    for (int64_t tile = start; tile < end; tile += kThreads) {  // every thread runs every tile
      const int64_t i = tile + threadIdx.x;
      const bool keep = i < end && bit_at(bits, i);
      const TileSlots slots = tile_slots(keep);
      if (keep) move(i, base + slots.slot);
      base += slots.tile_count;
    }
  }
};

template <typename Op> cudaError_t launch(const ChunkTable& t, const Op& op, cudaStream_t stream) {
  if (t.num_chunks > 0) multi_tensor_kernel<<<static_cast<unsigned>(t.num_chunks), kThreads, 0, stream>>>(t, op);
  return cudaGetLastError();
}

// Calls f(T{}) with the C++ type of a Dtype.
template <typename F> cudaError_t dispatch(Dtype d, F f) {
  switch (d) {
    case Dtype::F32: return f(float{});
    case Dtype::F16: return f(__half{});
    case Dtype::BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// ---- N:M selection and 2:4 compression ----------------------------------------------------

template <typename T>
__global__ void nm_select_kernel(const T* s, bool* out, int64_t rows, int64_t cols, int n, int m, bool magnitude) {
  const int64_t groups_per_row = (cols + m - 1) / m;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gid >= rows * groups_per_row) return;
  const int64_t row = gid / groups_per_row, first = (gid % groups_per_row) * m;
  const int64_t len = cols - first < m ? cols - first : m;
  const int64_t base = row * cols + first;
  double v[kMaxGroup];
  for (int64_t j = 0; j < len; ++j) v[j] = rank_key(static_cast<double>(to_f(s[base + j])), magnitude);
  for (int64_t j = 0; j < len; ++j) out[base + j] = group_rank(v, len, j) < n;
}

template <typename T>
__global__ void compress_24_kernel(const T* x, T* values, int16_t* meta, int32_t* bad, int64_t rows, int64_t cols) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // one (row, 16 columns)
  if (id >= rows * (cols / 16)) return;
  const int64_t r = id / (cols / 16), c = id % (cols / 16);
  uint32_t word = 0;
  for (int g = 0; g < 4; ++g) {
    const int64_t at = r * cols + c * 16 + g * 4;
    int pattern = 0;
    for (int e = 0; e < 4; ++e) pattern |= (to_f(x[at + e]) != 0.f) << e;
    const int code = pair_code(pattern);
    const int i0 = code & 3, i1 = code >> 2;
    if (code < 0) {
      *bad = 1;
      return;
    }
    values[r * (cols / 2) + c * 8 + g * 2] = x[at + i0];
    values[r * (cols / 2) + c * 8 + g * 2 + 1] = x[at + i1];
    word |= static_cast<uint32_t>(i0 | (i1 << 2)) << (4 * g);
  }
  meta[meta_offset(r, c, rows)] = static_cast<int16_t>(static_cast<uint16_t>(word));
}

template <typename T>
__global__ void decompress_24_kernel(const T* values, const int16_t* meta, T* dense, int64_t rows, int64_t cols) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= rows * (cols / 16)) return;
  const int64_t r = id / (cols / 16), c = id % (cols / 16);
  const uint32_t word = static_cast<uint16_t>(meta[meta_offset(r, c, rows)]);
  for (int g = 0; g < 4; ++g) {
    const int i0 = (word >> (4 * g)) & 3, i1 = (word >> (4 * g + 2)) & 3;
    const int64_t at = r * cols + c * 16 + g * 4, src = r * (cols / 2) + c * 8 + g * 2;
    for (int e = 0; e < 4; ++e) dense[at + e] = e == i0 ? values[src] : (e == i1 ? values[src + 1] : from_f<T>(0.f));
  }
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

// ---- launchers -----------------------------------------------------------------------------

cudaError_t sum_squares(const ChunkTable& t, Dtype x, const int64_t* x_ptrs, const int64_t* bits_ptrs, float* partial,
                        cudaStream_t stream) {
  return dispatch(x, [&](auto v) {
    using T = decltype(v);
    return launch(t, SumSquares<T>{x_ptrs, bits_ptrs, partial}, stream);
  });
}

cudaError_t count_bits(const ChunkTable& t, const int64_t* bits_ptrs, int64_t* counts, cudaStream_t stream) {
  return launch(t, CountBits{bits_ptrs, counts}, stream);
}

cudaError_t perturb(const ChunkTable& t, Dtype w, Dtype g, const int64_t* w_ptrs, const int64_t* g_ptrs,
                    const int64_t* bits_ptrs, const int64_t* backup_ptrs, const int64_t* chunk_offset,
                    const float* scale, cudaStream_t stream) {
  return dispatch(w, [&](auto wv) {
    using T = decltype(wv);
    return dispatch(g, [&](auto gv) {
      using G = decltype(gv);
      return launch(t, Move<T, G, true>{w_ptrs, g_ptrs, bits_ptrs, backup_ptrs, chunk_offset, scale}, stream);
    });
  });
}

cudaError_t restore(const ChunkTable& t, Dtype w, const int64_t* w_ptrs, const int64_t* bits_ptrs,
                    const int64_t* backup_ptrs, const int64_t* chunk_offset, cudaStream_t stream) {
  return dispatch(w, [&](auto wv) {
    using T = decltype(wv);
    return launch(t, Move<T, T, false>{w_ptrs, nullptr, bits_ptrs, backup_ptrs, chunk_offset, nullptr}, stream);
  });
}

cudaError_t nm_select(Dtype x, const void* scores, bool* out, int64_t rows, int64_t cols, int n, int m, bool magnitude,
                      cudaStream_t stream) {
  const int64_t groups = rows * ((cols + m - 1) / m);
  if (groups == 0) return cudaGetLastError();
  return dispatch(x, [&](auto v) {
    using T = decltype(v);
    nm_select_kernel<T><<<blocks_for(groups), kThreads, 0, stream>>>(static_cast<const T*>(scores), out, rows, cols,
                                                                      n, m, magnitude);
    return cudaGetLastError();
  });
}

cudaError_t compress_24(Dtype x, const void* dense, void* values, int16_t* meta, int32_t* bad, int64_t rows,
                        int64_t cols, cudaStream_t stream) {
  const int64_t words = rows * (cols / 16);
  if (words == 0) return cudaGetLastError();
  return dispatch(x, [&](auto v) {
    using T = decltype(v);
    compress_24_kernel<T><<<blocks_for(words), kThreads, 0, stream>>>(static_cast<const T*>(dense),
                                                                       static_cast<T*>(values), meta, bad, rows, cols);
    return cudaGetLastError();
  });
}

cudaError_t decompress_24(Dtype x, const void* values, const int16_t* meta, void* dense, int64_t rows, int64_t cols,
                          cudaStream_t stream) {
  const int64_t words = rows * (cols / 16);
  if (words == 0) return cudaGetLastError();
  return dispatch(x, [&](auto v) {
    using T = decltype(v);
    decompress_24_kernel<T><<<blocks_for(words), kThreads, 0, stream>>>(static_cast<const T*>(values), meta,
                                                                         static_cast<T*>(dense), rows, cols);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace ssam
