// CUDA kernels of the ssam extension. No torch headers: see kernels.h for the interface.
//
// Multi-tensor ops run one block per chunk of a tensor list (apex's multi-tensor-apply shape):
// a kernel template takes a small functor that does one op on one chunk. The sum of squares
// reads an unmasked chunk in 16-byte vectors where it is 16-byte aligned; the loops that store
// (perturb, restore, the planned step) load a batch of elements before storing any (BatchOf),
// so each thread keeps several loads in flight. A masked chunk reads its mask once, as one
// 32-bit word per thread into shared memory; a block-wide scan of the words' bit counts gives
// each kept element its slot in the compact backup.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../ssam_common.h"
#include "kernels.h"

namespace ssam {
namespace cuda {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kWordsPerChunk = static_cast<int>(kChunk / 32);
static_assert(kWordsPerChunk == kThreads, "one 32-bit mask word per thread and chunk");

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<double>(double x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_f<double>(float x) { return static_cast<double>(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The type a weight's math is done in: double for double (float math would round w + e to fp32
// precision, so w + 0 * g would not be w), float for every narrower type.
template <typename T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };

// x as C (float or double): exact, except a double narrowed to float (rounded once).
template <typename C, typename T> __device__ __forceinline__ C to_c(T x) { return static_cast<C>(to_f(x)); }
template <> __device__ __forceinline__ double to_c<double, double>(double x) { return x; }

// x (a C) rounded once to T.
template <typename T, typename C> __device__ __forceinline__ T from_c(C x) { return from_f<T>(x); }
template <> __device__ __forceinline__ double from_c<double, double>(double x) { return x; }

// Rank key type of an N:M score: float holds every dtype's values exactly but double's.
template <typename T> struct KeyOf { using type = float; };
template <> struct KeyOf<double> { using type = double; };
template <typename T> __device__ __forceinline__ typename KeyOf<T>::type key_of(T x) { return to_f(x); }
template <> __device__ __forceinline__ double key_of<double>(double x) { return x; }

template <typename T> __device__ __forceinline__ T* tensor(const int64_t* ptrs, int64_t k) {
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

// Block-wide exclusive prefix sum of one int per thread (warp shuffles, one barrier).
__device__ int block_exclusive_scan(int v) {
  __shared__ int warp_totals[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inclusive = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += y;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += warp_totals[w];
  return before + inclusive - v;
}

// Bits [first, first + 32) of a tensor's packed mask as one word (bit j: element first + j),
// bits at or past the tensor's end `n` cleared. One aligned 32-bit load where the word lies
// inside the mask's bytes, byte loads at a misaligned or final word.
__device__ __forceinline__ uint32_t mask_word(const uint8_t* bits, int64_t first, int64_t n) {
  if (first >= n) return 0u;
  const int64_t byte0 = first >> 3, nbytes = (n + 7) >> 3;
  uint32_t word = 0u;
  if (byte0 + 4 <= nbytes && (reinterpret_cast<uintptr_t>(bits + byte0) & 3u) == 0u) {
    word = *reinterpret_cast<const uint32_t*>(bits + byte0);
  } else {
    for (int b = 0; b < 4 && byte0 + b < nbytes; ++b) word |= static_cast<uint32_t>(bits[byte0 + b]) << (8 * b);
  }
  const int64_t valid = n - first;
  return valid < 32 ? word & ((1u << valid) - 1u) : word;
}

// The mask of one chunk in shared memory: words[q] covers chunk elements [32q, 32q + 32).
// Element start + threadIdx.x + kThreads * j (the coalesced order every loop below uses) is
// bit (threadIdx.x & 31) of words[(threadIdx.x >> 5) + kWarps * j]: one warp reads one word.
struct ChunkMask {
  uint32_t* words;
  __device__ void load(const uint8_t* bits, int64_t start, int64_t n) {
    words[threadIdx.x] = mask_word(bits, start + 32 * static_cast<int64_t>(threadIdx.x), n);
    __syncthreads();
  }
  __device__ __forceinline__ int word_index(int j) const { return (threadIdx.x >> 5) + kWarps * j; }
};

template <typename Op> __global__ void __launch_bounds__(kThreads) multi_tensor_kernel(ChunkTable t, Op op) {
  const int64_t c = blockIdx.x;
  const int64_t k = t.chunk_tensor[c];
  const int64_t start = t.chunk_start[c];
  op(c, k, start, t.numel[k]);
}

// ---- functors: op(chunk, tensor, first element, tensor length) -------------------------------

// A: the accumulator, float or double (a float64 norm)
template <typename T, typename A> struct SumSquares {
  const int64_t* x_ptrs;
  const int64_t* bits_ptrs;  // null: no masks; an entry of 0: that tensor has none
  A* partial;
  __device__ void operator()(int64_t c, int64_t k, int64_t start, int64_t n) const {
    const T* x = tensor<const T>(x_ptrs, k);
    const int64_t end = start + kChunk < n ? start + kChunk : n;
    const uint8_t* bits = bits_ptrs ? tensor<const uint8_t>(bits_ptrs, k) : nullptr;
    A acc = 0;
    if (bits) {  // uniform per block
      __shared__ uint32_t words[kWordsPerChunk];
      ChunkMask mask{words};
      mask.load(bits, start, n);
      const int lane = threadIdx.x & 31;
      for (int j = 0; j < kChunk / kThreads; ++j) {
        const uint32_t word = mask.words[mask.word_index(j)];
        if (word == 0u) continue;  // warp-uniform: the warp shares the word
        if ((word >> lane) & 1u) {
          const A v = to_c<A>(x[start + threadIdx.x + static_cast<int64_t>(kThreads) * j]);
          acc += v * v;
        }
      }
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
          for (int q = 0; q < kVec; ++q) acc += to_c<A>(e[q]) * to_c<A>(e[q]);
        }
        i0 = start + body * kVec;
      }
      for (int64_t i = i0 + threadIdx.x; i < end; i += kThreads) acc += to_c<A>(x[i]) * to_c<A>(x[i]);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[c] = acc;
  }
};

struct CountBits {
  const int64_t* bits_ptrs;
  int64_t* counts;
  __device__ void operator()(int64_t c, int64_t k, int64_t start, int64_t n) const {
    const uint8_t* bits = tensor<const uint8_t>(bits_ptrs, k);
    const int total = block_sum(__popc(mask_word(bits, start + 32 * static_cast<int64_t>(threadIdx.x), n)));
    if (threadIdx.x == 0) counts[c] = total;
  }
};

// In place, per chunk: counts[c] (set bits of chunk c) -> set bits of its tensor before chunk c;
// totals[k] = tensor k's set bits. One block per tensor, its chunks kThreads * kScanPerThread at
// a time (a thread sums its run of chunks, a block scan of the sums, a carry between steps), so
// a 38M-element embedding's 4.7k chunks take 3 steps.
constexpr int kScanPerThread = 8;

__global__ void __launch_bounds__(kThreads)
    chunk_offsets_kernel(const int64_t* numel, const int64_t* first_chunk, int64_t* counts, int64_t* totals) {
  const int64_t k = blockIdx.x;
  const int64_t chunks = (numel[k] + kChunk - 1) / kChunk;
  int64_t* row = counts + first_chunk[k];
  int64_t carry = 0;
  for (int64_t s = 0; s < chunks; s += static_cast<int64_t>(kThreads) * kScanPerThread) {  // block-uniform
    const int64_t i0 = s + static_cast<int64_t>(threadIdx.x) * kScanPerThread;
    int v[kScanPerThread];  // a chunk's count is at most kChunk: a step's sum fits an int
    int sum = 0;
#pragma unroll
    for (int j = 0; j < kScanPerThread; ++j) {
      v[j] = i0 + j < chunks ? static_cast<int>(row[i0 + j]) : 0;
      sum += v[j];
    }
    int before = block_exclusive_scan(sum);
#pragma unroll
    for (int j = 0; j < kScanPerThread; ++j) {
      if (i0 + j < chunks) row[i0 + j] = carry + before;
      before += v[j];
    }
    carry += block_sum(sum);  // (its barriers also end the scan's reads of its shared totals)
  }
  if (threadIdx.x == 0) totals[k] = carry;
}

// Elements a thread loads before it stores any. The tensors' addresses come from tables, so
// the compiler must assume a store may alias the next load and cannot hoist a load above a
// store: element by element, a thread had one load in flight at a time, which leaves a
// bandwidth-bound kernel latency-bound. A batch of loads first, then its stores, keeps
// kBatch (4 for 8-byte types: registers) loads in flight per thread.
template <typename T> struct BatchOf { static constexpr int value = sizeof(T) > 4 ? 4 : 8; };

template <typename T, typename G, bool kPerturb> struct Move {
  const int64_t* w_ptrs;
  const int64_t* g_ptrs;
  const int64_t* bits_ptrs;  // null: no mask, backup is the whole tensor
  const int64_t* backup_ptrs;
  const int64_t* backup_numel;
  const int64_t* chunk_offset;
  Scale scale;
  __device__ void operator()(int64_t c, int64_t k, int64_t start, int64_t n) const {
    T* w = tensor<T>(w_ptrs, k);
    T* backup = tensor<T>(backup_ptrs, k);
    const G* g = kPerturb ? tensor<const G>(g_ptrs, k) : nullptr;
    using C = typename MathOf<T>::type;
    const double s64 = !kPerturb ? 0.0 : scale.ptr64 ? *scale.ptr64 : scale.ptr ? *scale.ptr : scale.value;
    const C s = static_cast<C>(s64);
    struct Loaded {
      T old;  // perturb: w[i]; restore: backup[slot]
      G grad;
    };
    auto load = [&](int64_t i, int64_t slot) {
      Loaded v;
      if (kPerturb) {
        v.old = w[i];
        v.grad = g[i];
      } else {
        v.old = backup[slot];
      }
      return v;
    };
    auto store = [&](int64_t i, int64_t slot, const Loaded& v) {
      if (kPerturb) {
        backup[slot] = v.old;
        const C step = s * to_c<C>(v.grad);  // rounded before the add, as the reference does
        w[i] = from_c<T>(to_c<C>(v.old) + step);
      } else {
        w[i] = v.old;
      }
    };
    constexpr int U = BatchOf<T>::value;
    constexpr int kPer = static_cast<int>(kChunk / kThreads);
    static_assert(kPer % U == 0, "whole batches per chunk");
    if (!bits_ptrs) {
      const int64_t end = start + kChunk < n ? start + kChunk : n;
      for (int j0 = 0; j0 < kPer; j0 += U) {
        Loaded v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t i = start + threadIdx.x + static_cast<int64_t>(kThreads) * (j0 + u);
          if (i < end) v[u] = load(i, i);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t i = start + threadIdx.x + static_cast<int64_t>(kThreads) * (j0 + u);
          if (i < end) store(i, i, v[u]);
        }
      }
      return;
    }
    // Each kept element's slot: the chunk's offset, the kept elements of the words before its
    // word (a block-wide scan of the words' bit counts), and those below it in its word.
    __shared__ uint32_t words[kWordsPerChunk];
    __shared__ int64_t word_slot[kWordsPerChunk];
    ChunkMask mask{words};
    mask.load(tensor<const uint8_t>(bits_ptrs, k), start, n);
    word_slot[threadIdx.x] = chunk_offset[c] + block_exclusive_scan(__popc(words[threadIdx.x]));
    __syncthreads();
    const int64_t capacity = backup_numel[k];  // never touched past it, whatever the mask says
    const int lane = threadIdx.x & 31;
    const uint32_t below = (1u << lane) - 1u;
    // element j of this thread's walk: its index, its slot, and whether it is kept (its bit set
    // and its slot inside the backup; the bits past the tensor's end are clear)
    auto at = [&](int j, int64_t& i, int64_t& slot) {
      const int q = mask.word_index(j);
      const uint32_t word = mask.words[q];
      i = start + 32 * static_cast<int64_t>(q) + lane;
      slot = word_slot[q] + __popc(word & below);
      return ((word >> lane) & 1u) != 0 && slot < capacity;
    };
    for (int j0 = 0; j0 < kPer; j0 += U) {
      Loaded v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        int64_t i, slot;
        if (at(j0 + u, i, slot)) v[u] = load(i, slot);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        int64_t i, slot;
        if (at(j0 + u, i, slot)) store(i, slot, v[u]);
      }
    }
  }
};

// A launcher that launches nothing returns cudaSuccess, not cudaGetLastError(): an error left
// pending by another op is not its own (and would be cleared in its name).
template <typename Op> cudaError_t launch(const ChunkTable& t, const Op& op, cudaStream_t stream) {
  if (t.num_chunks == 0) return cudaSuccess;
  multi_tensor_kernel<<<static_cast<unsigned>(t.num_chunks), kThreads, 0, stream>>>(t, op);
  return cudaGetLastError();
}

// Calls f(T{}) with the C++ type of a Dtype.
template <typename F> cudaError_t dispatch(Dtype d, F f) {
  switch (d) {
    case Dtype::F32: return f(float{});
    case Dtype::F64: return f(double{});
    case Dtype::F16: return f(__half{});
    case Dtype::BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// ---- N:M selection and 2:4 compression ----------------------------------------------------

// One thread per element: a block holds kThreads / m whole groups (rows laid end to end, a
// row's last group possibly short), their rank keys in shared memory; an element's rank is
// the number of its group's elements that beat it, so no per-thread array (no local memory).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    nm_select_kernel(const T* s, bool* out, int64_t rows, int64_t cols, int n, int m, bool magnitude) {
  using K = typename KeyOf<T>::type;
  __shared__ K keys[kThreads];
  const int per_block = kThreads / m;
  const int q = threadIdx.x / m, j = threadIdx.x % m;  // group within the block, position within it
  const int64_t groups_per_row = (cols + m - 1) / m;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * per_block + q;
  const int64_t row = gid / groups_per_row, first = (gid % groups_per_row) * m;
  const bool in_group = q < per_block && gid < rows * groups_per_row;
  const int len = in_group ? static_cast<int>(cols - first < m ? cols - first : m) : 0;
  const int64_t at = row * cols + first + j;
  if (j < len) keys[threadIdx.x] = rank_key(key_of(s[at]), magnitude);
  __syncthreads();
  if (j >= len) return;
  const K mine = keys[threadIdx.x];
  const K* group = keys + q * m;
  int beaten_by = 0;
  for (int k = 0; k < len; ++k) beaten_by += (group[k] > mine) || (group[k] == mine && k < j);
  out[at] = beaten_by < n;
}

template <typename T>
__global__ void compress_24_kernel(const T* x, T* values, int16_t* meta, int64_t* bad, int64_t rows, int64_t cols) {
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
    if (code < 0) {  // not 2:4: an error when checked, zeros otherwise (the other groups stay exact)
      atomicMin(reinterpret_cast<unsigned long long*>(bad), static_cast<unsigned long long>(r * (cols / 4) + c * 4 + g));
      values[r * (cols / 2) + c * 8 + g * 2] = values[r * (cols / 2) + c * 8 + g * 2 + 1] = from_f<T>(0.f);
      continue;
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
    // i1 first: metadata naming one position twice keeps the second value there (the CPU's order)
    for (int e = 0; e < 4; ++e) dense[at + e] = e == i1 ? values[src + 1] : (e == i0 ? values[src] : from_f<T>(0.f));
  }
}

// ---- the planned step ----------------------------------------------------------------------

static_assert(kPlanBlock == kChunk, "a plan's block is one chunk: one 32-bit mask word per thread");

struct PlanBlock {
  int64_t row, k, start, n, end;
};

__device__ __forceinline__ PlanBlock plan_block(const PlanBlocks& t) {
  PlanBlock b;
  b.row = t.blocks[blockIdx.x];
  b.k = t.blk_tensor[b.row];
  b.start = t.blk_start[b.row];
  b.n = t.numel[b.k];
  b.end = b.start + kChunk < b.n ? b.start + kChunk : b.n;
  return b;
}

// For every element i of the block this thread takes, v = load(i, kept, slot) and then
// store(i, kept, slot, v), a batch of U loads before the batch's stores (see BatchOf): kept =
// its mask bit (true where the tensor has no mask), slot = its place in the backup (from
// `base`: the kept elements before it). Unmasked: coalesced order; masked: one mask word per
// warp (see ChunkMask).
template <int U, typename Load, typename Store>
__device__ void walk_block(const uint8_t* bits, const PlanBlock& b, int64_t base, Load&& load, Store&& store) {
  using V = decltype(load(int64_t{}, true, int64_t{}));
  constexpr int kPer = static_cast<int>(kChunk / kThreads);
  static_assert(kPer % U == 0, "whole batches per block");
  if (bits == nullptr) {
    for (int j0 = 0; j0 < kPer; j0 += U) {
      V v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = b.start + threadIdx.x + static_cast<int64_t>(kThreads) * (j0 + u);
        if (i < b.end) v[u] = load(i, true, base + (i - b.start));
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = b.start + threadIdx.x + static_cast<int64_t>(kThreads) * (j0 + u);
        if (i < b.end) store(i, true, base + (i - b.start), v[u]);
      }
    }
    return;
  }
  __shared__ uint32_t words[kWordsPerChunk];
  __shared__ int64_t word_slot[kWordsPerChunk];
  ChunkMask mask{words};
  mask.load(bits, b.start, b.n);
  word_slot[threadIdx.x] = base + block_exclusive_scan(__popc(words[threadIdx.x]));
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const uint32_t below = (1u << lane) - 1u;
  auto at = [&](int j, int64_t& i, int64_t& slot) {  // element j of this thread's walk: kept?
    const int q = mask.word_index(j);
    const uint32_t word = mask.words[q];
    i = b.start + 32 * static_cast<int64_t>(q) + lane;
    slot = word_slot[q] + __popc(word & below);
    return ((word >> lane) & 1u) != 0;
  };
  for (int j0 = 0; j0 < kPer; j0 += U) {
    V v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      int64_t i, slot;
      const bool kept = at(j0 + u, i, slot);
      if (i < b.end) v[u] = load(i, kept, slot);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      int64_t i, slot;
      const bool kept = at(j0 + u, i, slot);
      if (i < b.end) store(i, kept, slot, v[u]);
    }
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    plan_norm_kernel(PlanBlocks t, const int64_t* g_ptrs, const int64_t* bits_ptrs, A* partial, int32_t* counter,
                     A* inv, int64_t* flags, int64_t first, int64_t programs, A eps) {
  const PlanBlock b = plan_block(t);
  const T* g = tensor<const T>(g_ptrs, b.k);
  A acc = 0;
  if (g != nullptr) {  // uniform per block
    const uint8_t* bits = bits_ptrs ? tensor<const uint8_t>(bits_ptrs, b.k) : nullptr;
    walk_block<BatchOf<T>::value>(
        bits, b, 0, [&](int64_t i, bool kept, int64_t) { return kept ? to_c<A>(g[i]) : A(0); },
        [&](int64_t, bool, int64_t, A v) { acc += v * v; });
  }
  acc = block_sum(acc);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partial[first + blockIdx.x] = acc;
    __threadfence();  // the partial before the count (release)
    last = atomicAdd(counter, 1) == programs - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();  // the others' partials after the count (acquire)
  A total = 0;  // a fixed order: the same sum whichever block is last
  // (one load per block of the step, about 170 a thread for GPT-2 medium's 43k: unrolled, so a thread has
  // many loads in flight; the adds stay in order)
#pragma unroll 16
  for (int64_t i = threadIdx.x; i < programs; i += kThreads) total += __ldcg(partial + i);
  total = block_sum(total);
  if (threadIdx.x == 0) {
    const bool finite = isfinite(total);
    inv[0] = finite ? A(1) / (sqrt(total) + eps) : A(0);
    flags[0] = finite ? 0 : 1;
    flags[1] += finite ? 0 : 1;
    atomicExch(counter, 0);  // ready for the next step, and for a graph replay
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    plan_perturb_kernel(PlanBlocks t, const int64_t* w_ptrs, const int64_t* g_ptrs, const int64_t* bits_ptrs,
                        T* backup, const A* inv, const int64_t* flags, const double* rho) {
  using C = typename MathOf<T>::type;
  const PlanBlock b = plan_block(t);
  T* w = tensor<T>(w_ptrs, b.k);
  const T* g = tensor<const T>(g_ptrs, b.k);
  // reciprocal(norm + eps) * rho in the norm's type, then the math type, as torch computes it
  const C scale = static_cast<C>(inv[0] * static_cast<A>(rho[b.k]));
  const bool move = flags[0] == 0 && g != nullptr;
  struct Loaded {
    T old, grad;
  };
  walk_block<BatchOf<T>::value>(
      tensor<const uint8_t>(bits_ptrs, b.k), b, t.blk_base[b.row],
      [&](int64_t i, bool kept, int64_t) {
        Loaded v{};
        if (kept) {
          v.old = w[i];
          if (move) v.grad = g[i];
        }
        return v;
      },
      [&](int64_t i, bool kept, int64_t slot, const Loaded& v) {
        if (!kept) return;
        backup[slot] = v.old;
        if (move) {
          const C step = scale * to_c<C>(v.grad);  // rounded before the add, as the reference does
          w[i] = from_c<T>(to_c<C>(v.old) + step);
        }
      });
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    plan_restore_kernel(PlanBlocks t, const int64_t* w_ptrs, const int64_t* bits_ptrs, const T* backup) {
  const PlanBlock b = plan_block(t);
  T* w = tensor<T>(w_ptrs, b.k);
  walk_block<BatchOf<T>::value>(
      tensor<const uint8_t>(bits_ptrs, b.k), b, t.blk_base[b.row],
      [&](int64_t, bool kept, int64_t slot) { return kept ? backup[slot] : T(); },
      [&](int64_t i, bool kept, int64_t, T v) {
        if (kept) w[i] = v;
      });
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    plan_restore_sgd_kernel(PlanBlocks t, const int64_t* w_ptrs, const int64_t* g_ptrs, const int64_t* buf_ptrs,
                            const int64_t* bits_ptrs, const T* backup, const int32_t* group, const double* hyper,
                            const int8_t* fresh) {
  using C = typename MathOf<T>::type;
  const PlanBlock b = plan_block(t);
  T* w = tensor<T>(w_ptrs, b.k);
  const T* g = tensor<const T>(g_ptrs, b.k);
  T* buf = buf_ptrs ? tensor<T>(buf_ptrs, b.k) : nullptr;
  const double* h = hyper + 6 * group[b.k];
  // torch's alphas: -lr, momentum, 1 - dampening (computed in double), weight_decay
  const C neg_lr = static_cast<C>(-h[0]), momentum = static_cast<C>(h[1]), undamped = static_cast<C>(1 - h[2]);
  const C weight_decay = static_cast<C>(h[3]);
  const bool nesterov = h[4] != 0, maximize = h[5] != 0, start_buf = fresh[b.k] != 0;
  // tested in double, as torch's SGD does (a value that rounds to 0 in C still counts)
  const bool use_buf = h[1] != 0 && buf != nullptr, decay = h[3] != 0;
  struct Loaded {
    T weight, grad, buf;
  };
  walk_block<BatchOf<T>::value>(
      tensor<const uint8_t>(bits_ptrs, b.k), b, t.blk_base[b.row],
      [&](int64_t i, bool kept, int64_t slot) {
        Loaded v{};
        if (kept) {
          v.weight = backup[slot];
        } else if (g != nullptr) {
          v.weight = w[i];
        }
        if (g != nullptr) {
          v.grad = g[i];
          if (use_buf && !start_buf) v.buf = buf[i];
        }
        return v;
      },
      [&](int64_t i, bool kept, int64_t, const Loaded& v) {
        if (g == nullptr) {  // no gradient: torch's SGD leaves the tensor alone; put it back only
          if (kept) w[i] = v.weight;
          return;
        }
        // torch's SGD op for op: each add(..., alpha=a) one fused multiply-add, every other op
        // rounded (--fmad=false)
        const C x = to_c<C>(v.weight);
        C d = to_c<C>(v.grad);
        if (maximize) d = -d;
        if (decay) d = fma(x, weight_decay, d);
        if (use_buf) {
          const C m = start_buf ? d : fma(d, undamped, to_c<C>(v.buf) * momentum);
          buf[i] = from_c<T>(m);
          d = nesterov ? fma(m, momentum, d) : m;
        }
        w[i] = from_c<T>(fma(d, neg_lr, x));
      });
}

template <typename A>
cudaError_t plan_norm_in(const PlanBlocks& t, Dtype g, const int64_t* g_ptrs, const int64_t* bits_ptrs, A* partial,
                         int32_t* counter, A* inv, int64_t* flags, int64_t first, int64_t programs, double eps,
                         cudaStream_t stream) {
  if (t.num_blocks == 0) return cudaSuccess;
  return dispatch(g, [&](auto v) {
    using T = decltype(v);
    plan_norm_kernel<T, A><<<static_cast<unsigned>(t.num_blocks), kThreads, 0, stream>>>(
        t, g_ptrs, bits_ptrs, partial, counter, inv, flags, first, programs, static_cast<A>(eps));
    return cudaGetLastError();
  });
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// sum_squares with the accumulator A (float, or double for a float64 norm)
template <typename A>
cudaError_t sum_squares_in(const ChunkTable& t, Dtype x, const int64_t* x_ptrs, const int64_t* bits_ptrs, A* partial,
                           cudaStream_t stream) {
  return dispatch(x, [&](auto v) {
    using T = decltype(v);
    return launch(t, SumSquares<T, A>{x_ptrs, bits_ptrs, partial}, stream);
  });
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------

cudaError_t sum_squares(const ChunkTable& t, Dtype x, const int64_t* x_ptrs, const int64_t* bits_ptrs, float* partial,
                        cudaStream_t stream) {
  return sum_squares_in(t, x, x_ptrs, bits_ptrs, partial, stream);
}

cudaError_t sum_squares(const ChunkTable& t, Dtype x, const int64_t* x_ptrs, const int64_t* bits_ptrs, double* partial,
                        cudaStream_t stream) {
  return sum_squares_in(t, x, x_ptrs, bits_ptrs, partial, stream);
}

cudaError_t count_bits(const ChunkTable& t, const int64_t* bits_ptrs, int64_t* counts, cudaStream_t stream) {
  return launch(t, CountBits{bits_ptrs, counts}, stream);
}

cudaError_t chunk_offsets(const int64_t* numel, const int64_t* first_chunk, int64_t num_tensors, int64_t* counts,
                          int64_t* totals, cudaStream_t stream) {
  if (num_tensors == 0) return cudaSuccess;
  chunk_offsets_kernel<<<static_cast<unsigned>(num_tensors), kThreads, 0, stream>>>(numel, first_chunk, counts, totals);
  return cudaGetLastError();
}

cudaError_t perturb(const ChunkTable& t, Dtype w, Dtype g, const int64_t* w_ptrs, const int64_t* g_ptrs,
                    const int64_t* bits_ptrs, const int64_t* backup_ptrs, const int64_t* backup_numel,
                    const int64_t* chunk_offset, Scale scale, cudaStream_t stream) {
  return dispatch(w, [&](auto wv) {
    using T = decltype(wv);
    return dispatch(g, [&](auto gv) {
      using G = decltype(gv);
      return launch(t, Move<T, G, true>{w_ptrs, g_ptrs, bits_ptrs, backup_ptrs, backup_numel, chunk_offset, scale},
                    stream);
    });
  });
}

cudaError_t restore(const ChunkTable& t, Dtype w, const int64_t* w_ptrs, const int64_t* bits_ptrs,
                    const int64_t* backup_ptrs, const int64_t* backup_numel, const int64_t* chunk_offset,
                    cudaStream_t stream) {
  return dispatch(w, [&](auto wv) {
    using T = decltype(wv);
    return launch(t, Move<T, T, false>{w_ptrs, nullptr, bits_ptrs, backup_ptrs, backup_numel, chunk_offset, Scale{}},
                  stream);
  });
}

cudaError_t plan_norm(const PlanBlocks& t, Dtype g, const int64_t* g_ptrs, const int64_t* bits_ptrs, float* partial,
                      int32_t* counter, float* inv, int64_t* flags, int64_t first, int64_t programs, double eps,
                      cudaStream_t stream) {
  return plan_norm_in(t, g, g_ptrs, bits_ptrs, partial, counter, inv, flags, first, programs, eps, stream);
}

cudaError_t plan_norm(const PlanBlocks& t, Dtype g, const int64_t* g_ptrs, const int64_t* bits_ptrs, double* partial,
                      int32_t* counter, double* inv, int64_t* flags, int64_t first, int64_t programs, double eps,
                      cudaStream_t stream) {
  return plan_norm_in(t, g, g_ptrs, bits_ptrs, partial, counter, inv, flags, first, programs, eps, stream);
}

cudaError_t plan_perturb(const PlanBlocks& t, Dtype w, const int64_t* w_ptrs, const int64_t* g_ptrs,
                         const int64_t* bits_ptrs, void* backup, const void* inv, bool inv64, const int64_t* flags,
                         const double* rho, cudaStream_t stream) {
  if (t.num_blocks == 0) return cudaSuccess;
  return dispatch(w, [&](auto v) {
    using T = decltype(v);
    const unsigned grid = static_cast<unsigned>(t.num_blocks);
    if (inv64) {
      plan_perturb_kernel<T, double><<<grid, kThreads, 0, stream>>>(
          t, w_ptrs, g_ptrs, bits_ptrs, static_cast<T*>(backup), static_cast<const double*>(inv), flags, rho);
    } else {
      plan_perturb_kernel<T, float><<<grid, kThreads, 0, stream>>>(
          t, w_ptrs, g_ptrs, bits_ptrs, static_cast<T*>(backup), static_cast<const float*>(inv), flags, rho);
    }
    return cudaGetLastError();
  });
}

cudaError_t plan_restore(const PlanBlocks& t, Dtype w, const int64_t* w_ptrs, const int64_t* bits_ptrs,
                         const void* backup, cudaStream_t stream) {
  if (t.num_blocks == 0) return cudaSuccess;
  return dispatch(w, [&](auto v) {
    using T = decltype(v);
    plan_restore_kernel<T><<<static_cast<unsigned>(t.num_blocks), kThreads, 0, stream>>>(
        t, w_ptrs, bits_ptrs, static_cast<const T*>(backup));
    return cudaGetLastError();
  });
}

cudaError_t plan_restore_sgd(const PlanBlocks& t, Dtype w, const int64_t* w_ptrs, const int64_t* g_ptrs,
                             const int64_t* buf_ptrs, const int64_t* bits_ptrs, const void* backup,
                             const int32_t* group, const double* hyper, const int8_t* fresh, cudaStream_t stream) {
  if (t.num_blocks == 0) return cudaSuccess;
  return dispatch(w, [&](auto v) {
    using T = decltype(v);
    plan_restore_sgd_kernel<T><<<static_cast<unsigned>(t.num_blocks), kThreads, 0, stream>>>(
        t, w_ptrs, g_ptrs, buf_ptrs, bits_ptrs, static_cast<const T*>(backup), group, hyper, fresh);
    return cudaGetLastError();
  });
}

cudaError_t nm_select(Dtype x, const void* scores, bool* out, int64_t rows, int64_t cols, int n, int m, bool magnitude,
                      cudaStream_t stream) {
  const int64_t groups = rows * ((cols + m - 1) / m);
  if (groups == 0) return cudaSuccess;
  const int64_t per_block = kThreads / m;
  const int64_t blocks = (groups + per_block - 1) / per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return dispatch(x, [&](auto v) {
    using T = decltype(v);
    nm_select_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<const T*>(scores), out, rows, cols,
                                                                      n, m, magnitude);
    return cudaGetLastError();
  });
}

cudaError_t compress_24(Dtype x, const void* dense, void* values, int16_t* meta, int64_t* bad, int64_t rows,
                        int64_t cols, cudaStream_t stream) {
  const int64_t words = rows * (cols / 16);
  if (words == 0) return cudaSuccess;
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
  if (words == 0) return cudaSuccess;
  return dispatch(x, [&](auto v) {
    using T = decltype(v);
    decompress_24_kernel<T><<<blocks_for(words), kThreads, 0, stream>>>(static_cast<const T*>(values), meta,
                                                                         static_cast<T*>(dense), rows, cols);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace ssam
