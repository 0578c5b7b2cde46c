// The low-latency kernels as their device files export them: function pointers, so that
// launch_policy.cuh alone decides grids, shared memory and the cooperative launch.
#pragma once

#include "cuda/low_latency/low_latency.h"

namespace jax_ep {

// Both kernels take (args, phases: LLPhases).
using LLDispatchKernel = void (*)(LLDispatchArgs a, int phases);
using LLCombineKernel = void (*)(LLCombineArgs a, int phases);

// dispatch.cu, [ElemType of x]. The send phase takes one staged row of dynamic shared
// memory (ll_dispatch_row_stride bytes).
extern const LLDispatchKernel kLLDispatchKernels[3];
// combine.cu, [ElemType of y][vector: 0 = 16 bytes, 1 = 4 bytes, 2 = 2 bytes].
extern const LLCombineKernel kLLCombineKernels[3][3];
// The same over stores and NVSHMEM puts (dispatch_nvshmem.cu, combine_nvshmem.cu; in
// jax_ep_nvshmem only).
extern const LLDispatchKernel kLLDispatchKernelsNvshmem[3];
extern const LLCombineKernel kLLCombineKernelsNvshmem[3][3];

}  // namespace jax_ep
