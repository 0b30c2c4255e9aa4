// The part of cuSPARSELt's C interface that cusparselt.cpp calls, declared here so that the
// extension builds without cuSPARSELt's headers (a CUDA toolkit does not ship them; torch's CUDA
// wheels ship the library, nvidia-cusparselt). The library itself is opened at run time.
//
// The layouts and values are cusparseLt.h's (identical in 0.8.1 and 0.10.0, checked against both
// headers): five opaque 512-byte objects aligned to 16 bytes, C enums passed as int, and the
// compute type enum of cuSPARSELt >= 0.5.2 ({32I, 16F, 32F}). cusparselt.cpp refuses a library
// older than kMinVersion.
#pragma once

#include <cuda_runtime_api.h>  // cudaStream_t
#include <library_types.h>     // cudaDataType, libraryPropertyType

#include <cstddef>
#include <cstdint>

namespace ssam {
namespace cslt {

struct alignas(16) Opaque {
  uint8_t data[512];
};
using Handle = Opaque;
using MatDescr = Opaque;
using MatmulDescr = Opaque;
using AlgSelection = Opaque;
using Plan = Opaque;

// 0.8: the first with cusparseLtGetErrorString and cusparseLtMatmulAlgSelectionDestroy (and a fixed
// host alignment of the algorithm selection object)
constexpr int kMinVersion[2] = {0, 8};  // major, minor

constexpr int kSuccess = 0;                               // cusparseStatus_t
constexpr int kOpNonTranspose = 0, kOpTranspose = 1;      // cusparseOperation_t
constexpr int kOrderCol = 1, kOrderRow = 2;               // cusparseOrder_t
constexpr int kSparsity50 = 0;                            // cusparseLtSparsity_t
constexpr int kCompute32F = 2;                            // cusparseComputeType
constexpr int kAlgDefault = 0;                            // cusparseLtMatmulAlg_t
constexpr int kAlgConfigId = 0, kAlgConfigMaxId = 1;      // cusparseLtMatmulAlgAttribute_t
constexpr int kSplitK = 3, kSplitKMode = 4;

// The functions, by the names dlsym finds them under (each field is bound to "cusparseLt" + its
// name, see CSLT_FUNCTIONS in cusparselt.cpp).
struct Api {
  int (*Init)(Handle*);
  int (*GetProperty)(libraryPropertyType, int*);
  const char* (*GetErrorString)(int);
  int (*DenseDescriptorInit)(const Handle*, MatDescr*, int64_t rows, int64_t cols, int64_t ld, uint32_t alignment,
                             cudaDataType, int order);
  int (*StructuredDescriptorInit)(const Handle*, MatDescr*, int64_t rows, int64_t cols, int64_t ld,
                                  uint32_t alignment, cudaDataType, int order, int sparsity);
  int (*MatDescriptorDestroy)(const MatDescr*);
  int (*MatmulDescriptorInit)(const Handle*, MatmulDescr*, int opA, int opB, const MatDescr* a, const MatDescr* b,
                              const MatDescr* c, const MatDescr* d, int compute);
  int (*MatmulAlgSelectionInit)(const Handle*, AlgSelection*, const MatmulDescr*, int alg);
  int (*MatmulAlgSelectionDestroy)(const AlgSelection*);
  int (*MatmulAlgSetAttribute)(const Handle*, AlgSelection*, int attribute, const void* data, size_t size);
  int (*MatmulAlgGetAttribute)(const Handle*, const AlgSelection*, int attribute, void* data, size_t size);
  int (*MatmulPlanInit)(const Handle*, Plan*, const MatmulDescr*, const AlgSelection*);
  int (*MatmulPlanDestroy)(const Plan*);
  int (*MatmulGetWorkspace)(const Handle*, const Plan*, size_t*);
  int (*Matmul)(const Handle*, const Plan*, const void* alpha, const void* a, const void* b, const void* beta,
                const void* c, void* d, void* workspace, cudaStream_t* streams, int32_t num_streams);
  int (*MatmulSearch)(const Handle*, Plan*, const void* alpha, const void* a, const void* b, const void* beta,
                      const void* c, void* d, void* workspace, cudaStream_t* streams, int32_t num_streams);
  int (*SpMMACompressedSize2)(const Handle*, const MatDescr*, size_t* compressed, size_t* buffer);
  int (*SpMMACompress2)(const Handle*, const MatDescr*, int is_sparse_a, int op, const void* dense, void* compressed,
                        void* buffer, cudaStream_t);
};

}  // namespace cslt
}  // namespace ssam
