// One pair of entry points per (GroupedKind, tile configuration), each compiled in its own
// file (forward.cu, forward_small.cu, transposed_rhs.cu, transposed_rhs_small.cu,
// weight_grad.cu, weight_grad_small.cu); launch.cu picks among them with grouped_tiles().
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/grouped_matmul/grouped_matmul.h"

namespace jax_ep {
namespace grouped {

#define JAX_EP_GROUPED_DECLARE(name)                                                   \
  size_t name##_workspace_bytes(const GroupedMatmulArgs& args);                        \
  cudaError_t name##_run(const GroupedMatmulArgs& args, void* workspace, size_t bytes, \
                         cudaStream_t stream, const char** why)

JAX_EP_GROUPED_DECLARE(forward);
JAX_EP_GROUPED_DECLARE(forward_small);
JAX_EP_GROUPED_DECLARE(transposed_rhs);
JAX_EP_GROUPED_DECLARE(transposed_rhs_small);
JAX_EP_GROUPED_DECLARE(weight_grad);
JAX_EP_GROUPED_DECLARE(weight_grad_small);

#undef JAX_EP_GROUPED_DECLARE

}  // namespace grouped
}  // namespace jax_ep
