// The low-latency kernels as their device files export them: function pointers, so that
// launch.cu alone decides grids, shared memory and the cooperative launch.
#pragma once

#include "cuda/low_latency/low_latency.h"

namespace jax_ep {

// Threads per block: at most 16 warps (the handlers clamp num_warps), so the compiler may
// use up to 128 registers without spilling.
constexpr int kLLMaxThreads = 512;

// Both kernels take (args, phases: LLPhases).
using LLDispatchKernel = void (*)(LLDispatchArgs a, int phases);
using LLCombineKernel = void (*)(LLCombineArgs a, int phases);

// dispatch.cu, [ElemType of x]. The send phase takes one staged row of dynamic shared
// memory (ll_dispatch_row_stride bytes).
extern const LLDispatchKernel kLLDispatchKernels[3];
// combine.cu, [ElemType of y][vector: 0 = 16 bytes, 1 = 4 bytes, 2 = 2 bytes].
extern const LLCombineKernel kLLCombineKernels[3][3];

}  // namespace jax_ep
