// The grouped matmul's entry points: each GroupedKind's CUTLASS GEMM (kinds.h).
#include "cuda/grouped_matmul/grouped_matmul.h"
#include "cuda/grouped_matmul/kinds.h"

namespace jax_ep {

size_t grouped_matmul_workspace_bytes(const GroupedMatmulArgs& args) {
  switch (args.kind) {
    case GroupedKind::kForward: return grouped::forward_workspace_bytes(args);
    case GroupedKind::kTransposedRhs: return grouped::transposed_rhs_workspace_bytes(args);
    case GroupedKind::kWeightGrad: return grouped::weight_grad_workspace_bytes(args);
  }
  return 0;
}

cudaError_t grouped_matmul(const GroupedMatmulArgs& args, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream, const char** why) {
  switch (args.kind) {
    case GroupedKind::kForward:
      return grouped::forward_run(args, workspace, workspace_bytes, stream, why);
    case GroupedKind::kTransposedRhs:
      return grouped::transposed_rhs_run(args, workspace, workspace_bytes, stream, why);
    case GroupedKind::kWeightGrad:
      return grouped::weight_grad_run(args, workspace, workspace_bytes, stream, why);
  }
  *why = "unknown kind";
  return cudaErrorInvalidValue;
}

}  // namespace jax_ep
