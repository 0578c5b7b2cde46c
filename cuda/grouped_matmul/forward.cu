// GroupedKind::kForward: A Row-major, B Row-major (see cutlass_grouped.cuh).
#include "cuda/grouped_matmul/cutlass_grouped.cuh"
#include "cuda/grouped_matmul/kinds.h"

namespace jax_ep {
namespace grouped {

JAX_EP_GROUPED_GEMM(ForwardGemm, cutlass::layout::RowMajor, cutlass::layout::RowMajor);

size_t forward_workspace_bytes(const GroupedMatmulArgs& args) {
  return workspace_bytes<ForwardGemm>(args);
}

cudaError_t forward_run(const GroupedMatmulArgs& args, void* workspace, size_t bytes,
                        cudaStream_t stream, const char** why) {
  return run<ForwardGemm, GroupedKind::kForward>(args, workspace, bytes, stream, why);
}

}  // namespace grouped
}  // namespace jax_ep
