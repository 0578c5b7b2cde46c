// The low-latency dispatch kernels over NVLink stores (one NVLink domain).
#include "cuda/low_latency/dispatch.cuh"
#include "cuda/low_latency/kernels.h"

namespace jax_ep {

const LLDispatchKernel kLLDispatchKernels[3] = JAX_EP_LL_DISPATCH_TABLE(NvlinkStores);

}  // namespace jax_ep
