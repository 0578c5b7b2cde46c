// GroupedKind::kTransposedRhs: A Row-major, B Column-major (see cutlass_grouped.cuh).
#include "cuda/grouped_matmul/cutlass_grouped.cuh"
#include "cuda/grouped_matmul/kinds.h"

namespace jax_ep {
namespace grouped {

JAX_EP_GROUPED_GEMM(TransposedRhsGemm, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor);

size_t transposed_rhs_workspace_bytes(const GroupedMatmulArgs& args) {
  return workspace_bytes<TransposedRhsGemm>(args);
}

cudaError_t transposed_rhs_run(const GroupedMatmulArgs& args, void* workspace, size_t bytes,
                               cudaStream_t stream, const char** why) {
  return run<TransposedRhsGemm, GroupedKind::kTransposedRhs>(args, workspace, bytes, stream, why);
}

}  // namespace grouped
}  // namespace jax_ep
