// Facts and helpers shared by the C++ CPU kernels and the CUDA kernels. Free of torch headers
// so .cu files that include it compile with plain nvcc.
#pragma once

#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define SSAM_HD __host__ __device__ __forceinline__
#else
#define SSAM_HD inline
#endif

namespace ssam {

constexpr int64_t kMaxGroup = 32;  // largest M of an N:M selection
constexpr int64_t kPlanBlock = 8192;  // elements per block of a planned step's tables (ext backend)

constexpr double kInfinity = std::numeric_limits<double>::infinity();

SSAM_HD int64_t packed_nbytes(int64_t numel) { return (numel + 7) / 8; }

// Rank key of a score: |s| (or s), NaN ranking below every number, as in the reference.
// K: double, or float where every score converts to it exactly (fp32, fp16, bf16).
template <typename K> SSAM_HD K rank_key(K s, bool magnitude) {
  if (s != s) return static_cast<K>(-kInfinity);
  return magnitude && s < 0 ? -s : s;
}

// How many elements of a group beat element j: larger, or equal at a lower index.
SSAM_HD int64_t group_rank(const double* v, int64_t len, int64_t j) {
  int64_t r = 0;
  for (int64_t k = 0; k < len; ++k) r += (v[k] > v[j]) || (v[k] == v[j] && k < j);
  return r;
}

// Nonzero pattern of a group of 4 (bit e: element e nonzero) -> the two positions stored in
// the CUTLASS 2:4 layout, as a nibble i0 | i1 << 2; -1 for more than two nonzeros. The table of
// ssam_kernels.ops.compress_24 packed into constants (device code cannot read host arrays).
constexpr uint64_t kPairCodes = 0xe0dce098e498eull;   // nibble p: the code of pattern p
constexpr uint32_t kPairValid = 0x177f;                  // bit p: pattern p has <= 2 nonzeros
SSAM_HD int pair_code(int pattern) {
  return ((kPairValid >> pattern) & 1) ? static_cast<int>((kPairCodes >> (4 * pattern)) & 0xF) : -1;
}

// Flat position of logical int16 metadata element [r, c] in CUTLASS's interleaved layout:
// rows shuffled within blocks of 32, off-diagonals of each 2x2 block swapped, then
// ColumnMajorInterleaved<2>.
SSAM_HD int64_t meta_offset(int64_t r, int64_t c, int64_t rows) {
  r = (r / 32) * 32 + (r % 8) * 4 + (r % 32) / 8;
  const int64_t shift = ((r % 2 == 0) && (c % 2 == 1)) - ((r % 2 == 1) && (c % 2 == 0));
  r += shift;
  c -= shift;
  return (c / 2) * rows * 2 + r * 2 + c % 2;
}

}  // namespace ssam
