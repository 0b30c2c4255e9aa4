// Argument checks shared by the CPU (ops.cpp) and CUDA (cuda/ops_cuda.cpp) glue. The Python
// layer checks the public API first; these guard memory safety for direct torch.ops calls.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "ssam_common.h"

namespace ssam {

// Packed mask bits that fit `like`: a contiguous 1-D uint8 tensor of packed_nbytes(numel)
// bytes on like's device.
inline void check_bits(const at::Tensor& bits, const at::Tensor& like, const char* what, size_t k) {
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.is_contiguous() && bits.dim() == 1, what, ": masks[", k,
              "] must be a contiguous 1-D uint8 tensor of packed bits, got ", bits.scalar_type(), " of shape ",
              bits.sizes());
  TORCH_CHECK(bits.numel() == packed_nbytes(like.numel()), what, ": masks[", k, "] holds ", bits.numel(),
              " bytes, a tensor of ", like.numel(), " elements needs ", packed_nbytes(like.numel()));
  TORCH_CHECK(bits.device() == like.device(), what, ": masks[", k, "] is on ", bits.device(), ", its tensor on ",
              like.device());
}

// A perturbation's scale: one floating value.
inline void check_scale(const at::Tensor& scale, const char* what) {
  TORCH_CHECK(scale.numel() == 1 && at::isFloatingType(scale.scalar_type()), what,
              ": scale must be a tensor of one floating value, got ", scale.numel(), " values of ",
              scale.scalar_type());
}

// The 2:4 ops take the dtypes sparse tensor cores multiply.
inline void check_half_types(const at::Tensor& t, const char* what, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, what, ": ", name,
                   " must be float16 or bfloat16, got ", t.scalar_type());
}

// 2:4 values [rows, cols / 2] and their CUTLASS metadata [rows, cols / 16] (rows, cols
// multiples of 32, as compress_24 makes them), on one device.
inline void check_compressed_24(const at::Tensor& values, const at::Tensor& meta) {
  check_half_types(values, "decompress_24", "values");
  TORCH_CHECK(values.dim() == 2 && meta.dim() == 2, "decompress_24: values and meta must be 2-D, got ", values.sizes(),
              " and ", meta.sizes());
  const int64_t rows = values.size(0), cols = values.size(1) * 2;
  TORCH_CHECK(rows % 32 == 0 && cols % 32 == 0, "decompress_24: values must be [32*i, 16*j] (a [32*i, 32*j] matrix),",
              " got ", values.sizes());
  TORCH_CHECK(meta.scalar_type() == at::kShort && meta.size(0) == rows && meta.size(1) == cols / 16,
              "decompress_24: meta must be int16 [", rows, ", ", cols / 16, "], got ", meta.scalar_type(), " ",
              meta.sizes());
  TORCH_CHECK(meta.device() == values.device(), "decompress_24: meta is on ", meta.device(), ", values on ",
              values.device());
}

}  // namespace ssam
