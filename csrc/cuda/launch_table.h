// The host side of a multi-tensor launch's table (cuda/ops_cuda.cpp): the values it is cached
// by, and its content, made from them only when the cache misses. Torch- and CUDA-free, so the
// layout is tested on machines without a GPU (tests/test_cuda_build.py).
#pragma once

#include <cstdint>
#include <vector>

namespace ssam {
namespace cuda {

// What a table is made from: the counts of tensors and columns (two layouts never share a
// key), each tensor's numel, then the launch's columns (one value per tensor each, e.g. data
// addresses). O(tensors): a hit costs no per-chunk work.
inline std::vector<int64_t> launch_table_key(const std::vector<int64_t>& numels,
                                             const std::vector<std::vector<int64_t>>& columns) {
  std::vector<int64_t> key{static_cast<int64_t>(numels.size()), static_cast<int64_t>(columns.size())};
  key.reserve(2 + numels.size() * (1 + columns.size()));
  key.insert(key.end(), numels.begin(), numels.end());
  for (const auto& column : columns) key.insert(key.end(), column.begin(), column.end());
  return key;
}

inline int64_t launch_table_chunks(const std::vector<int64_t>& numels, int64_t chunk) {
  int64_t chunks = 0;
  for (int64_t n : numels) chunks += (n + chunk - 1) / chunk;
  return chunks;
}

// The table of a key, as LaunchTable (ops_cuda.cpp) reads it: per chunk, its tensor and its
// first element (num_chunks each); per tensor, its numel and its first chunk; then the columns.
inline std::vector<int64_t> launch_table_content(const std::vector<int64_t>& key, int64_t chunk) {
  const int64_t num_tensors = key[0];
  const int64_t* numel = key.data() + 2;
  int64_t num_chunks = 0;
  for (int64_t t = 0; t < num_tensors; ++t) num_chunks += (numel[t] + chunk - 1) / chunk;
  std::vector<int64_t> content(2 * num_chunks + 2 * num_tensors);
  int64_t* chunk_tensor = content.data();
  int64_t* chunk_start = chunk_tensor + num_chunks;
  int64_t* numels = chunk_start + num_chunks;
  int64_t* first = numels + num_tensors;
  int64_t c = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    numels[t] = numel[t];
    first[t] = c;
    for (int64_t s = 0; s < numel[t]; s += chunk, ++c) {
      chunk_tensor[c] = t;
      chunk_start[c] = s;
    }
  }
  content.insert(content.end(), key.begin() + 2 + num_tensors, key.end());
  return content;
}

}  // namespace cuda
}  // namespace ssam
