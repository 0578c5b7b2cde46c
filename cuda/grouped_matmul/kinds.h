// One entry point per GroupedKind, each compiled in its own file (forward.cu,
// transposed_rhs.cu, weight_grad.cu); launch.cu picks among them.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/grouped_matmul/grouped_matmul.h"

namespace jax_ep {
namespace grouped {

size_t forward_workspace_bytes(const GroupedMatmulArgs& args);
cudaError_t forward_run(const GroupedMatmulArgs& args, void* workspace, size_t bytes,
                        cudaStream_t stream, const char** why);
size_t transposed_rhs_workspace_bytes(const GroupedMatmulArgs& args);
cudaError_t transposed_rhs_run(const GroupedMatmulArgs& args, void* workspace, size_t bytes,
                               cudaStream_t stream, const char** why);
size_t weight_grad_workspace_bytes(const GroupedMatmulArgs& args);
cudaError_t weight_grad_run(const GroupedMatmulArgs& args, void* workspace, size_t bytes,
                            cudaStream_t stream, const char** why);

}  // namespace grouped
}  // namespace jax_ep
