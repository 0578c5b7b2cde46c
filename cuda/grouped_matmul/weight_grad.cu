// GroupedKind::kWeightGrad: A Column-major, B Row-major (see cutlass_grouped.cuh).
#include "cuda/grouped_matmul/cutlass_grouped.cuh"
#include "cuda/grouped_matmul/kinds.h"

namespace jax_ep {
namespace grouped {

JAX_EP_GROUPED_GEMM(WeightGradGemm, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor);

size_t weight_grad_workspace_bytes(const GroupedMatmulArgs& args) {
  return workspace_bytes<WeightGradGemm>(args);
}

cudaError_t weight_grad_run(const GroupedMatmulArgs& args, void* workspace, size_t bytes,
                            cudaStream_t stream, const char** why) {
  return run<WeightGradGemm, GroupedKind::kWeightGrad>(args, workspace, bytes, stream, why);
}

}  // namespace grouped
}  // namespace jax_ep
